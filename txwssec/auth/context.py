"""
What an authenticator builder receives besides its own table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from txwssec.consumers import ConsumerDirectory


@dataclass(frozen=True)
class BuildContext:
    """
    What a builder may need besides its own table.

    @ivar consumers: the configured consumers.
    @ivar base_dir: the configuration file's folder; relative file names in
        the configuration are resolved against it.
    """

    consumers: ConsumerDirectory
    base_dir: Path = field(default_factory=Path)
