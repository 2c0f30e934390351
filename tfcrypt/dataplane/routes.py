"""Routes of tfcrypt's own table: each selected destination points at the WireGuard device.

Rules of this module:
- Ownership is (table, proto): only routes in our table that carry our rtproto are read
  as ours, replaced or deleted. Any other route in the table is left alone, also when it
  clashes with one we want (the clash is reported, never overwritten).
- One path for IPv4 and IPv6: the family follows from the destination.
- Keys are canonical CIDR strings (`str(ip_network(...))`); values are the full kernel
  route, so "nothing to do" is `==` and a second apply makes no change.
- Decide, then act: the plan is built with no await in between; every kernel write is
  shielded from cancellation; a failed item stays pending and the next apply re-reads the
  kernel and tries again.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from tfcrypt.dataplane.delta import DeltaTracker
from tfcrypt.dataplane.netlink import (
    RT_SCOPE_LINK,
    RT_SCOPE_UNIVERSE,
    Family,
    KernelRoute,
    Netlink,
    NetlinkError,
    RouteType,
)
from tfcrypt.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_TABLE = 29798
"""0x7466 ("tf"): clear of wg-quick's 51820+, Calico's 1-250 and the kernel's 253-255."""
DEFAULT_PROTO = 92
"""0x5c: not an RTPROT_* value of the kernel nor an entry of iproute2's rt_protos."""

_DEFAULT_METRIC = {Family.V4: 0, Family.V6: 1024}
_GONE = (errno.ESRCH, errno.ENOENT)


@dataclass(frozen=True)
class RouteSpec:
    """A desired route: unicast via `dev` (None = the manager's interface) or a reject type.

    `metric` None means the kernel's default for the family (0 for IPv4, 1024 for IPv6).
    """

    type: RouteType = RouteType.UNICAST
    dev: str | None = None
    metric: int | None = None


@dataclass(frozen=True)
class ItemError:
    key: str
    message: str


@dataclass(frozen=True)
class ApplyReport:
    """What one apply did: `ops` kernel changes made, `errors` items left pending."""

    ops: int
    errors: tuple[ItemError, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.errors


def parse_routes(routes: Iterable[str] | Mapping[str, RouteSpec]) -> dict[str, RouteSpec]:
    """Canonical CIDR -> spec; plain CIDR strings mean "unicast via our interface"."""
    pairs = routes.items() if isinstance(routes, Mapping) else ((d, RouteSpec()) for d in routes)
    out: dict[str, RouteSpec] = {}
    for dst, spec in pairs:
        try:
            key = str(ipaddress.ip_network(dst))
        except ValueError as exc:
            raise ConfigError(f"route destination {dst!r}: {exc}") from exc
        if spec.type.rejects and spec.dev is not None:
            raise ConfigError(f"route {key}: a {spec.type.name.lower()} route has no device")
        if not spec.type.rejects and spec.type != RouteType.UNICAST:
            raise ConfigError(f"route {key}: type {spec.type.name.lower()} is not supported")
        out[key] = spec
    return out


class RouteManager:
    """Reconciles the routes of one table with the routes tfcrypt wants there.

    Order: when adding, apply routes before the rule that sends traffic to them (a rule
    pointing at an empty table only falls through); when removing, remove the rule first,
    then the routes. The cross-reconciler order lives in the agent.

    Pitfalls:
    - A vanished device takes its routes with it (wireguard-go exiting removes its tun):
      while the device is missing its routes are reported pending with an error, and the
      first apply after it is back re-adds them.
    - IPv4 reports "no metric" as 0, IPv6 as 1024: desired metrics are normalised to what
      the kernel will report, or every apply would see a difference.
    - A metric change is a different kernel route: the new one is added before the old
      one is deleted, so the destination is never without a route.
    """

    def __init__(
        self,
        netlink: Netlink,
        ifname: str,
        table: int = DEFAULT_TABLE,
        proto: int = DEFAULT_PROTO,
    ) -> None:
        if not 1 <= table <= 0xFFFFFFFF or table in (253, 254, 255):
            raise ConfigError(f"route table {table}: must be a free table id")
        if not 5 <= proto <= 255:
            raise ConfigError(f"route proto {proto}: 0-4 belong to the kernel, max 255")
        self.ifname = ifname
        self.table = table
        self.proto = proto
        self._netlink = netlink
        self._desired: dict[str, RouteSpec] = {}
        self._tracker: DeltaTracker[str, KernelRoute] = DeltaTracker()
        self._blocked: frozenset[str] = frozenset()

    def __repr__(self) -> str:
        return (
            f"RouteManager(ifname={self.ifname!r}, table={self.table}, proto={self.proto}, "
            f"desired={len(self._desired)}, pending={len(self.pending)})"
        )

    def set_desired(self, routes: Iterable[str] | Mapping[str, RouteSpec]) -> None:
        """Record intent (no I/O); a mapping also allows reject routes and metrics."""
        self._desired = parse_routes(routes)

    @property
    def desired(self) -> Mapping[str, RouteSpec]:
        return dict(self._desired)

    @property
    def pending(self) -> frozenset[str]:
        """Destinations whose kernel state differed from desired after the last apply."""
        plan = self._tracker.plan()
        return frozenset(plan.upserts) | plan.deletions | self._blocked

    async def apply(self) -> ApplyReport:
        devs = {s.dev or self.ifname for s in self._desired.values() if not s.type.rejects}
        index = {dev: await self._netlink.link_index(dev) for dev in sorted(devs)}
        actual = [
            route
            for family in Family
            for route in await self._netlink.routes(family, self.table)
            if route.proto == self.proto
        ]

        errors, current, extras = self._plan(index, actual)
        plan = self._tracker.plan(owned=frozenset(current) - self._blocked)

        ops = 0
        for dst, route in sorted(plan.upserts.items()):
            old = current.get(dst)
            in_place = old is not None and old.metric == route.metric
            try:
                await asyncio.shield(self._netlink.route_add(route, replace=in_place))
            except NetlinkError as exc:
                errors.append(ItemError(dst, str(exc)))
                continue
            ops += 1
            self._tracker.applied_upsert(dst)
            if old is not None and not in_place:
                extras.append(old)
        for dst in sorted(plan.deletions):
            if await self._delete(current[dst], errors):
                self._tracker.applied_delete(dst)
                ops += 1
        for route in extras:
            ops += await self._delete(route, errors)

        for error in errors:
            log.warning("route table %d: %s: %s", self.table, error.key, error.message)
        return ApplyReport(ops, tuple(errors))

    def _plan(
        self, index: Mapping[str, int | None], actual: list[KernelRoute]
    ) -> tuple[list[ItemError], dict[str, KernelRoute], list[KernelRoute]]:
        """Resolve desired routes and pick one actual route per destination; no I/O."""
        errors: list[ItemError] = []
        resolved: dict[str, KernelRoute] = {}
        for dst, spec in self._desired.items():
            route = self._kernel_route(dst, spec, index)
            if route is None:
                dev = spec.dev or self.ifname
                errors.append(ItemError(dst, f"device {dev} does not exist; route pending"))
            else:
                resolved[dst] = route
        self._blocked = frozenset(self._desired) - frozenset(resolved)

        by_dst: dict[str, list[KernelRoute]] = {}
        for route in actual:
            by_dst.setdefault(route.dst, []).append(route)
        current: dict[str, KernelRoute] = {}
        extras: list[KernelRoute] = []
        for dst, routes in by_dst.items():
            want = resolved.get(dst)
            keep = want if want in routes else routes[0]
            current[dst] = keep
            extras.extend(r for r in routes if r != keep)

        self._tracker.set_desired(resolved)
        self._tracker.load_actual(current.items())
        return errors, current, extras

    def _kernel_route(
        self, dst: str, spec: RouteSpec, index: Mapping[str, int | None]
    ) -> KernelRoute | None:
        family = Family.of(dst)
        metric = spec.metric or _DEFAULT_METRIC[family]
        if spec.type.rejects:
            oif, scope = None, RT_SCOPE_UNIVERSE
        else:
            oif = index.get(spec.dev or self.ifname)
            if oif is None:
                return None
            scope = RT_SCOPE_LINK if family == Family.V4 else RT_SCOPE_UNIVERSE
        return KernelRoute(family, dst, self.table, self.proto, spec.type, oif, metric, scope)

    async def _delete(self, route: KernelRoute, errors: list[ItemError]) -> bool:
        """True if the route is gone; a route that vanished on its own counts as gone."""
        try:
            await asyncio.shield(self._netlink.route_del(route))
        except NetlinkError as exc:
            if exc.errno in _GONE:
                return True
            errors.append(ItemError(route.dst, str(exc)))
            return False
        return True
