"""coap-fileserver: serve a directory over CoAP, the way a systemd service should."""

__version__ = "0.1.0"
