"""
Message-level security: what happens to each message of an open session
(sealed payloads, see L{txwssec.messages.sealing}). A mechanisms-layer
package: pure functions and small state objects that the server, gateway
and client protocols call on their message paths.
"""
