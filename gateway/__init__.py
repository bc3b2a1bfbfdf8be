"""The HTTP gateway: REST/JSON in front of the gRPC services, derived from the protos.

`create_app(settings)` builds the ASGI app; `python -m gateway` serves it.
"""

from gateway.app import create_app

__all__ = ["create_app"]
