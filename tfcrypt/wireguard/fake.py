"""An in-memory WireGuard backend for reconciler tests (after httpcore's mock backend).

Rules:
- It keeps WireGuard's observable semantics that a reconciler can trip over: an allowed
  IP belongs to at most one peer (adding it to one peer takes it from another), a
  device that vanishes loses every peer, an existing device is adopted, not recreated.
- `ops` counts write operations, so "a second apply does nothing" is `ops == 0`; `calls`
  records their order (key and port before peers is a security property).
- `fail_peers` makes writes for those public keys fail, as a daemon error would.
"""

from __future__ import annotations

from dataclasses import replace

from tfcrypt.wireguard.backend import DeviceOrigin
from tfcrypt.wireguard.errors import DeviceUnavailable, UapiError
from tfcrypt.wireguard.keys import public_key_of
from tfcrypt.wireguard.model import DeviceState, PeerConfig, PeerState

_EINVAL = 22
DEFAULT_MTU = 1420


class FakeBackend:
    """A device in memory; construct with `existing=` to model a previous run's device."""

    def __init__(
        self,
        ifname: str = "tfcrypt0",
        *,
        existing: DeviceState | None = None,
        existing_private_key: bytes | None = None,
    ) -> None:
        self.ifname = ifname
        self.ops = 0
        self.calls: list[str] = []
        self.fail_peers: set[str] = set()
        self.fail_device = False
        self.restarts = 0
        self.private_key: bytes | None = existing_private_key
        self.listen_port = existing.listen_port if existing else 0
        self.mtu = (existing.mtu or DEFAULT_MTU) if existing else DEFAULT_MTU
        self.up = bool(existing.up) if existing else False
        self.peers: dict[str, PeerState] = dict(existing.peers) if existing else {}
        self.exists = existing is not None
        self._known = False

    def __repr__(self) -> str:
        return f"FakeBackend({self.ifname!r}, peers={len(self.peers)}, ops={self.ops})"

    def vanish(self) -> None:
        """The device disappears, as when wireguard-go is killed."""
        self.exists = False
        self.private_key = None
        self.listen_port = 0
        self.mtu = DEFAULT_MTU
        self.up = False
        self.peers.clear()

    async def ensure_device(self) -> DeviceOrigin:
        if self.fail_device:
            raise DeviceUnavailable(f"{self.ifname}: fake device cannot start")
        if self.exists:
            origin = DeviceOrigin.PRESENT if self._known else DeviceOrigin.ADOPTED
        elif self._known:
            self.restarts += 1
            origin = DeviceOrigin.RESTARTED
        else:
            origin = DeviceOrigin.STARTED
        self.exists = True
        self._known = True
        return origin

    async def get_state(self) -> DeviceState:
        self._require()
        public = public_key_of(self.private_key) if self.private_key else None
        return DeviceState(public, self.listen_port, 0, dict(self.peers), self.mtu, self.up)

    async def read_private_key(self) -> bytes | None:
        self._require()
        return self.private_key

    async def configure_device(self, private_key: bytes | None, listen_port: int | None) -> None:
        self._write("device")
        if private_key is not None:
            self.private_key = private_key
        if listen_port is not None:
            self.listen_port = listen_port

    async def set_link(self, mtu: int | None, up: bool) -> None:
        self._write("link")
        if mtu is not None:
            self.mtu = mtu
        self.up = up

    async def upsert_peer(self, peer: PeerConfig) -> None:
        self._write(f"upsert {peer.public_key}")
        if peer.public_key in self.fail_peers:
            raise UapiError(_EINVAL, f"set peer {peer.public_key}")
        for key, other in list(self.peers.items()):
            if key != peer.public_key and other.allowed_ips & peer.allowed_ips:
                self.peers[key] = replace(other, allowed_ips=other.allowed_ips - peer.allowed_ips)
        old = self.peers.get(peer.public_key)
        endpoint = peer.endpoint if peer.endpoint is not None else (old and old.endpoint)
        self.peers[peer.public_key] = PeerState(
            public_key=peer.public_key,
            endpoint=endpoint or None,
            allowed_ips=peer.allowed_ips,
            last_handshake=old.last_handshake if old else None,
            rx_bytes=old.rx_bytes if old else 0,
            tx_bytes=old.tx_bytes if old else 0,
            persistent_keepalive=peer.persistent_keepalive,
        )

    async def remove_peer(self, public_key: str) -> None:
        self._write(f"remove {public_key}")
        if public_key in self.fail_peers:
            raise UapiError(_EINVAL, f"remove peer {public_key}")
        self.peers.pop(public_key, None)

    async def close(self) -> None:
        return None

    def _write(self, call: str) -> None:
        self._require()
        self.ops += 1
        self.calls.append(call)

    def _require(self) -> None:
        if not self.exists:
            raise DeviceUnavailable(f"{self.ifname}: no such device")
