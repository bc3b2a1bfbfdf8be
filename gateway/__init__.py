"""The HTTP gateway: REST/JSON in front of the gRPC services, derived from the protos.
`create_app(settings)` (app.py) builds the ASGI app; `python -m gateway` serves it."""
