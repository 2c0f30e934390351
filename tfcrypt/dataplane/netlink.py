"""The netlink calls the route and rule reconcilers need, behind one small Protocol.

Rules of this module:
- Kernel objects cross this boundary as frozen values (`KernelRoute`, `KernelRule`) that
  compare with `==`; a value read from a dump can be handed back to delete exactly that
  object.
- IPv4 and IPv6 share every code path; the family is a field, never a branch in callers.
- pyroute2 errors are mapped to `NetlinkError(errno)` here and nowhere else.
- `PyRoute2Netlink` works in the network namespace it is opened in (the agent runs inside
  the node's namespace); `netns` exists so the lab tests can point it elsewhere.
- `FakeNetlink` mimics the kernel behaviour the reconcilers depend on (EEXIST on add,
  ESRCH on a missing delete, ENODEV for a missing device, a deleted device taking its
  routes with it) so reconciler tests run without root.
"""

from __future__ import annotations

import enum
import errno
import ipaddress
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol

from tfcrypt.errors import TfcryptError

RT_SCOPE_UNIVERSE = 0
RT_SCOPE_LINK = 253
RT_SCOPE_NOWHERE = 255
FR_ACT_TO_TBL = 1
_RT_TABLE_COMPAT = 252
_RTM_F_CLONED = 0x200
_UNSET_U32 = 0xFFFFFFFF


class Family(enum.IntEnum):
    V4 = socket.AF_INET
    V6 = socket.AF_INET6

    @classmethod
    def of(cls, cidr: str) -> Family:
        return cls.V4 if ipaddress.ip_network(cidr).version == 4 else cls.V6


class RouteType(enum.IntEnum):
    """rtm_type values; the reject types are the fail-closed layer after a table lookup."""

    UNSPEC = 0
    UNICAST = 1
    LOCAL = 2
    BROADCAST = 3
    ANYCAST = 4
    MULTICAST = 5
    BLACKHOLE = 6
    UNREACHABLE = 7
    PROHIBIT = 8
    THROW = 9
    NAT = 10
    XRESOLVE = 11

    @property
    def rejects(self) -> bool:
        return self in (RouteType.BLACKHOLE, RouteType.UNREACHABLE, RouteType.PROHIBIT)


@dataclass(frozen=True)
class KernelRoute:
    """One route as the kernel keys and reports it; `oif` is None for reject types."""

    family: Family
    dst: str
    table: int
    proto: int
    type: RouteType
    oif: int | None
    metric: int
    scope: int


@dataclass(frozen=True)
class KernelRule:
    """One policy routing rule.

    `extra` holds every selector tfcrypt does not model (src, iif, uidrange, invert ...)
    as (name, value) pairs: a foreign rule with such a selector never equals ours, and
    deleting it sends the same selectors so the kernel removes that rule and not ours.
    `proto` is None when the kernel does not report rule protocols (before Linux 4.17).
    """

    family: Family
    priority: int
    table: int
    fwmark: int | None = None
    mask: int | None = None
    proto: int | None = None
    action: int = FR_ACT_TO_TBL
    extra: tuple[tuple[str, Any], ...] = ()


class NetlinkError(TfcryptError):
    """A netlink request the kernel refused; `errno` says why (EEXIST, ESRCH, ENODEV...)."""

    def __init__(self, code: int, what: str) -> None:
        super().__init__(f"{what}: {os.strerror(code)}")
        self.errno = code


class Netlink(Protocol):
    async def link_index(self, ifname: str) -> int | None: ...

    async def address_mtu(self, address: str) -> int | None:
        """The MTU of the interface that holds `address` (None: no interface has it)."""
        ...

    async def routes(self, family: Family, table: int) -> list[KernelRoute]:
        """Every route of `table` in `family`, whoever owns it."""
        ...

    async def route_add(self, route: KernelRoute, *, replace: bool = False) -> None: ...

    async def route_del(self, route: KernelRoute) -> None: ...

    async def rules(self, family: Family) -> list[KernelRule]:
        """Every rule of `family` in kernel order (by priority, then insertion)."""
        ...

    async def rule_add(self, rule: KernelRule) -> None: ...

    async def rule_del(self, rule: KernelRule) -> None: ...

    async def aclose(self) -> None: ...


Failure = Callable[[str, object], int | None]


class FakeNetlink:
    """In-memory kernel for reconciler tests.

    `failure(op, obj) -> errno | None` injects errors for chosen operations ("route_add",
    "route_del", "rule_add", "rule_del"); `writes` counts successful changes.
    """

    def __init__(self) -> None:
        self.links: dict[str, int] = {}
        self.address_mtus: dict[str, int] = {}
        self.route_table: list[KernelRoute] = []
        self.rule_list: list[KernelRule] = []
        self.failure: Failure | None = None
        self.writes = 0
        self._next_index = 2

    def add_link(self, ifname: str) -> int:
        self.links[ifname] = self._next_index
        self._next_index += 1
        return self.links[ifname]

    def del_link(self, ifname: str) -> None:
        index = self.links.pop(ifname)
        self.route_table = [r for r in self.route_table if r.oif != index]

    def _check(self, op: str, obj: object) -> None:
        code = self.failure(op, obj) if self.failure else None
        if code:
            raise NetlinkError(code, f"{op} {obj}")

    async def link_index(self, ifname: str) -> int | None:
        return self.links.get(ifname)

    async def address_mtu(self, address: str) -> int | None:
        return self.address_mtus.get(address)

    async def routes(self, family: Family, table: int) -> list[KernelRoute]:
        mine = [r for r in self.route_table if r.family == family and r.table == table]
        return sorted(mine, key=_route_slot)

    async def route_add(self, route: KernelRoute, *, replace: bool = False) -> None:
        self._check("route_add", route)
        if route.oif is not None and route.oif not in self.links.values():
            raise NetlinkError(errno.ENODEV, f"route_add {route}")
        same = [r for r in self.route_table if _route_slot(r) == _route_slot(route)]
        if same and not replace:
            raise NetlinkError(errno.EEXIST, f"route_add {route}")
        if same:
            self.route_table.remove(same[0])
        self.route_table.append(route)
        self.writes += 1

    async def route_del(self, route: KernelRoute) -> None:
        self._check("route_del", route)
        if route not in self.route_table:
            raise NetlinkError(errno.ESRCH, f"route_del {route}")
        self.route_table.remove(route)
        self.writes += 1

    async def rules(self, family: Family) -> list[KernelRule]:
        return sorted((r for r in self.rule_list if r.family == family), key=lambda r: r.priority)

    async def rule_add(self, rule: KernelRule) -> None:
        self._check("rule_add", rule)
        if rule in self.rule_list:
            raise NetlinkError(errno.EEXIST, f"rule_add {rule}")
        self.rule_list.append(rule)
        self.writes += 1

    async def rule_del(self, rule: KernelRule) -> None:
        self._check("rule_del", rule)
        if rule not in self.rule_list:
            raise NetlinkError(errno.ENOENT, f"rule_del {rule}")
        self.rule_list.remove(rule)
        self.writes += 1

    async def aclose(self) -> None:
        return None


def _route_slot(route: KernelRoute) -> tuple[object, ...]:
    """What the kernel treats as the same route for EEXIST/replace: table, dst, metric."""
    return (route.family, route.table, route.dst, route.metric)


class PyRoute2Netlink:
    """The real kernel, through one pyroute2 `AsyncIPRoute` socket.

    Pitfalls: the socket binds to the running event loop, so it is opened on first use
    inside the loop, not in `__init__`; route dumps are not filtered by the kernel, so a
    big main table costs a full dump per apply; tables above 255 travel in RTA_TABLE /
    FRA_TABLE with the header field set to RT_TABLE_COMPAT.
    """

    def __init__(self, netns: str | None = None) -> None:
        self._netns = netns
        self._ipr: Any = None
        self._rule_proto = True

    async def _sock(self) -> Any:
        if self._ipr is None:
            from pyroute2 import AsyncIPRoute

            self._ipr = AsyncIPRoute(netns=self._netns) if self._netns else AsyncIPRoute()
        return self._ipr

    async def _request(self, what: str, msg: Any, msg_type: int, flags: int) -> list[Any]:
        from pyroute2.netlink.exceptions import NetlinkError as PyNetlinkError

        ipr = await self._sock()
        try:
            return [m async for m in await ipr.nlm_request(msg, msg_type, flags)]
        except PyNetlinkError as exc:
            raise NetlinkError(exc.code, what) from exc

    async def _write(self, what: str, msg: Any, msg_type: int, extra_flags: int) -> None:
        from pyroute2.netlink import NLM_F_ACK, NLM_F_REQUEST

        await self._request(what, msg, msg_type, NLM_F_REQUEST | NLM_F_ACK | extra_flags)

    async def _dump(self, msg: Any, msg_type: int) -> list[Any]:
        from pyroute2.netlink import NLM_F_DUMP, NLM_F_REQUEST

        return await self._request("dump", msg, msg_type, NLM_F_REQUEST | NLM_F_DUMP)

    async def link_index(self, ifname: str) -> int | None:
        found = await (await self._sock()).link_lookup(ifname=ifname)
        return found[0] if found else None

    async def address_mtu(self, address: str) -> int | None:
        from pyroute2.netlink.exceptions import NetlinkError as PyNetlinkError

        ipr = await self._sock()
        try:
            held = [a async for a in await ipr.addr("dump", address=address)]
            if not held:
                return None
            links = await ipr.link("get", index=held[0]["index"])
        except PyNetlinkError as exc:
            raise NetlinkError(exc.code, f"mtu of the interface holding {address}") from exc
        mtu = links[0].get("IFLA_MTU") if links else None
        return int(mtu) if mtu else None

    async def routes(self, family: Family, table: int) -> list[KernelRoute]:
        from pyroute2.netlink.rtnl import RTM_GETROUTE
        from pyroute2.netlink.rtnl.rtmsg import rtmsg

        family = Family(family)
        msg = rtmsg()
        msg["family"] = family
        out = []
        for m in await self._dump(msg, RTM_GETROUTE):
            if (m.get_attr("RTA_TABLE") or m["table"]) != table or m["flags"] & _RTM_F_CLONED:
                continue
            out.append(_route_from_msg(m, family, table))
        return out

    async def route_add(self, route: KernelRoute, *, replace: bool = False) -> None:
        from pyroute2.netlink import NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE
        from pyroute2.netlink.rtnl import RTM_NEWROUTE

        flags = NLM_F_CREATE | (NLM_F_REPLACE if replace else NLM_F_EXCL)
        await self._write(f"add route {route.dst}", _route_msg(route), RTM_NEWROUTE, flags)

    async def route_del(self, route: KernelRoute) -> None:
        from pyroute2.netlink.rtnl import RTM_DELROUTE

        msg = _route_msg(replace(route, scope=RT_SCOPE_NOWHERE))
        await self._write(f"delete route {route.dst}", msg, RTM_DELROUTE, 0)

    async def rules(self, family: Family) -> list[KernelRule]:
        from pyroute2.netlink.rtnl import RTM_GETRULE
        from pyroute2.netlink.rtnl.fibmsg import fibmsg

        family = Family(family)
        msg = fibmsg()
        msg["family"] = family
        dumped = [m for m in await self._dump(msg, RTM_GETRULE) if m["family"] == family]
        self._rule_proto = any(m.get_attr("FRA_PROTOCOL") is not None for m in dumped)
        return [_rule_from_msg(m, family) for m in dumped]

    async def rule_add(self, rule: KernelRule) -> None:
        from pyroute2.netlink import NLM_F_CREATE, NLM_F_EXCL
        from pyroute2.netlink.rtnl import RTM_NEWRULE

        msg = _rule_msg(rule, self._rule_proto)
        await self._write(f"add rule {rule.priority}", msg, RTM_NEWRULE, NLM_F_CREATE | NLM_F_EXCL)

    async def rule_del(self, rule: KernelRule) -> None:
        from pyroute2.netlink.rtnl import RTM_DELRULE

        msg = _rule_msg(rule, self._rule_proto)
        await self._write(f"delete rule {rule.priority}", msg, RTM_DELRULE, 0)

    async def aclose(self) -> None:
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None


def _route_from_msg(m: Any, family: Family, table: int) -> KernelRoute:
    dst = m.get_attr("RTA_DST") or ("0.0.0.0" if family == Family.V4 else "::")
    kind = RouteType(m["type"])
    return KernelRoute(
        family=family,
        dst=str(ipaddress.ip_network(f"{dst}/{m['dst_len']}")),
        table=table,
        proto=m["proto"],
        type=kind,
        oif=m.get_attr("RTA_OIF") if kind == RouteType.UNICAST else None,
        metric=m.get_attr("RTA_PRIORITY") or 0,
        scope=m["scope"],
    )


def _route_msg(route: KernelRoute) -> Any:
    from pyroute2.netlink.rtnl.rtmsg import rtmsg

    network = ipaddress.ip_network(route.dst)
    msg = rtmsg()
    msg["family"] = route.family
    msg["dst_len"] = network.prefixlen
    msg["table"] = route.table if route.table < 256 else _RT_TABLE_COMPAT
    msg["proto"] = route.proto
    msg["scope"] = route.scope
    msg["type"] = route.type
    attrs: list[list[Any]] = [["RTA_TABLE", route.table], ["RTA_PRIORITY", route.metric]]
    if network.prefixlen:
        attrs.append(["RTA_DST", str(network.network_address)])
    if route.oif is not None:
        attrs.append(["RTA_OIF", route.oif])
    msg["attrs"] = attrs
    return msg


_RULE_HEADER = ("dst_len", "src_len", "tos", "flags")
_RULE_MODELLED = {"FRA_TABLE", "FRA_PRIORITY", "FRA_FWMARK", "FRA_FWMASK", "FRA_PROTOCOL"}
_RULE_UNSET = {"FRA_SUPPRESS_PREFIXLEN", "FRA_SUPPRESS_IFGROUP"}


def _rule_from_msg(m: Any, family: Family) -> KernelRule:
    extra: list[tuple[str, Any]] = [(k, m[k]) for k in _RULE_HEADER if m[k]]
    for name, value in m["attrs"]:
        if name in _RULE_MODELLED or name == "FRA_PAD":
            continue
        if name in _RULE_UNSET and value == _UNSET_U32:
            continue
        extra.append((name, value))
    return KernelRule(
        family=family,
        priority=m.get_attr("FRA_PRIORITY") or 0,
        table=m.get_attr("FRA_TABLE") or m["table"],
        fwmark=m.get_attr("FRA_FWMARK"),
        mask=m.get_attr("FRA_FWMASK"),
        proto=m.get_attr("FRA_PROTOCOL"),
        action=m["action"],
        extra=tuple(extra),
    )


def _rule_msg(rule: KernelRule, send_proto: bool) -> Any:
    from pyroute2.netlink.rtnl.fibmsg import fibmsg

    msg = fibmsg()
    msg["family"] = rule.family
    msg["action"] = rule.action
    msg["table"] = rule.table if rule.table < 256 else _RT_TABLE_COMPAT
    attrs: list[list[Any]] = [["FRA_TABLE", rule.table], ["FRA_PRIORITY", rule.priority]]
    if rule.fwmark is not None:
        attrs.append(["FRA_FWMARK", rule.fwmark])
    if rule.mask is not None:
        attrs.append(["FRA_FWMASK", rule.mask])
    if rule.proto is not None and send_proto:
        attrs.append(["FRA_PROTOCOL", rule.proto])
    for name, value in rule.extra:
        if name in _RULE_HEADER:
            msg[name] = value
        else:
            attrs.append([name, value])
    msg["attrs"] = attrs
    return msg
