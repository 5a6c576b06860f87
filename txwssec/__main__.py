"""
C{python -m txwssec}: helper commands for operators.

  hash-password   read a password (prompted, or from standard input) and
                  print a hash for C{[[consumer]] password}
  check-config    validate a configuration file and exit
  make-dev-cert   write a development CA, server and client certificates
"""

from __future__ import annotations

import argparse
import getpass
import sys
from pathlib import Path

from txwssec.config import load
from txwssec.devcert import write_dev_certificates
from txwssec.errors import ConfigError
from txwssec.passwords import hash_password


def main(argv: list[str] | None = None) -> int:
    """Run a helper command; return the exit status."""
    parser = argparse.ArgumentParser(prog="python -m txwssec")
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
    args = parser.parse_args(argv)

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
    try:
        config = load(args.path)
    except ConfigError as error:
        print(f"{args.path}: {error}", file=sys.stderr)
        return 1
    print(
        f"{args.path}: ok ({len(config.policy.routes)} routes, {len(config.consumers)} consumers)"
    )
    return 0


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
