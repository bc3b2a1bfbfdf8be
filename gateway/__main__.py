"""`python -m gateway`: serves the HTTP gateway on GATEWAY_HOST:GATEWAY_PORT until
SIGTERM or SIGINT, then drains the requests in flight and exits 0 (gateway/server.py)."""

from gateway.server import main

main()
