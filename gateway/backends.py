"""Which backend serves each gRPC service, and the pooled channels the gateway calls them on.

BACKEND_OF_SERVICE is the only hand-written table the gateway needs when a proto file
is added: its services' backend. A backend named "agents" is reached at
settings.agents_addr, so deployments move a backend by changing one variable.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import grpc

from services.common.grpc_host import MAX_MESSAGE_BYTES
from services.common.settings import Settings

BACKEND_OF_SERVICE: Mapping[str, str] = {
    "devops_hub.v1.AgentsService": "agents",
    "devops_hub.v1.ApiKeysService": "agents",
    "devops_hub.v1.WorkflowsService": "workflows",
    "devops_hub.v1.EventsService": "workflows",
    "devops_hub.v1.CacheService": "cache",
}

CHANNEL_OPTIONS = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # A restarted backend is found again within seconds instead of gRPC's default
    # back-off of up to two minutes, during which every call would fail fast.
    ("grpc.max_reconnect_backoff_ms", 5000),
)


def backend_addresses(settings: Settings, backends: Iterable[str]) -> dict[str, str]:
    """Backend name → address, from the `<backend>_addr` settings."""
    addresses: dict[str, str] = {}
    for backend in sorted(set(backends)):
        address = getattr(settings, f"{backend}_addr", None)
        if not address:
            raise ValueError(f"backend {backend!r} has no address: Settings has no {backend}_addr")
        addresses[backend] = address
    return addresses


class ChannelPool:
    """One grpc.aio channel per distinct address, shared by every call to it.

    A channel multiplexes any number of concurrent calls over one HTTP/2 connection and
    reconnects on its own, so per-request channels would only add handshakes. Channels
    are opened in the app's lifespan (they belong to its event loop) and closed there.
    """

    def __init__(self, addresses: Mapping[str, str]) -> None:
        self.addresses = dict(addresses)
        self._channels: dict[str, grpc.aio.Channel] = {}

    def open(self) -> None:
        for address in dict.fromkeys(self.addresses.values()):
            self._channels[address] = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)

    def channel(self, backend: str) -> grpc.aio.Channel:
        return self._channels[self.addresses[backend]]

    async def close(self, grace: float | None = None) -> None:
        channels, self._channels = self._channels, {}
        for channel in channels.values():
            await channel.close(grace)
