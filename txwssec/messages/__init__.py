"""
Message-level security: what a route does with each whole message, after
the frame-level limits and before the application: sealed payloads
(L{txwssec.messages.sealing}, L{txwssec.messages.sealed_route}) and message
rules (L{txwssec.messages.validation}). A mechanisms-layer package: pure
functions and small state objects that the server, gateway and client
protocols call on their message paths.
"""
