"""Who the client is, when a proxy stands between: X-Forwarded-For, believed only so far.

The client is the rightmost address that is not a trusted proxy, and the header is
read at all only when the peer itself is one: anything left of an untrusted hop may
have been written by the client. Between the gateway and the services an address
proves nothing, so the gateway vouches with the services' key as FORWARDER_KEY
(docs/resilience.md, "X-Forwarded-For" and "Rate limits").
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

# Metadata holding the services' key on a call the gateway admitted (and limited).
FORWARDER_KEY = "x-forwarder-key"
# TRUSTED_PROXIES when unset: any address, since the key is the proof.
ANY_ADDRESS = "0.0.0.0/0,::/0"


class TrustedProxies:
    """The peers whose X-Forwarded-For is read (comma-separated networks). The verdict
    per address is remembered: a process sees few distinct peers, and parsing an
    address costs more than the rest of a hot call's checks."""

    _REMEMBERED = 4096

    def __init__(self, spec: str) -> None:
        self._networks = [ipaddress.ip_network(part.strip(), strict=False) for part in spec.split(",") if part.strip()]
        self._verdicts: dict[str, bool] = {}

    def __bool__(self) -> bool:
        return bool(self._networks)

    def __contains__(self, address: str) -> bool:
        verdict = self._verdicts.get(address)
        if verdict is None:
            try:
                ip = ipaddress.ip_address(address)
            except ValueError:
                verdict = False
            else:
                verdict = any(ip in network for network in self._networks)
            if len(self._verdicts) >= self._REMEMBERED:
                self._verdicts.clear()
            self._verdicts[address] = verdict
        return verdict


def client_address(peer: str, forwarded: Sequence[str], proxies: TrustedProxies) -> str:
    """`forwarded`: all the X-Forwarded-For values, in order."""
    if not proxies or not forwarded or peer not in proxies:
        return peer
    hops = [hop.strip() for value in forwarded for hop in value.split(",") if hop.strip()]
    for hop in reversed(hops):
        if hop not in proxies:
            return hop
    return hops[0] if hops else peer
