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
  share a class. Each class maps to the remote IPs selected with it, found through a tag
  index (the smallest posting list, then a subset test), never by a pairwise loop.
"""

from __future__ import annotations

import bisect
import hashlib
import ipaddress
import json
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import chain

from tfcrypt.model.policy import EncryptionPolicy, Endpoint, Mode, Rule
from tfcrypt.model.workload import Workload

CLASS_KEY_PREFIX = "c"
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
    found: set[Membership] = set()
    for ref in rules:
        values: list[str] = []
        for tag_type in ref.rule.match_tags:
            value = workload.tag_value(tag_type)
            if value is None:
                break
            values.append(value)
        else:
            for side, endpoint in ((1, ref.rule.endpoint1), (2, ref.rule.endpoint2)):
                if endpoint_matches(endpoint, workload, ip):
                    found.add(Membership(ref.policy, ref.index, side, tuple(values)))
    return frozenset(found)


def class_key(signature: Iterable[Membership]) -> str:
    """"c" + 10 hex digits of a hash of the memberships: a valid nftables identifier."""
    text = json.dumps([[m.policy, m.rule, m.side, list(m.values)] for m in sorted(signature)],
                      separators=(",", ":"), ensure_ascii=False)
    return CLASS_KEY_PREFIX + hashlib.sha256(text.encode()).hexdigest()[:CLASS_KEY_HEX]


class RemoteIndex:
    """The workloads of every node but one, indexed for `select`.

    Postings are lists of workload positions keyed by (type, value) tuples, intersected
    as C sets: at 100,000 workloads a Python-level subset test per candidate is the cost
    that matters. Results are cached per (endpoint, required tags), so rules sharing a
    selector share the work.

    Pitfall: an IP claimed by both a local and a remote workload is a remote IP here (the
    remote claim selects it); compute keeps it out of every peer's allowed IPs.
    """

    def __init__(self, own_node: str, workloads: Iterable[Workload]) -> None:
        self.own_node = own_node
        self.workloads = tuple(w for w in workloads if w.node != own_node)
        self._ips = [w.ips for w in self.workloads]
        self._postings: dict[tuple[str, str], list[int]] = defaultdict(list)
        for i, w in enumerate(self.workloads):
            for tag_key in w.tag_keys:
                self._postings[tag_key].append(i)
        self._all_ips: frozenset[str] | None = None
        self._sorted: dict[int, tuple[list[int], list[str]]] | None = None
        self._cache: dict[tuple[object, ...], frozenset[str]] = {}

    def all_ips(self) -> frozenset[str]:
        if self._all_ips is None:
            self._all_ips = frozenset(chain.from_iterable(self._ips))
        return self._all_ips

    def select(self, endpoint: Endpoint, required: Iterable[tuple[str, str]]) -> frozenset[str]:
        """Remote IPs y of workloads b with (b, y) in `endpoint` and `required` tags on b."""
        wanted = set(required)
        if endpoint.tags is not None:
            wanted |= {(t.type, t.value) for t in endpoint.tags}
        cache_key = (tuple(sorted(wanted)), endpoint.subnet)
        found = self._cache.get(cache_key)
        if found is None:
            found = self._select(wanted, endpoint.network)
            self._cache[cache_key] = found
        return found

    def _select(self, wanted: set[tuple[str, str]],
                network: ipaddress.IPv4Network | ipaddress.IPv6Network | None
                ) -> frozenset[str]:
        if not wanted:
            return self.all_ips() if network is None else self._ips_in(network)
        postings = sorted((self._postings.get(k, []) for k in wanted), key=len)
        candidates = set(postings[0]).intersection(*postings[1:])
        if network is None:
            return frozenset(chain.from_iterable(map(self._ips.__getitem__, candidates)))
        return frozenset(ip for i in candidates
                         for ip, addr in zip(self._ips[i], self.workloads[i].addresses,
                                             strict=True)
                         if addr in network)

    def _ips_in(self, network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> frozenset[str]:
        if self._sorted is None:
            pairs: dict[int, list[tuple[int, str]]] = {4: [], 6: []}
            for w in self.workloads:
                for ip, addr in zip(w.ips, w.addresses, strict=True):
                    pairs[addr.version].append((int(addr), ip))
            self._sorted = {}
            for version, items in pairs.items():
                items.sort()
                self._sorted[version] = ([n for n, _ in items], [ip for _, ip in items])
        numbers, ips = self._sorted[network.version]
        lo = bisect.bisect_left(numbers, int(network.network_address))
        hi = bisect.bisect_right(numbers, int(network.broadcast_address))
        return frozenset(ips[lo:hi])


@dataclass(frozen=True)
class Classes:
    """One node's selection: local IP -> class key, class key -> selected remote IPs.

    Every local IP with at least one membership has a class, even if its remote set is
    empty today: then a remote workload appearing later only adds set elements.
    """

    local_class: Mapping[str, str]
    class_peers: Mapping[str, frozenset[str]]

    def pairs(self) -> frozenset[tuple[str, str]]:
        """(local ip, remote ip) pairs; quadratic, for tests and small inventories."""
        return frozenset((x, y) for x, key in self.local_class.items()
                         for y in self.class_peers[key])

    def peers_of(self, ip: str) -> frozenset[str]:
        key = self.local_class.get(ip)
        return self.class_peers[key] if key is not None else frozenset()

    @property
    def pair_count(self) -> int:
        return sum(len(self.class_peers[key]) for key in self.local_class.values())


def classify(own_node: str, workloads: Iterable[Workload], rules: Sequence[RuleRef],
             index: RemoteIndex | None = None) -> Classes:
    """The classes of `own_node`'s IPs under `rules` (pass `index` to share one)."""
    workloads = tuple(workloads)
    if index is None:
        index = RemoteIndex(own_node, workloads)
    by_ref = {(ref.policy, ref.index): ref.rule for ref in rules}
    signature_of: dict[str, set[Membership]] = {}
    for a in workloads:
        if a.node != own_node:
            continue
        for x in a.ips:
            found = memberships(a, x, rules)
            if found:
                signature_of.setdefault(x, set()).update(found)

    remote_of: dict[Membership, frozenset[str]] = {}
    keys: dict[frozenset[Membership], str] = {}
    class_peers: dict[str, frozenset[str]] = {}
    for signature in sorted({frozenset(s) for s in signature_of.values()}, key=sorted):
        key = _unique_key(class_key(signature), class_peers)
        keys[signature] = key
        for m in signature:
            if m not in remote_of:
                remote_of[m] = _remote_for(m, by_ref[(m.policy, m.rule)], index)
        class_peers[key] = frozenset().union(*(remote_of[m] for m in signature))
    local_class = {x: keys[frozenset(s)] for x, s in signature_of.items()}
    return Classes(local_class, class_peers)


def _remote_for(m: Membership, rule: Rule, index: RemoteIndex) -> frozenset[str]:
    other = rule.endpoint2 if m.side == 1 else rule.endpoint1
    return index.select(other, zip(rule.match_tags, m.values, strict=True))


def _unique_key(key: str, taken: Mapping[str, object]) -> str:
    """A 40-bit hash collision between two local signatures gets a suffix (sorted order)."""
    if key not in taken:
        return key
    n = 1
    while f"{key}_{n}" in taken:
        n += 1
    return f"{key}_{n}"
