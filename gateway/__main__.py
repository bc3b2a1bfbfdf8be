"""`python -m gateway`: serves until SIGTERM or SIGINT, then drains the requests in flight (server.py)."""

from gateway.server import main

main()
