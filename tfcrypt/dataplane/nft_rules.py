"""The rules of `table inet tfcrypt`, built as data: every statement tfcrypt emits is here.

Rules of this module:
- Rule construction lives here and nowhere else: `base_rules` (the prerouting dispatch and
  the egress guard) and `class_rules` (one class's chains). A new check on the ruleset
  (an anti-spoofing `fib saddr . iif` test, addresses that must never be marked) is a
  new builder here, called from `base_rules` or `class_rules`; the desired table
  (tfcrypt/dataplane/nft_desired.py) only places what these return.
- Rules are identified by their comment, `tfcrypt:<hash of the expression we emit>`, never
  by parsing nft's rendering of an expression back (nft normalises what it prints). A rule
  whose expression changes gets a new comment, hence is replaced.
- Classification: one verdict-map lookup on the local address picks the class chain; the
  chain has one rule per selector of the class (per family), each one set lookup on the
  remote address, the first match marks (or drops) and returns. Sets are per remote
  SELECTOR, not per class: a remote address is in the few selector sets that hold it, not
  repeated in every class that selects it (docs/policy.md, "Scale": 0.34 M elements instead
  of 3.4 M at 1,000 nodes). Per packet the cost is bounded by the class's selector count
  (~20-30 at that scale), independent of the number of workloads.
- The egress guard drops a packet carrying our mark that is about to leave by any
  interface but the tunnel.
- TCP SYNs leaving by the tunnel get their MSS clamped to the tunnel's route (`rt mtu`),
  in the egress guard's chain (postrouting: the route is known), so selected connections
  never depend on ICMP frag-needed (issue #18 item 2).
- Anti-spoofing on the selected path: a class chain's match does not mark by itself, it
  `goto`s the `selected` chain, whose first rule drops (counted in `spoof_drops`) a
  packet whose source address does not route back through the interface it arrived on
  (`fib saddr . iif oif missing`: the lookup of the source, restricted to the input
  interface, finds no route), and whose second rule marks. So the tunnel only carries a
  workload's own address: an unselected workload on the same node that wears a selected
  neighbour's address is dropped before it is marked, instead of being carried inside
  the tunnel and delivered with the neighbour's identity (issue #14 item 7). The check
  runs once per selected packet and never for unselected ones; the end of `selected`
  returns to prerouting as the class chain's `return` did. Should the two rules ever be
  reordered (a hand deletion repaired by appending), the drop still follows the mark.
  Observe-only (`enforce=False`) tables keep counting and returning: no drop, no mark.
- Infrastructure is never classified: the one prerouting rule of each family requires
  that neither address of the packet is in `infra_v4`/`infra_v6` before it jumps to the
  family's `pre_v4`/`pre_v6`, which holds the two verdict-map lookups and is reached by
  nothing else (`ip saddr != @infra_v4 ip daddr != @infra_v4 jump pre_v4`; the test
  once a packet, not once per lookup, issue #18 item 2). So a packet to or from a node's underlay
  address, an etcd endpoint or a configured CIDR is neither marked nor dropped by strict
  ingress, whatever the selector sets and local maps hold (a workload record claiming
  such an address cannot black-hole the nodes: issue #14). The condition sits inside
  the dispatch rule rather than in `return` rules ahead of the lookups because rule order is
  not part of a rule's identity here: `add rule` appends, so a return rule added to an
  existing table (an upgrade) would land after the dispatch; a changed dispatch rule
  has a new comment and is replaced in the same transaction.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Collection

from tfcrypt.dataplane.nft_table import (
    COMMENT_PREFIX,
    EGRESS_GUARD,
    FAMILIES,
    FLOW_PROTOS_WITH_PORTS,
    FORWARD,
    MAX_MARK,
    PREROUTING,
    SELECTED,
    Fam,
    Json,
    NftDesired,
    RuleSpec,
    drop_chain,
    encoded,
    flow_set,
    fwd_chain,
    in_chain,
    infra_set,
    out_chain,
    pre_chain,
    set_name,
)


def _match(op: str, left: Json, right: object) -> Json:
    return {"match": {"op": op, "left": left, "right": right}}


def _meta(key: str) -> Json:
    return {"meta": {"key": key}}


def _addr(fam: Fam, field_: str) -> Json:
    return {"payload": {"protocol": fam.proto, "field": field_}}


def _rule(chain: str, *stmts: Json | str) -> RuleSpec:
    """A rule of `stmts` (JSON values, or their canonical encoding from `_encoded`)."""
    expr = tuple(st if isinstance(st, str) else encoded(st) for st in stmts)
    digest = hashlib.sha256("\n".join(expr).encode()).hexdigest()[:12]
    return RuleSpec(chain, COMMENT_PREFIX + digest, expr)



@functools.lru_cache(maxsize=8192)
def _set_match(proto: str, field_: str, set_ref: str) -> str:
    return encoded(_match("==", {"payload": {"protocol": proto, "field": field_}}, set_ref))


def _fib_oif_of_saddr_via_iif() -> Json:
    """`fib saddr . iif oif`: the interface a reply to the source would leave by, if that
    is the input interface, else 0 (`missing`, JSON `false`). The strict reverse-path
    test of rp_filter=1, here on the selected path only."""
    return {"fib": {"result": "oif", "flags": ["saddr", "iif"]}}


def _set_mark(mark: int, mask: int) -> Json:
    """`meta mark set meta mark | MARK`, clearing the rest of the mask first if it is wider.

    With a wider mask a plain OR could leave another of our bits set, and then neither the
    guard nor the `ip rule` (both compare `mark & mask == MARK`) would see the packet.
    """
    current: Json = _meta("mark")
    if mask != mark:
        current = {"&": [current, MAX_MARK & ~mask]}
    return {"mangle": {"key": _meta("mark"), "value": {"|": [current, mark]}}}


def class_rules(key: str, selectors: Collection[str], d: NftDesired, mask: int
                 ) -> list[RuleSpec]:
    """One rule per selector and family in each of the class's chains; the first match
    acts and returns (so a packet is counted once, whatever number of selectors hold it).
    Statements are encoded once per class (the set matches once per selector)."""
    counter = encoded({"counter": {"packets": 0, "bytes": 0}})
    back = encoded({"return": None})
    selected = encoded({"goto": {"target": SELECTED}}) if d.enforce else back
    verdicts = {fam: _ingress_verdict(d, fam) for fam in FAMILIES}
    not_tunnel = encoded(_match("!=", _meta("iifname"), d.wg_ifname))
    out_name, in_name = out_chain(key), in_chain(key)
    rules: list[RuleSpec] = []
    for selector in sorted(selectors):
        for fam in FAMILIES:
            peers = "@" + set_name(selector, fam)
            rules.append(_rule(out_name, _set_match(fam.proto, "daddr", peers),
                               counter, selected))
            rules.append(_rule(in_name, not_tunnel, _set_match(fam.proto, "saddr", peers),
                               *verdicts[fam]))
    return rules


def _ingress_verdict(d: NftDesired, fam: Fam) -> list[str]:
    """Strict ingress: drop (counted in its flow set first, when flows are on), or in
    observe mode count and return."""
    if not d.enforce:
        return [encoded({"counter": "ingress_audit"}), encoded({"return": None})]
    if d.flows is not None:
        return [encoded({"goto": {"target": drop_chain(fam)}})]
    return [encoded({"counter": "ingress_drops"}), encoded({"drop": None})]


def _has_ports(ports: bool) -> Json:
    return _match("==" if ports else "!=", _meta("l4proto"),
                  {"set": list(FLOW_PROTOS_WITH_PORTS)})


def _count_flow(name: str, fam: Fam, ports: bool, iface: str | None) -> Json:
    """`update @name { saddr . daddr . l4proto [. th dport] [. iface] counter }`: the
    flow's element (added if new, its timeout refreshed) and its counter."""
    key: list[Json] = [_addr(fam, "saddr"), _addr(fam, "daddr"), _meta("l4proto")]
    if ports:
        key.append({"payload": {"protocol": "th", "field": "dport"}})
    if iface is not None:
        key.append(_meta(iface))
    return {"set": {"op": "update", "elem": {"concat": key}, "set": "@" + name,
                    "stmt": [{"counter": None}]}}


def flow_rules(d: NftDesired, mask: int) -> list[RuleSpec]:
    """The forward chain's dispatch, the accounting rules, and the strict-ingress drop
    chains (enforce mode); empty when flows are off."""
    if d.flows is None:
        return []
    marked = {"&": [_meta("mark"), mask]}
    rules = []
    for fam in FAMILIES:
        rules.append(_rule(FORWARD, *not_infrastructure(fam),
                           {"jump": {"target": fwd_chain(fam)}}))
        for kind, op, iface in (("sel", "==", "oifname"), ("uns", "!=", "iifname")):
            for ports in (True, False):
                rules.append(_rule(fwd_chain(fam), _match(op, marked, d.mark),
                                   _has_ports(ports),
                                   _count_flow(flow_set(kind, fam, ports), fam, ports, iface)))
        if d.enforce:
            for ports in (True, False):
                rules.append(_rule(drop_chain(fam), _has_ports(ports),
                                   _count_flow(flow_set("drop", fam, ports), fam, ports, None)))
            rules.append(_rule(drop_chain(fam), {"counter": "ingress_drops"}, {"drop": None}))
    return rules


def not_infrastructure(fam: Fam) -> list[Json]:
    """Neither address of the packet is infrastructure (the `infra_*` interval sets)."""
    infra = "@" + infra_set(fam)
    return [_match("!=", _addr(fam, "saddr"), infra), _match("!=", _addr(fam, "daddr"), infra)]


def base_rules(d: NftDesired, mask: int) -> list[RuleSpec]:
    rules = []
    for fam in FAMILIES:  # the infrastructure test once a packet, then both lookups
        rules.append(_rule(PREROUTING, *not_infrastructure(fam),
                           {"jump": {"target": pre_chain(fam)}}))
        for direction, field_ in (("out", "saddr"), ("in", "daddr")):
            vmap = {"vmap": {"key": _addr(fam, field_), "data": f"@{direction}_{fam.suffix}"}}
            rules.append(_rule(pre_chain(fam), vmap))
    if d.enforce:  # observe-only: nothing jumps here, and the chain stays empty
        rules.append(_rule(SELECTED, _match("==", _fib_oif_of_saddr_via_iif(), False),
                           {"counter": "spoof_drops"}, {"drop": None}))
        rules.append(_rule(SELECTED, _set_mark(d.mark, mask)))
    rules.append(
        _rule(
            EGRESS_GUARD,
            _match("==", {"&": [_meta("mark"), mask]}, d.mark),
            _match("!=", _meta("oifname"), d.wg_ifname),
            {"counter": "guard_drops"},
            {"drop": None},
        )
    )
    rules.append(_mss_clamp(d.wg_ifname))
    return rules + flow_rules(d, mask)


def _mss_clamp(wg_ifname: str) -> RuleSpec:
    """`oifname WG tcp flags syn / syn,rst tcp option maxseg size set rt mtu`.

    A workload behind a 1500-byte veth offers MSS 1460, and its selected packets then
    meet the tunnel's 1420: without this the connection depends on ICMP frag-needed
    reaching the workload (a firewall that drops ICMP stalls it). `rt mtu` is the MSS of
    the route the SYN takes (its MTU less the IPv4 or IPv6 and TCP headers), and the kernel
    only ever lowers an MSS option, never raises it. Only SYNs leaving by the tunnel are
    touched: unselected connections keep what they offered. A connection that becomes
    selected after its handshake keeps its MSS and relies on path MTU discovery."""
    return _rule(
        EGRESS_GUARD,
        _match("==", _meta("oifname"), wg_ifname),
        _match("==", {"&": [{"payload": {"protocol": "tcp", "field": "flags"}},
                            ["syn", "rst"]]}, "syn"),
        {"mangle": {"key": {"tcp option": {"name": "maxseg", "field": "size"}},
                    "value": {"rt": {"key": "mtu"}}}},
    )
