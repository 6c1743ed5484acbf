"""Where WebRTC media may go: pin ICE host candidates to chosen addresses (loopback by default).

- `use_ice_addresses(addresses)`: gather host candidates on `addresses` only (process-wide), or
  on every interface (None). aioice never offers 127.0.0.1 by itself; a server bound to loopback
  (the local default, and every test) keeps its media there too, so calls never leave the machine.
- `pinned_ice_addresses()`: what is pinned now (None: every interface).
- `allowed_candidates(sdp, addresses)`: a remote description without candidates outside them.
"""

from __future__ import annotations

from typing import Callable

_pinned: list[str] | None = None
_all_host_addresses: Callable[[bool, bool], list[str]] | None = None  # aioice's own, before any pinning


def use_ice_addresses(addresses: list[str] | None) -> None:
    """Gather ICE host candidates on `addresses` only (process-wide), or on every interface (None)."""
    import aioice.ice

    global _pinned, _all_host_addresses
    if _all_host_addresses is None:
        _all_host_addresses = aioice.ice.get_host_addresses
    _pinned = None if addresses is None else list(addresses)
    if _pinned is None:
        aioice.ice.get_host_addresses = _all_host_addresses
    else:
        fixed = _pinned
        aioice.ice.get_host_addresses = lambda use_ipv4=True, use_ipv6=True: [a for a in fixed if (":" in a and use_ipv6) or (":" not in a and use_ipv4)]


def pinned_ice_addresses() -> list[str] | None:
    return _pinned


def allowed_candidates(sdp: str, addresses: list[str] | None) -> str:
    """`sdp` without the remote ICE candidates outside `addresses` (all kept when None), so a
    pinned peer never sends to, or resolves (mDNS), anything else."""
    if addresses is None:
        return sdp
    keep = []
    for line in sdp.splitlines():
        if line.startswith("a=candidate:"):
            parts = line.split()
            if len(parts) < 5 or parts[4] not in addresses:
                continue
        keep.append(line)
    return "\r\n".join(keep) + "\r\n"
