"""The kernel backend: an in-kernel WireGuard link, configured over generic netlink.

Rules:
- The `wireguard` generic netlink family is probed first; without it the backend raises
  `KernelModuleMissing("kernel WireGuard module not available ...")`, the one message an
  operator needs, instead of a bare ENOENT/EOPNOTSUPP from deep inside netlink.
- An existing link of our name and kind wireguard is adopted; a link of our name of
  another kind is refused, never deleted.
- A peer write is one netlink message with WGPEER_F_REPLACE_ALLOWEDIPS, the same atomic
  replace the userspace backend does over UAPI. The kernel accepts a bounded message, so a
  peer with thousands of allowed IPs would need splitting (not needed at tfcrypt's sizes).
- A dump may split one peer across messages; fragments are merged by public key.
"""

from __future__ import annotations

import errno
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from pyroute2 import AsyncIPRoute, AsyncWireGuard
from pyroute2.netlink.exceptions import NetlinkError

from tfcrypt.wireguard import link
from tfcrypt.wireguard.backend import DeviceOrigin
from tfcrypt.wireguard.errors import DeviceUnavailable, KernelModuleMissing, WireGuardError
from tfcrypt.wireguard.model import (
    DeviceState,
    PeerConfig,
    PeerState,
    decode_key,
    encode_key,
    normalise_cidrs,
    normalise_endpoint,
)

MISSING = "kernel WireGuard module not available (load it with `modprobe wireguard`, "
MISSING += "or use the userspace backend)"


@dataclass
class _PeerParts:
    public_key: str
    endpoint: str | None = None
    allowed_ips: set[str] = field(default_factory=set)
    last_handshake: float | None = None
    rx_bytes: int = 0
    tx_bytes: int = 0
    persistent_keepalive: int = 0


class KernelBackend:
    """One in-kernel WireGuard link.

    Pitfalls: the module may be absent (containers, this lab) and is then reported, not
    loaded behind the operator's back; like any device, deleting the link takes its
    routes with it; keys in pyroute2's messages are base64 bytes, not str.
    """

    def __init__(self, ifname: str, *, netns: str | None = None) -> None:
        self.ifname = ifname
        self.netns = netns
        self._known = False
        self.restarts = 0  # links recreated after vanishing (status: device_restarts)

    def __repr__(self) -> str:
        return f"KernelBackend({self.ifname!r})"

    def _wg(self) -> AsyncWireGuard:
        return AsyncWireGuard(netns=self.netns, flags=0) if self.netns else AsyncWireGuard()

    async def ensure_device(self) -> DeviceOrigin:
        await self._probe_family()
        existing = await link.link_state(self.ifname, self.netns)
        if existing is not None:
            kind = await self._link_kind()
            if kind != "wireguard":
                raise DeviceUnavailable(f"{self.ifname} exists with kind {kind!r}, not wireguard")
            origin = DeviceOrigin.PRESENT if self._known else DeviceOrigin.ADOPTED
        else:
            await self._add_link()
            origin = DeviceOrigin.RESTARTED if self._known else DeviceOrigin.STARTED
            self.restarts += origin is DeviceOrigin.RESTARTED
        self._known = True
        return origin

    async def get_state(self) -> DeviceState:
        messages = await self._request("get", lambda wg: wg.info(self.ifname))
        state = _parse_dump(messages)
        current = await link.link_state(self.ifname, self.netns)
        if current is None:
            raise DeviceUnavailable(f"{self.ifname}: link vanished")
        return replace(state, mtu=current.mtu, up=current.up)

    async def read_private_key(self) -> bytes | None:
        messages = await self._request("get", lambda wg: wg.info(self.ifname))
        for msg in messages:
            value = msg.get("WGDEVICE_A_PRIVATE_KEY")
            if value:
                raw = decode_key(_text(value))
                return raw if any(raw) else None
        return None

    async def configure_device(self, private_key: bytes | None, listen_port: int | None) -> None:
        key = encode_key(private_key) if private_key is not None else None
        await self._request(
            "set device", lambda wg: wg.set(self.ifname, private_key=key, listen_port=listen_port)
        )

    async def set_link(self, mtu: int | None, up: bool) -> None:
        await link.set_link(self.ifname, mtu, up, self.netns)

    async def upsert_peer(self, peer: PeerConfig) -> None:
        spec: dict[str, Any] = {
            "public_key": peer.public_key,
            "persistent_keepalive": peer.persistent_keepalive,
            "replace_allowed_ips": True,
            "allowed_ips": sorted(peer.allowed_ips),
        }
        if peer.endpoint is not None:
            host, _, port = peer.endpoint.rpartition(":")
            spec["endpoint_addr"] = host.strip("[]")
            spec["endpoint_port"] = int(port)
        await self._request(
            f"set peer {peer.public_key}", lambda wg: wg.set(self.ifname, peer=spec)
        )

    async def remove_peer(self, public_key: str) -> None:
        spec = {"public_key": public_key, "remove": True}
        await self._request(f"remove peer {public_key}", lambda wg: wg.set(self.ifname, peer=spec))

    async def close(self) -> None:
        return None

    async def _probe_family(self) -> None:
        try:
            async with self._wg() as wg:
                await wg.setup_endpoint()
        except NetlinkError as exc:
            if exc.code in (errno.ENOENT, errno.EOPNOTSUPP):
                raise KernelModuleMissing(MISSING) from exc
            raise DeviceUnavailable(f"{self.ifname}: wireguard netlink: {exc}") from exc

    async def _add_link(self) -> None:
        ipr = AsyncIPRoute(netns=self.netns, flags=0) if self.netns else AsyncIPRoute()
        async with ipr:
            try:
                await ipr.link("add", ifname=self.ifname, kind="wireguard")
            except NetlinkError as exc:
                if exc.code == errno.EOPNOTSUPP:
                    raise KernelModuleMissing(MISSING) from exc
                raise DeviceUnavailable(f"{self.ifname}: link add failed: {exc}") from exc

    async def _link_kind(self) -> str | None:
        ipr = AsyncIPRoute(netns=self.netns, flags=0) if self.netns else AsyncIPRoute()
        async with ipr:
            indexes = await ipr.link_lookup(ifname=self.ifname)
            if not indexes:
                return None
            (msg,) = await ipr.link("get", index=indexes[0])
            info = msg.get(("IFLA_LINKINFO", "IFLA_INFO_KIND"))
            return str(info) if info is not None else None

    async def _request(self, operation: str, call: Any) -> list[Any]:
        try:
            async with self._wg() as wg:
                await wg.setup_endpoint()
                result = await call(wg)
                if hasattr(result, "__aiter__"):
                    return [msg async for msg in result]
                return list(result) if isinstance(result, Iterable) else [result]
        except NetlinkError as exc:
            if exc.code == errno.ENOENT and operation == "get":
                raise DeviceUnavailable(f"{self.ifname}: no such wireguard device") from exc
            raise WireGuardError(f"{self.ifname}: {operation} failed: {exc}") from exc


def _text(value: Any) -> str:
    return value.decode("ascii") if isinstance(value, bytes) else str(value)


def _parse_dump(messages: Iterable[Any]) -> DeviceState:
    """Merge a (possibly multi-message) WG_CMD_GET_DEVICE dump into one DeviceState."""
    public_key: str | None = None
    listen_port = 0
    fwmark = 0
    parts: dict[str, _PeerParts] = {}
    for msg in messages:
        private = msg.get("WGDEVICE_A_PRIVATE_KEY")
        if private and any(decode_key(_text(private))):
            public_key = _text(msg.get("WGDEVICE_A_PUBLIC_KEY"))
        listen_port = msg.get("WGDEVICE_A_LISTEN_PORT") or listen_port
        fwmark = msg.get("WGDEVICE_A_FWMARK") or fwmark
        for peer in msg.get("WGDEVICE_A_PEERS") or []:
            key = _text(peer.get("WGPEER_A_PUBLIC_KEY"))
            part = parts.setdefault(key, _PeerParts(key))
            endpoint = peer.get("WGPEER_A_ENDPOINT")
            if endpoint and endpoint.get("port"):
                addr = endpoint["addr"]
                host = f"[{addr}]" if ":" in addr else addr
                part.endpoint = normalise_endpoint(f"{host}:{endpoint['port']}")
            handshake = peer.get("WGPEER_A_LAST_HANDSHAKE_TIME")
            if handshake and (handshake["tv_sec"] or handshake["tv_nsec"]):
                part.last_handshake = handshake["tv_sec"] + handshake["tv_nsec"] / 1e9
            part.rx_bytes = peer.get("WGPEER_A_RX_BYTES") or part.rx_bytes
            part.tx_bytes = peer.get("WGPEER_A_TX_BYTES") or part.tx_bytes
            keepalive = peer.get("WGPEER_A_PERSISTENT_KEEPALIVE_INTERVAL")
            part.persistent_keepalive = keepalive or part.persistent_keepalive
            for allowed in peer.get("WGPEER_A_ALLOWEDIPS") or []:
                if allowed.get("addr"):
                    part.allowed_ips.add(allowed["addr"])
    peers = {
        key: PeerState(
            public_key=p.public_key,
            endpoint=p.endpoint,
            allowed_ips=normalise_cidrs(p.allowed_ips),
            last_handshake=p.last_handshake,
            rx_bytes=p.rx_bytes,
            tx_bytes=p.tx_bytes,
            persistent_keepalive=p.persistent_keepalive,
        )
        for key, p in parts.items()
    }
    return DeviceState(public_key, listen_port, fwmark, peers)

