"""The node's Dataplane as one object, over the in-memory fakes (no root): what an
incremental apply skips and what a full one repairs. The kernel-level proofs of the
same managers are in test_routes_rules.py, test_nftables.py and the lab tests."""

from __future__ import annotations

import asyncio

from test_compute import PAYMENTS_SITE, RECORDS, W, key, run, wl

from tfcrypt.agent.dataplane import Dataplane, RoutingConfig
from tfcrypt.dataplane.netlink import FakeNetlink, Family
from tfcrypt.dataplane.nft_json import FakeNft
from tfcrypt.dataplane.nftables import NftManager
from tfcrypt.wireguard import FakeBackend, WireGuardManager


class ReadCountingNetlink(FakeNetlink):
    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    async def routes(self, family: Family, table: int):  # type: ignore[no-untyped-def]
        self.reads += 1
        return await super().routes(family, table)

    async def rules(self, family: Family):  # type: ignore[no-untyped-def]
        self.reads += 1
        return await super().rules(family)


def make() -> tuple[Dataplane, ReadCountingNetlink, FakeBackend]:
    netlink, backend = ReadCountingNetlink(), FakeBackend()
    netlink.add_link("tfcrypt0")
    return (Dataplane(WireGuardManager(backend), NftManager(FakeNft()), netlink,
                      RoutingConfig()), netlink, backend)


def apply(dp: Dataplane, desired: object, full: bool = False):  # type: ignore[no-untyped-def]
    dp.set_desired(desired, private_key_b64=key(1), listen_port=51820, mtu=1420,  # type: ignore[arg-type]
                   keepalive=25)
    return asyncio.run(dp.apply(full=full))


def test_incremental_applies_skip_settled_routes_and_rules_full_ones_repair_them() -> None:
    dp, netlink, _ = make()
    first = apply(dp, run("n1", W, [PAYMENTS_SITE]))
    assert not first.errors and {"tunnel rule", "failclosed routes"} <= set(first.changed)
    rules = list(netlink.rule_list)
    assert len(rules) == 4  # tunnel and fail-closed rule, v4 and v6

    reads = netlink.reads
    moved = [*W, wl("n2-w9", "n2", "10.200.2.99", tags="application=db site=a")]
    second = apply(dp, run("n1", moved, [PAYMENTS_SITE]))
    assert not second.errors and netlink.reads == reads, "routes and rules were re-read"
    assert set(second.changed) <= {"wireguard", "nftables"}

    netlink.rule_list.remove(rules[0])  # by hand; the agent's monitor asks for a full apply
    repaired = apply(dp, run("n1", moved, [PAYMENTS_SITE]), full=True)
    assert netlink.reads > reads and repaired.changed.get("tunnel rule", 0) + (
        repaired.changed.get("failclosed rule", 0)) == 1
    assert sorted(map(repr, netlink.rule_list)) == sorted(map(repr, rules))


def test_unchanged_peers_keep_their_config_objects() -> None:
    dp, _, backend = make()
    apply(dp, run("n1", W, [PAYMENTS_SITE]))
    before = dict(dp.wireguard.desired.peers)  # type: ignore[union-attr]
    moved = [*W, wl("n2-w9", "n2", "10.200.2.99", tags="application=db site=a")]
    apply(dp, run("n1", moved, [PAYMENTS_SITE]))
    after = dp.wireguard.desired.peers  # type: ignore[union-attr]
    n2, n3 = RECORDS["n2"].wg_public_key, RECORDS["n3"].wg_public_key
    assert after[n3] is before[n3]  # untouched peer: the same config, not rebuilt
    assert after[n2] is not before[n2] and "10.200.2.99/32" in after[n2].allowed_ips
    assert backend.peers[n2].allowed_ips == after[n2].allowed_ips
