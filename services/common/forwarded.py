"""Who the client is, when a proxy stands between: X-Forwarded-For, believed only so far.

Each proxy appends the address it received the request from, so the header reads
`client, proxy1, proxy2` and the peer is the last proxy. Anything left of an
untrusted hop may have been written by the client itself; so the client is the
rightmost address that is not a trusted proxy, read from the right, and the header
is read at all only when the peer itself is a trusted proxy. (The leftmost entry,
which the client chooses freely, is never believed on its own.)
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(spec: str) -> list[Network]:
    return [ipaddress.ip_network(part.strip(), strict=False) for part in spec.split(",") if part.strip()]


def trusted(address: str, networks: Iterable[Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in networks)


def client_address(peer: str, forwarded: Sequence[str], proxies: Sequence[Network]) -> str:
    """The client's address: `peer` unless it is a trusted proxy, else the rightmost
    untrusted hop of the X-Forwarded-For values (all of them, in order)."""
    if not proxies or not forwarded or not trusted(peer, proxies):
        return peer
    hops = [hop.strip() for value in forwarded for hop in value.split(",") if hop.strip()]
    for hop in reversed(hops):
        if not trusted(hop, proxies):
            return hop
    return hops[0] if hops else peer
