"""Link-level state of the WireGuard interface (MTU, up) through rtnetlink.

Rules: one short-lived `AsyncIPRoute` per call, in the namespace given (None = ours);
`flags=0` so naming a namespace never creates it. A missing link is `None`, not an error:
the caller decides whether absence means "create" or "vanished".
"""

from __future__ import annotations

from dataclasses import dataclass

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError

from tfcrypt.wireguard.errors import WireGuardError

IFF_UP = 0x1


@dataclass(frozen=True)
class LinkState:
    index: int
    mtu: int
    up: bool


def _ipr(netns: str | None) -> AsyncIPRoute:
    return AsyncIPRoute(netns=netns, flags=0) if netns else AsyncIPRoute()


async def link_state(ifname: str, netns: str | None = None) -> LinkState | None:
    async with _ipr(netns) as ipr:
        indexes = await ipr.link_lookup(ifname=ifname)
        if not indexes:
            return None
        try:
            (msg,) = await ipr.link("get", index=indexes[0])
        except NetlinkError:
            return None
        return LinkState(indexes[0], msg.get("IFLA_MTU"), bool(msg["flags"] & IFF_UP))


async def set_link(ifname: str, mtu: int | None, up: bool, netns: str | None = None) -> None:
    async with _ipr(netns) as ipr:
        indexes = await ipr.link_lookup(ifname=ifname)
        if not indexes:
            raise WireGuardError(f"{ifname}: no such link")
        changes: dict[str, object] = {"state": "up" if up else "down"}
        if mtu is not None:
            changes["mtu"] = mtu
        try:
            await ipr.link("set", index=indexes[0], **changes)
        except NetlinkError as exc:
            raise WireGuardError(f"{ifname}: link set failed: {exc}") from exc
