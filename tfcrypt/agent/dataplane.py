"""The node's dataplane as one object: every reconciler, and the order they apply in.

Apply order, and why (the security argument lives here, in one place):
1. Fail-closed routing: table FAILCLOSED holds `prohibit default` (v4 and v6) and a rule
   one priority after the tunnel rule sends marked packets there. A marked packet whose
   tunnel route is missing (device vanished, route not yet there) is refused instead of
   falling through to the main table in plaintext.
2. The WireGuard device and its peers: a peer's allowed IPs are in place before any
   packet is steered to it.
3. Tunnel routing: table TUNNEL holds `default dev <wg>` and the tunnel rule sends marked
   packets there.
4. nftables last: classification (the marks), the egress guard and strict ingress are
   one atomic transaction, so marks never exist without the guard that drops a marked
   packet about to leave by any interface but the tunnel.
A pair that becomes unselected loses its allowed IP in step 2 before its mark goes in
step 4: in between, its packets are dropped by WireGuard (no peer), never sent in clear.
Each reconciler keeps failed items pending; a failure of one does not stop the others,
because each layer on its own is fail-closed.

What an incremental apply skips (O(change), bench C3): the route and rule managers, whose
desired state never changes, once they applied cleanly; they are re-read on every full
apply, which the agent runs on the periodic resync and on any kernel event it did not
cause (a route, rule or link deleted by hand is such an event, even inside the window
where events are taken for our own). And the WireGuard peer configs of peers whose
desired state is unchanged are reused, not rebuilt (999 peers cost ~20 ms to rebuild).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tfcrypt.core.compute import Desired, PeerDesired
from tfcrypt.dataplane.netlink import Family, Netlink, RouteType
from tfcrypt.dataplane.nft_table import FlowAccounting, NftDesired
from tfcrypt.dataplane.nftables import NftManager
from tfcrypt.dataplane.routes import RouteManager, RouteSpec
from tfcrypt.dataplane.rules import RuleManager
from tfcrypt.wireguard.device import WireGuardManager
from tfcrypt.wireguard.model import DesiredDevice, PeerConfig

DEFAULTS = ("0.0.0.0/0", "::/0")


@dataclass(frozen=True)
class RoutingConfig:
    ifname: str = "tfcrypt0"
    tunnel_table: int = 29798
    failclosed_table: int = 29799
    rule_priority: int = 1820
    mark: int = 0x00100000
    mask: int = 0x00100000


@dataclass
class ApplyResult:
    ops: int = 0
    errors: list[str] = field(default_factory=list)
    changed: dict[str, int] = field(default_factory=dict)
    failed: set[str] = field(default_factory=set)  # reconcilers that left items pending


class Dataplane:
    def __init__(self, wireguard: WireGuardManager, nft: NftManager, netlink: Netlink,
                 routing: RoutingConfig, flows: FlowAccounting | None = None) -> None:
        r = routing
        self.flows = flows  # flow accounting in the nft table (docs/flows.md); None: off
        self.routing = r
        self.netlink = netlink
        self.wireguard = wireguard
        self.nft = nft
        self.failclosed_routes = RouteManager(netlink, r.ifname, table=r.failclosed_table)
        priorities = (r.rule_priority, r.rule_priority + 1)
        self.failclosed_rule = RuleManager(netlink, priority=r.rule_priority + 1,
                                           table=r.failclosed_table, fwmark=r.mark,
                                           mask=r.mask, families=(Family.V4, Family.V6),
                                           siblings=priorities)
        self.tunnel_routes = RouteManager(netlink, r.ifname, table=r.tunnel_table)
        self.tunnel_rule = RuleManager(netlink, priority=r.rule_priority,
                                       table=r.tunnel_table, fwmark=r.mark, mask=r.mask,
                                       families=(Family.V4, Family.V6), siblings=priorities)
        self._settled: set[str] = set()  # route/rule managers whose last apply was clean
        self._peer_configs: dict[str, tuple[PeerDesired, int, PeerConfig]] = {}

    def set_desired(self, desired: Desired, *, private_key_b64: str, listen_port: int,
                    mtu: int, keepalive: int = 0) -> None:
        """`keepalive` > 0 also makes WireGuard send a keepalive to a peer as soon as it
        is configured: the side that learns of a new peer (or a new key) last starts the
        handshake at once, instead of the other side retrying after REKEY_TIMEOUT (5 s).
        """
        r = self.routing
        self.failclosed_routes.set_desired(
            {cidr: RouteSpec(type=RouteType.PROHIBIT) for cidr in DEFAULTS})
        self.failclosed_rule.set_desired(True)
        self.wireguard.set_desired(DesiredDevice(
            private_key_b64=private_key_b64, listen_port=listen_port, mtu=mtu,
            peers=self._peer_configs_for(desired, keepalive)))
        self.tunnel_routes.set_desired(DEFAULTS)
        self.tunnel_rule.set_desired(True)
        self.nft.set_desired(NftDesired(
            local_class=desired.local_class, class_selectors=desired.class_selectors,
            selector_ips=desired.selector_ips,
            mark=r.mark, mask=r.mask, wg_ifname=r.ifname,
            infrastructure=desired.infrastructure, flows=self.flows))

    def _peer_configs_for(self, desired: Desired, keepalive: int) -> dict[str, PeerConfig]:
        """PeerConfigs (which normalise their CIDRs) built only for peers that changed."""
        known, configs = self._peer_configs, {}
        kept: dict[str, tuple[PeerDesired, int, PeerConfig]] = {}
        for key, peer in desired.peers.items():
            last = known.get(key)
            if last is not None and last[1] == keepalive and (last[0] is peer or last[0] == peer):
                config = last[2]
            else:
                config = PeerConfig(public_key=key, endpoint=peer.endpoint,
                                    allowed_ips=peer.allowed_ips,
                                    persistent_keepalive=keepalive)
            configs[key] = config
            kept[key] = (peer, keepalive, config)
        self._peer_configs = kept
        return configs

    def _in_order(self) -> tuple[tuple[str, object], ...]:
        return (("failclosed routes", self.failclosed_routes),
                ("failclosed rule", self.failclosed_rule),
                ("wireguard", self.wireguard),
                ("tunnel routes", self.tunnel_routes),
                ("tunnel rule", self.tunnel_rule),
                ("nftables", self.nft))

    async def apply(self, full: bool = False) -> ApplyResult:
        """Apply in order. `full` makes every manager read the kernel and repair drift;
        otherwise WireGuard and nftables apply only what changed since their last known
        state (O(change), not O(table)) and settled route and rule managers are skipped."""
        result = ApplyResult()
        for name, manager in self._in_order():
            if manager is self.wireguard or manager is self.nft:
                report = await manager.apply(full=full)  # type: ignore[attr-defined]
            elif not full and name in self._settled:
                continue
            else:
                report = await manager.apply()  # type: ignore[attr-defined]
                if report.errors:
                    self._settled.discard(name)
                else:
                    self._settled.add(name)
            result.ops += report.ops
            if report.ops:
                result.changed[name] = report.ops
            result.errors += [f"{name}: {e}" for e in report.errors]
            if report.errors:
                result.failed.add(name)
        return result
