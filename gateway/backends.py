"""Which backend serves each gRPC service, and the pooled channels the gateway calls them on.

Each service declares its backend in its .proto (`option (backend) = "agents";`,
options.proto), which the routes read (routes.py). A backend named
"agents" is reached at settings.agents_addr (Settings.backend_address, as every client
of the system), so deployments move a backend by changing one variable.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import grpc
from opentelemetry import trace

from services.common.foundation.settings import Settings
from services.common.transport.channels import DEFAULT_CONNECTIONS, open_channel


def backend_addresses(settings: Settings, backends: Iterable[str]) -> dict[str, str]:
    """Backend name → address (Settings.backend_address)."""
    return {backend: settings.backend_address(backend) for backend in sorted(set(backends))}


class ChannelPool:
    """One channel per distinct address, shared by every call to it.

    A channel multiplexes any number of concurrent calls and reconnects on its own, so
    per-request channels would only add handshakes; it spreads calls over `connections`
    connections (services.common.transport.channels), so every worker behind the address takes a
    share. Channels are opened in the app's lifespan (they belong to its event loop)
    and closed there.
    """

    def __init__(
        self, addresses: Mapping[str, str], connections: int = DEFAULT_CONNECTIONS, *, tracer: trace.Tracer | None = None
    ) -> None:
        self.addresses = dict(addresses)
        self.connections = connections
        self._tracer = tracer
        self._channels: dict[str, grpc.aio.Channel] = {}

    def open(self) -> None:
        for address in dict.fromkeys(self.addresses.values()):
            self._channels[address] = open_channel(address, connections=self.connections, tracer=self._tracer)

    def channel(self, backend: str) -> grpc.aio.Channel:
        return self._channels[self.addresses[backend]]

    async def close(self, grace: float | None = None) -> None:
        channels, self._channels = self._channels, {}
        for channel in channels.values():
            await channel.close(grace)
