"""
C{python -m txwssec}: helper commands for operators.

  hash-password   read a password (prompted, or from standard input) and
                  print a hash for C{[[consumer]] password}
  check-config    validate a configuration file and exit
  make-dev-cert   write a development CA, server and client certificates
  config-reference
                  print the configuration reference (docs/configuration.rst)
"""

from __future__ import annotations

import argparse
import getpass
import os
import re
import sys
from importlib import resources
from pathlib import Path

from txwssec.config import load
from txwssec.devcert import write_dev_certificates
from txwssec.errors import ConfigError
from txwssec.passwords import hash_password
from txwssec.tap import version_text

#: The configuration reference of the source checkout this package is
#: imported from, if any (the only copy: builds carry it in the package).
CHECKOUT_REFERENCE = Path(__file__).resolve().parent.parent / "docs" / "configuration.rst"
#: Where an installed package carries docs/configuration.rst (setup.py copies it).
PACKAGED_REFERENCE = ("docs", "configuration.rst")
#: The heading of the section that C{config-reference} prints.
REFERENCE_HEADING = "Configuration reference"


def main(argv: list[str] | None = None) -> int:
    """Run a helper command; return the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m txwssec", formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--version", action="version", version=version_text(), help="print versions and exit"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    hashing = commands.add_parser(
        "hash-password",
        help="print a password hash for [[consumer]] password",
        description="The password is read from the terminal (asked twice) or, "
        "when standard input is not a terminal, from its first line. It is "
        "never taken from the command line, where other users could see it.",
    )
    hashing.add_argument("--scheme", choices=("scrypt", "pbkdf2-sha256"), default="scrypt")
    checking = commands.add_parser("check-config", help="validate a configuration file")
    checking.add_argument("path")
    making = commands.add_parser(
        "make-dev-cert",
        help="write a development CA + localhost certificate (DEVELOPMENT ONLY)",
        description="Writes ca.pem/ca.key, server.pem/server.key (localhost, 127.0.0.1, ::1) "
        "and client.pem/client.key (CN=dev-client) into FOLDER. For development only: "
        "the CA key is written too, so anyone who reads it can mint trusted certificates.",
    )
    making.add_argument("folder", nargs="?", default="dev-certs")
    commands.add_parser(
        "config-reference",
        help="print the configuration reference",
        description="Prints txwssec's configuration reference, docs/configuration.rst "
        "(reStructuredText), from the installed package.",
    )
    args = parser.parse_args(argv)

    if args.command == "config-reference":
        print(config_reference(), end="")
        return 0

    if args.command == "make-dev-cert":
        for path in write_dev_certificates(Path(args.folder)):
            print(path)
        print("development certificates only: never use them in production", file=sys.stderr)
        return 0

    if args.command == "hash-password":
        password = _read_password()
        if not password:
            print("error: empty password", file=sys.stderr)
            return 2
        print(hash_password(password, args.scheme))
        return 0
    _import_as_twistd()
    try:
        config = load(args.path)
    except ConfigError as error:
        print(f"{args.path}: {error}", file=sys.stderr)
        return 1
    print(
        f"{args.path}: ok ({len(config.policy.routes)} routes, {len(config.consumers)} consumers)"
    )
    return 0


def _import_as_twistd() -> None:
    """
    Import applications (C{app = "module:Class"}) as C{twistd wssec} does:
    C{python -m} puts the current directory first on C{sys.path}, the
    C{twistd} script does not, so it is taken off here. An application
    module must be importable (installed, or on C{PYTHONPATH}) for both.
    """
    if sys.path and sys.path[0] in ("", os.getcwd()):
        del sys.path[0]


def config_reference() -> str:
    """
    The configuration reference: the L{REFERENCE_HEADING} section of
    docs/configuration.rst, heading included. That file is the only copy: an
    installed package carries it as C{txwssec/docs/configuration.rst}
    (setup.py copies it in at build time); a package imported from its
    source checkout (an editable install) reads the checkout's file.
    """
    packaged = resources.files("txwssec").joinpath(*PACKAGED_REFERENCE)
    try:
        text = packaged.read_text(encoding="utf-8")
    except OSError:
        text = ""
    if not _is_reference(text):
        text = CHECKOUT_REFERENCE.read_text(encoding="utf-8")
    return reference_section(text)


def _is_reference(text: str) -> bool:
    underline = "=" * len(REFERENCE_HEADING)
    return text.startswith(f"{REFERENCE_HEADING}\n{underline}\n")


def reference_section(readme: str) -> str:
    """The L{REFERENCE_HEADING} section of C{readme}: heading to next heading."""
    underline = "=" * len(REFERENCE_HEADING)
    start = readme.index(f"{REFERENCE_HEADING}\n{underline}\n")
    following = re.compile(r"^\S.*\n=+\n", re.MULTILINE)
    after = following.search(readme, start + len(REFERENCE_HEADING) + len(underline) + 2)
    section = readme[start : after.start() if after else len(readme)]
    # The docs tests' markers (".. not-run: ...", ".. tested-by: ...") are for
    # the test suite, not for a reader at a terminal.
    section = _TEST_MARKER.sub("", section)
    return section.rstrip("\n") + "\n"


#: A docs-test marker line and the blank line after it (see tests/test_docs.py).
_TEST_MARKER = re.compile(r"^\.\. (?:not-run|tested-by):.*\n\n?", re.MULTILINE)


def _read_password() -> str:
    if sys.stdin.isatty():
        first = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != first:
            print("error: passwords differ", file=sys.stderr)
            return ""
        return first
    return sys.stdin.readline().rstrip("\r\n")


if __name__ == "__main__":
    sys.exit(main())
