"""
A local identity provider for trying the JWKS and introspection examples
without the internet: the HTTPS provider of txwssec's tests (tests/idp.py),
on 127.0.0.1.

    python examples/idp/run_idp.py            # port 9999; writes into examples/idp/

It writes, next to this script (or into --folder):

  idp-ca.pem    the CA its certificate chains to (the configs' ``ca``)
  jwt.txt       an RS256 token for consumer "john", valid one hour
  opaque.txt    an opaque token for "john", valid one hour (introspection)

and serves https://127.0.0.1:PORT/jwks.json, /.well-known/openid-configuration
and /introspect (client_id "wssec", client_secret in introspect.toml) until
Ctrl-C.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent / "tests"))

from idp import IdentityProvider  # noqa: E402
from twisted.internet import reactor  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=9999)
    parser.add_argument("--folder", type=Path, default=HERE)
    arguments = parser.parse_args()
    idp = IdentityProvider(arguments.folder).start(reactor, arguments.port)
    key = idp.add_key("RS256")
    (arguments.folder / "jwt.txt").write_text(idp.sign(key, "john", lifetime=3600) + "\n")
    (arguments.folder / "opaque.txt").write_text(idp.opaque("john", lifetime=3600) + "\n")
    print(f"idp listening on {idp.issuer}", flush=True)
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
