"""
Where a route's methods read credentials from: now in L{txwssec.credentials}
(the values layer, so that L{txwssec.policy} can check routes without
importing the auth methods); kept here for the import path.
"""

from txwssec.credentials import (
    credential_headers,
    credential_markers,
    credential_queries,
    without_credentials,
)

__all__ = [
    "credential_headers",
    "credential_markers",
    "credential_queries",
    "without_credentials",
]
