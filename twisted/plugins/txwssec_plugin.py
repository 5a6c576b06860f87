from twisted.application.service import ServiceMaker

from txwssec.tls import WSSServerEndpointParser

wssec = ServiceMaker(
    "txwssec",
    "txwssec.tap",
    "Secure WebSocket server and gateway (TOML config)",
    "wssec",
)

wssEndpoint = WSSServerEndpointParser()
