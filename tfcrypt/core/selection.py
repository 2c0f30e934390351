"""Which flows an encryption policy selects: the plain definition and one node's fast form.

Rules (DESIGN.md, "Policy model"; docs/policy.md):
- A flow between IP x of workload a and IP y of workload b is selected iff a and b are on
  different nodes and some rule of a policy in the wanted mode matches it either way round
  ((a,x) in endpoint1 and (b,y) in endpoint2, or the reverse), with every match_tags type
  carried by both with the same value. Union over rules and policies: adding a policy only
  ever adds pairs.
- Endpoint: tags -> the workload carries all of them (a `label=v` tag: v is one of its
  labels); subnet -> the IP lies in it; any -> always.
- An IP claimed by several workloads belongs to each of them for selection (selection can
  only add encryption); who gets it as an allowed IP is compute's decision.
- `is_selected_pairwise` is the definition, written for clarity; tests use it as the oracle.
- `classify` is the fast form for one node. Each local IP gets a class: the set of its
  memberships (policy, rule index, side, the local values of the rule's match_tags
  types). The class key is a hash of that set alone, never of remote content, so a change
  on another node changes set elements, never class identities; identical memberships
  share a class. Each membership has a remote SELECTOR (the other endpoint plus the local
  match_tags values); a class selects the union of its selectors' results. Results are
  found through an index of the remote workloads (a `SelectorIndex`: RemoteIndex in
  tfcrypt/core/remote_index.py, or InventoryIndex in tfcrypt/core/inventory_index.py),
  never by a pairwise loop, and kept per selector: the union per class is never built
  outside tests and explain (at scale it would repeat each remote IP in ~30 classes).
  Selector names hash the selector alone, so they too are stable under remote churn.
- Union sizes (pair counts, audit counts) are counted without unions
  (tfcrypt/core/counting.py).
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from tfcrypt.core.counting import union_of, union_sizes
from tfcrypt.model.policy import EncryptionPolicy, Endpoint, Mode, Rule
from tfcrypt.model.workload import Workload, network_span

CLASS_KEY_PREFIX = "c"
SELECTOR_KEY_PREFIX = "s"
CLASS_KEY_HEX = 10


def endpoint_matches(endpoint: Endpoint, workload: Workload, ip: str) -> bool:
    """Whether (workload, ip) is in `endpoint`."""
    if endpoint.tags is not None:
        return endpoint.tags <= workload.tags
    network = endpoint.network
    if network is not None:
        return ipaddress.ip_address(ip) in network
    return True


def match_tags_hold(rule: Rule, a: Workload, b: Workload) -> bool:
    """Every match_tags type is carried by both workloads, with the same value."""
    for tag_type in rule.match_tags:
        value = a.tag_value(tag_type)
        if value is None or value != b.tag_value(tag_type):
            return False
    return True


def rule_matches(rule: Rule, a: Workload, x: str, b: Workload, y: str) -> bool:
    """The rule selects (a,x)-(b,y), either way round (same-node is not checked here)."""
    if not match_tags_hold(rule, a, b):
        return False
    e1, e2 = rule.endpoint1, rule.endpoint2
    return ((endpoint_matches(e1, a, x) and endpoint_matches(e2, b, y))
            or (endpoint_matches(e2, a, x) and endpoint_matches(e1, b, y)))


def is_selected_pairwise(a: Workload, x: str, b: Workload, y: str,
                         policies: Iterable[EncryptionPolicy],
                         mode: Mode = Mode.ENFORCE) -> bool:
    """The definition: some `mode` rule selects the flow and it crosses nodes."""
    if a.node == b.node:
        return False
    return any(rule_matches(rule, a, x, b, y)
               for policy in policies if policy.mode is mode
               for rule in policy.rules)


@dataclass(frozen=True)
class RuleRef:
    """A rule with the name and index that identify it in memberships and explanations."""

    policy: str
    index: int
    rule: Rule
    _spans: tuple[tuple[int, int] | None, tuple[int, int] | None] = field(
        init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_spans", tuple(
            None if e.network is None else network_span(e.network)
            for e in (self.rule.endpoint1, self.rule.endpoint2)))

    def side_matches(self, side: int, workload: Workload, number: int) -> bool:
        """`endpoint_matches` for side 1 or 2 and an address given as its `ip_number`,
        with the subnet parsed once per rule."""
        endpoint = self.rule.endpoint1 if side == 1 else self.rule.endpoint2
        if endpoint.tags is not None:
            return endpoint.tags <= workload.tags
        span = self._spans[side - 1]
        return span is None or span[0] <= number <= span[1]


def rules_of(policies: Iterable[EncryptionPolicy], mode: Mode) -> tuple[RuleRef, ...]:
    """The rules of every `mode` policy, in policy-name then rule order."""
    return tuple(RuleRef(p.name, i, r)
                 for p in sorted(policies, key=lambda p: p.name) if p.mode is mode
                 for i, r in enumerate(p.rules))


@dataclass(frozen=True, order=True)
class Membership:
    """(a, x) sits on `side` of a rule; `values` are a's values of the rule's match_tags.

    The remote side of the pair must be in the other endpoint and carry these values.
    """

    policy: str
    rule: int
    side: int
    values: tuple[str, ...]


def memberships(workload: Workload, ip: str, rules: Sequence[RuleRef]) -> frozenset[Membership]:
    """Every rule side (a, ip) can stand on; a rule whose match_tags a lacks contributes none."""
    return workload_memberships(workload, rules).get(ip, frozenset())


def workload_memberships(workload: Workload, rules: Sequence[RuleRef]
                         ) -> dict[str, frozenset[Membership]]:
    """`memberships` of each of the workload's IPs that has any."""
    found: dict[str, set[Membership]] = {}
    for ref in rules:
        values: list[str] = []
        for tag_type in ref.rule.match_tags:
            value = workload.tag_value(tag_type)
            if value is None:
                break
            values.append(value)
        else:
            for ip, number in zip(workload.ips, workload.numbers, strict=True):
                for side in (1, 2):
                    if ref.side_matches(side, workload, number):
                        found.setdefault(ip, set()).add(
                            Membership(ref.policy, ref.index, side, tuple(values)))
    return {ip: frozenset(ms) for ip, ms in found.items()}


def class_key(signature: Iterable[Membership]) -> str:
    """"c" + 10 hex digits of a hash of the memberships: a valid nftables identifier."""
    text = json.dumps([[m.policy, m.rule, m.side, list(m.values)] for m in sorted(signature)],
                      separators=(",", ":"), ensure_ascii=False)
    return CLASS_KEY_PREFIX + hashlib.sha256(text.encode()).hexdigest()[:CLASS_KEY_HEX]


SelectorKey = tuple[frozenset[tuple[str, str]], str | None]


class SelectorIndex(Protocol):
    """What classify and compute ask of an index of the remote workloads: RemoteIndex
    (tfcrypt/core/remote_index.py, built from the workloads) or InventoryIndex
    (tfcrypt/core/inventory_index.py, a query over an Inventory's maintained postings)."""

    def register(self, endpoint: Endpoint, required: Iterable[tuple[str, str]]
                 ) -> SelectorKey: ...

    def result(self, key: SelectorKey) -> frozenset[str] | set[str]: ...

    def bitmap(self, key: SelectorKey) -> int: ...

    def holds(self, bitmap: int) -> Callable[[str], bool]: ...



def selector_key(endpoint: Endpoint, required: Iterable[tuple[str, str]]) -> SelectorKey:
    """The cache key of (endpoint, required tags on the remote side)."""
    wanted = set(required)
    if endpoint.tags is not None:
        wanted |= {(t.type, t.value) for t in endpoint.tags}
    return frozenset(wanted), endpoint.subnet



@dataclass(frozen=True)
class Classes:
    """One node's selection: local IP -> class key, class key -> its selectors' names,
    selector name -> the remote IPs it selects.

    A class selects the union of its selectors' sets; the union is never built here (it
    would repeat each remote IP in ~30 classes at scale): `class_peers` and `pairs` build
    it on demand, for tests, explain and small inventories. Every local IP with at least
    one membership has a class, even if its selectors select nobody today: then a remote
    workload appearing later only adds set elements. `signatures` and `selector_keys`
    (name -> SelectorKey) are how the classes were made (not compared).
    """

    local_class: Mapping[str, str]
    class_selectors: Mapping[str, frozenset[str]]
    selector_ips: Mapping[str, frozenset[str]]
    signatures: Mapping[str, frozenset[Membership]] = field(default_factory=dict,
                                                              compare=False)
    selector_keys: Mapping[str, SelectorKey] = field(default_factory=dict, compare=False)

    @property
    def class_peers(self) -> dict[str, frozenset[str]]:
        """Class key -> the union of its selectors' sets (built on demand: O(elements))."""
        return class_unions(self.class_selectors, self.selector_ips)

    def pairs(self) -> frozenset[tuple[str, str]]:
        """(local ip, remote ip) pairs; quadratic, for tests and small inventories."""
        peers = self.class_peers
        return frozenset((x, y) for x, key in self.local_class.items() for y in peers[key])

    def peers_of(self, ip: str) -> frozenset[str]:
        key = self.local_class.get(ip)
        if key is None:
            return frozenset()
        return union_of(self.selector_ips[s] for s in self.class_selectors[key])

    @property
    def pair_count(self) -> int:
        sizes = union_sizes(self.class_selectors, self.selector_ips)
        return sum(sizes[key] for key in self.local_class.values())

    def selected_remote_ips(self) -> frozenset[str]:
        """Every remote IP some class selects: the union of the selector sets."""
        return union_of(self.selector_ips.values())


def class_unions(class_selectors: Mapping[str, Iterable[str]],
                 selector_ips: Mapping[str, frozenset[str]]) -> dict[str, frozenset[str]]:
    """Class key -> the union of its selectors' sets."""
    return {key: union_of(selector_ips[s] for s in names)
            for key, names in class_selectors.items()}



def local_signatures(own_node: str, workloads: Iterable[Workload], rules: Sequence[RuleRef]
                     ) -> dict[str, frozenset[Membership]]:
    """Each local IP's signature: the memberships of every local workload claiming it."""
    signature_of: dict[str, frozenset[Membership]] = {}
    for a in workloads:
        if a.node == own_node:
            for ip, found in workload_memberships(a, rules).items():
                signature_of[ip] = signature_of.get(ip, frozenset()) | found
    return signature_of


def classify(own_node: str, workloads: Iterable[Workload], rules: Sequence[RuleRef],
             index: SelectorIndex, *, results: bool = True) -> Classes:
    """The classes of `own_node`'s IPs under `rules`, their selectors answered by `index`
    (one index can serve several rule sets).

    `results=False` leaves `selector_ips` empty and looks nothing up: for a caller that
    only counts, on `index.bitmap(key)` (compute's audit: its selectors' 114,000 result
    elements at scale were built and never read)."""
    workloads = tuple(workloads)
    signature_of = local_signatures(own_node, workloads, rules)
    by_ref = {(ref.policy, ref.index): ref.rule for ref in rules}
    selector_of: dict[Membership, SelectorKey] = {}
    keys: dict[frozenset[Membership], str] = {}
    signatures: dict[str, frozenset[Membership]] = {}
    selectors: dict[str, frozenset[SelectorKey]] = {}
    for signature in sorted(set(signature_of.values()), key=sorted):
        key = _unique_key(class_key(signature), signatures)
        keys[signature] = key
        signatures[key] = signature
        for m in signature:
            if m not in selector_of:
                wanted = remote_selector(m, by_ref[(m.policy, m.rule)])
                selector_of[m] = (index.register(*wanted) if results
                                  else selector_key(*wanted))
        selectors[key] = frozenset(selector_of[m] for m in signature)
    names = selector_names(set(selector_of.values()))
    selector_ips = ({name: frozenset(index.result(s)) for s, name in names.items()}
                    if results else {})
    return Classes(
        local_class={x: keys[s] for x, s in signature_of.items()},
        class_selectors={k: frozenset(names[s] for s in ss) for k, ss in selectors.items()},
        selector_ips=selector_ips,
        signatures=signatures,
        selector_keys={name: s for s, name in names.items()})


def selector_text(key: SelectorKey) -> str:
    """A canonical spelling of a selector key (what its name hashes)."""
    wanted, subnet = key
    return json.dumps([sorted(wanted), subnet], separators=(",", ":"), ensure_ascii=False)


def selector_name(key: SelectorKey) -> str:
    """"s" + 10 hex digits of a hash of the selector key: a valid nftables identifier that
    depends on the selector alone (required remote tags and subnet), never on its result."""
    digest = hashlib.sha256(selector_text(key).encode()).hexdigest()
    return SELECTOR_KEY_PREFIX + digest[:CLASS_KEY_HEX]


def selector_names(keys: Iterable[SelectorKey]) -> dict[SelectorKey, str]:
    """Names of `keys`; a 40-bit collision gets a `_n` suffix in selector_text order."""
    names: dict[SelectorKey, str] = {}
    taken: dict[str, SelectorKey] = {}
    for key in sorted(keys, key=selector_text):
        name = _unique_key(selector_name(key), taken)
        taken[name] = key
        names[key] = name
    return names


def remote_selector(m: Membership, rule: Rule) -> tuple[Endpoint, list[tuple[str, str]]]:
    """What the remote side of membership `m` must satisfy: the other endpoint, and the
    local values of the rule's match_tags types."""
    other = rule.endpoint2 if m.side == 1 else rule.endpoint1
    return other, list(zip(rule.match_tags, m.values, strict=True))


def _unique_key(key: str, taken: Mapping[str, object]) -> str:
    """A 40-bit hash collision between two local signatures gets a suffix (sorted order)."""
    if key not in taken:
        return key
    n = 1
    while f"{key}_{n}" in taken:
        n += 1
    return f"{key}_{n}"

