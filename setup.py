"""
Build hook: ship docs/configuration.rst inside the package, as
txwssec/docs/configuration.rst, for ``python -m txwssec config-reference``.
Everything else is in setup.cfg.
"""

from __future__ import annotations

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

#: The configuration reference (the only copy) and where the package carries it.
REFERENCE = Path("docs", "configuration.rst")
PACKAGED = Path("txwssec", "docs", "configuration.rst")


class BuildPyWithReference(build_py):  # type: ignore[misc]
    """build_py, plus the configuration reference copied into the package."""

    def run(self) -> None:
        super().run()
        target = Path(self.build_lib) / PACKAGED
        self.mkpath(str(target.parent))
        self.copy_file(str(REFERENCE), str(target))

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return [*super().get_outputs(include_bytecode), str(Path(self.build_lib) / PACKAGED)]


setup(cmdclass={"build_py": BuildPyWithReference})
