from twisted.application.service import ServiceMaker

wssec = ServiceMaker(
    "txwssec",
    "txwssec.tap",
    "Secure WebSocket server and gateway (TOML config)",
    "wssec",
)
