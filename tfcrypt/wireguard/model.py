"""Values that describe a WireGuard device: what we want, and what the device reports.

Rules:
- Keys are canonical by construction: public keys are base64 of 32 bytes, allowed IPs are
  network CIDRs with host bits cleared, endpoints are `ip:port` / `[ip6]:port` in the
  compressed form wg prints. So "nothing changed" is `==`, whichever backend reported it.
- A private key is never part of a repr; the device state keeps only the public key.
- Values only: no I/O, no clock, nothing that imports a backend.
- Normalising is cached: strings already known to be canonical CIDRs are kept in a bounded
  set, and a frozenset made only of them is returned as it is (a C-level subset test), so
  re-creating 999 peers with ~100 allowed IPs each costs no `ipaddress` call per IP.
"""

from __future__ import annotations

import base64
import binascii
import functools
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

KEY_LEN = 32

# IPv6 outer header (40) + UDP (8) + WireGuard data header and tag (32): the largest
# overhead, so one rule fits both underlay families.
WIREGUARD_OVERHEAD = 80
_CANONICAL_CIDRS: set[str] = set()
_CANONICAL_CIDRS_MAX = 1 << 20


def mtu_for_underlay(underlay_mtu: int) -> int:
    """The device MTU to use when none is configured: underlay MTU minus 80."""
    return underlay_mtu - WIREGUARD_OVERHEAD


def decode_key(key_b64: str) -> bytes:
    """The 32 raw bytes of a base64 WireGuard key; ValueError names no key material."""
    try:
        raw = base64.b64decode(key_b64, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError("WireGuard key is not valid base64") from exc
    if len(raw) != KEY_LEN:
        raise ValueError(f"WireGuard key must be {KEY_LEN} bytes, got {len(raw)}")
    return raw


def encode_key(raw: bytes) -> str:
    if len(raw) != KEY_LEN:
        raise ValueError(f"WireGuard key must be {KEY_LEN} bytes, got {len(raw)}")
    return base64.b64encode(raw).decode("ascii")


@functools.lru_cache(maxsize=8192)
def normalise_endpoint(endpoint: str) -> str:
    """`ip:port` or `[ip6]:port` in canonical form; host names are refused (UAPI takes IPs)."""
    host, sep, port_text = endpoint.rpartition(":")
    if not sep or not port_text.isdigit():
        raise ValueError(f"endpoint {endpoint!r} is not ip:port")
    port = int(port_text)
    if not 0 < port < 65536:
        raise ValueError(f"endpoint {endpoint!r} has port out of range")
    bracketed = host.startswith("[") and host.endswith("]")
    if bracketed:
        host = host[1:-1]
    try:
        addr = ipaddress.ip_address(host)
    except ValueError as exc:
        raise ValueError(f"endpoint {endpoint!r} is not an IP address") from exc
    if addr.version == 6:
        if not bracketed:
            raise ValueError(f"endpoint {endpoint!r}: IPv6 needs [brackets]")
        return f"[{addr.compressed}]:{port}"
    if bracketed:
        raise ValueError(f"endpoint {endpoint!r}: brackets are for IPv6 only")
    return f"{addr.compressed}:{port}"


def normalise_cidrs(cidrs: Iterable[str]) -> frozenset[str]:
    """Network CIDRs with host bits cleared and an explicit prefix length (the input
    frozenset itself when it is already canonical)."""
    if isinstance(cidrs, frozenset) and cidrs <= _CANONICAL_CIDRS:
        return cidrs
    return frozenset(map(_normal_cidr, cidrs))


def _normal_cidr(cidr: str) -> str:
    if cidr in _CANONICAL_CIDRS:
        return cidr
    normal = ipaddress.ip_network(cidr, strict=False).with_prefixlen
    if normal == cidr:
        if len(_CANONICAL_CIDRS) >= _CANONICAL_CIDRS_MAX:
            _CANONICAL_CIDRS.clear()
        _CANONICAL_CIDRS.add(cidr)
    return normal


@dataclass(frozen=True)
class PeerConfig:
    """What we configure for one peer: the desired state, and actual state read back."""

    public_key: str
    endpoint: str | None = None
    allowed_ips: frozenset[str] = frozenset()
    persistent_keepalive: int = 0

    def __post_init__(self) -> None:
        decode_key(self.public_key)
        if self.endpoint is not None:
            object.__setattr__(self, "endpoint", normalise_endpoint(self.endpoint))
        object.__setattr__(self, "allowed_ips", normalise_cidrs(self.allowed_ips))
        if not 0 <= self.persistent_keepalive <= 65535:
            raise ValueError("persistent_keepalive must be 0..65535 seconds")


@dataclass(frozen=True)
class PeerState:
    """One peer as the device reports it, including counters we never configure."""

    public_key: str
    endpoint: str | None
    allowed_ips: frozenset[str]
    last_handshake: float | None
    rx_bytes: int
    tx_bytes: int
    persistent_keepalive: int

    def config(self) -> PeerConfig:
        return PeerConfig(
            public_key=self.public_key,
            endpoint=self.endpoint,
            allowed_ips=self.allowed_ips,
            persistent_keepalive=self.persistent_keepalive,
        )


@dataclass(frozen=True)
class DeviceState:
    """A device as a backend reports it; `mtu`/`up` come from the link, not the UAPI."""

    public_key: str | None
    listen_port: int
    fwmark: int
    peers: Mapping[str, PeerState]
    mtu: int | None = None
    up: bool | None = None


@dataclass(frozen=True)
class DesiredDevice:
    """What the agent wants the device to be; peers keyed by public key."""

    private_key_b64: str = field(repr=False)
    listen_port: int
    mtu: int
    peers: Mapping[str, PeerConfig]

    def __post_init__(self) -> None:
        decode_key(self.private_key_b64)
        for key, peer in self.peers.items():
            if key != peer.public_key:
                raise ValueError("peers must be keyed by their public key")
        if not 0 <= self.listen_port <= 65535:
            raise ValueError("listen_port must be 0..65535")
        if not 576 <= self.mtu <= 65535:
            raise ValueError("mtu must be 576..65535")
