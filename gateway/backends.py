"""The pooled channels the gateway calls its backends on: each service names its backend
in its .proto (`option (backend)`, read by routes.py), found at Settings.backend_address."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import grpc
from opentelemetry import trace

from services.common.foundation.settings import Settings
from services.common.transport.channels import DEFAULT_CONNECTIONS, open_channel


def backend_addresses(settings: Settings, backends: Iterable[str]) -> dict[str, str]:
    return {backend: settings.backend_address(backend) for backend in sorted(set(backends))}


class ChannelPool:
    """One channel per address (it multiplexes calls and reconnects on its own), over
    `connections` connections so that every worker behind the address takes a share.
    Opened and closed in the app's lifespan: channels belong to its event loop."""

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
