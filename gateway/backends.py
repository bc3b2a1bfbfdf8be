"""The pooled channels the gateway calls its backends on. Each service declares its
backend in its .proto (`option (backend) = "agents";`, read by routes.py), reached at
settings.agents_addr (Settings.backend_address, as every client of the system)."""

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
    """One channel per distinct address, shared by every call to it (a channel
    multiplexes calls and reconnects on its own), spread over `connections` connections
    so that every worker behind the address takes a share. Opened and closed in the
    app's lifespan: channels belong to its event loop."""

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
