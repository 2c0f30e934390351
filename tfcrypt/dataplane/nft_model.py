"""The contents of `table inet tfcrypt` as data: what tfcrypt wants, and what nft reports.

Rules of this module:
- Pure: no I/O. `DesiredTable.update(NftDesired)` (or `desired_table`) and
  `parse_listing(nft -j output)` both give a `TableState`, and the manager diffs the two.
  Everything the diff compares is a hashable value keyed by the object's name (sets,
  chains, counters) or by (container, element), so "nothing to do" is `==`.
- Desired state is kept, not rebuilt: `DesiredTable` reuses the element dicts of every
  selector set whose value is equal to the last one, so an update costs the sets that
  changed (and the small skeleton: base objects, class chains and rules, local maps).
- Rules are identified by their comment, `tfcrypt:<hash of the expression we emit>`, never
  by parsing nft's rendering of an expression back (nft normalises what it prints). A rule
  whose expression changes gets a new comment, hence is replaced.
- Classification: one verdict-map lookup on the local address picks the class chain; the
  chain has one rule per selector of the class (per family), each one set lookup on the
  remote address, the first match marks (or drops) and returns. Sets are per remote
  SELECTOR, not per class: a remote address is in the few selector sets that hold it, not
  repeated in every class that selects it (docs/policy.md, "Scale": 0.34 M elements instead
  of 3.4 M at 1,000 nodes). Per packet the cost is bounded by the class's selector count
  (~20-30 at that scale), independent of the number of workloads. Class keys and selector
  names become object names, so they are validated here.
- One path for IPv4 and IPv6 (`FAMILIES`); addresses are canonicalised on both sides with
  `inet_pton`/`inet_ntop` (what nft itself prints with, and ~10x cheaper than `ipaddress`),
  through a cache, so that nft's spelling never shows up as a difference.
- Anything in the table this module does not recognise (an object kind tfcrypt never
  creates, an element that is not a plain address) is listed in `TableState.foreign`; the
  manager answers that by rebuilding the table in one atomic transaction.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import socket
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from tfcrypt.errors import ConfigError

FAMILY = "inet"
TABLE = "tfcrypt"
COUNTERS = ("guard_drops", "ingress_drops", "ingress_audit")
PREROUTING = "prerouting"
EGRESS_GUARD = "egress_guard"
COMMENT_PREFIX = "tfcrypt:"
_MAX_MARK = 0xFFFFFFFF
_CLASS_KEY = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}")
_RESERVED_KEYS = frozenset({"out", "in"})
_KNOWN_KINDS = frozenset({"metainfo", "table", "counter", "set", "map", "chain", "rule"})
_CANON_CACHE_MAX = 1 << 21
_NO_PEERS: frozenset[str] = frozenset()
LOCAL_MAPS = ("out_v4", "out_v6", "in_v4", "in_v6")

Json = dict[str, Any]


@dataclass(frozen=True)
class Fam:
    """One address family: suffix of object names, nft payload protocol, set type."""

    suffix: str
    proto: str
    addr_type: str


FAMILIES = (Fam("v4", "ip", "ipv4_addr"), Fam("v6", "ip6", "ipv6_addr"))
_BY_TYPE = {f.addr_type: f for f in FAMILIES}
_BY_SUFFIX = {f.suffix: f for f in FAMILIES}


@dataclass(frozen=True)
class NftDesired:
    """What the core asks of the nftables dataplane.

    `local_class`: local workload IP -> class key; `class_selectors`: class key -> the names
    of its selectors; `selector_ips`: selector name -> the remote IPs it selects (a class
    selects the union of its selectors' sets). `mark` is the bit set on selected packets
    and `mask` the bits tfcrypt owns in the fwmark (None means `mark`). `enforce=False` is
    observe-only: the class rules count what they would mark or drop, and change no packet.
    """

    local_class: Mapping[str, str]
    class_selectors: Mapping[str, frozenset[str]]
    selector_ips: Mapping[str, frozenset[str]]
    mark: int
    mask: int | None = None
    wg_ifname: str = "tfcrypt0"
    enforce: bool = True

    def __post_init__(self) -> None:
        if self.mask is None:
            object.__setattr__(self, "mask", self.mark)


@dataclass(frozen=True)
class BaseHook:
    type: str
    hook: str
    prio: int
    policy: str


@dataclass(frozen=True)
class SetSpec:
    """A set (`map` None) or a map whose values are of type `map` (tfcrypt: "verdict")."""

    type: str
    map: str | None = None


@dataclass(frozen=True)
class RuleSpec:
    chain: str
    comment: str
    expr: tuple[str, ...] = ()
    """Statements as canonical JSON strings (empty for rules read back from nft)."""

    def expr_json(self) -> list[Json]:
        """The statements as JSON values (shared between rules: never mutate them)."""
        return [_decoded(s) for s in self.expr]


@dataclass
class TableState:
    """One view of the table. `elements` maps container -> {address: jump target or None}."""

    counters: set[str] = field(default_factory=set)
    sets: dict[str, SetSpec] = field(default_factory=dict)
    chains: dict[str, BaseHook | None] = field(default_factory=dict)
    elements: dict[str, dict[str, str | None]] = field(default_factory=dict)
    rules: dict[tuple[str, str], RuleSpec] = field(default_factory=dict)
    rule_handles: dict[tuple[str, str], int] = field(default_factory=dict)
    stray_rules: list[tuple[str, int]] = field(default_factory=list)
    handles: dict[tuple[str, str], int] = field(default_factory=dict)
    foreign: list[str] = field(default_factory=list)
    raw_elements: dict[tuple[str, str], Any] = field(default_factory=dict)

    def items(self, sets: Collection[str] | None = None) -> dict[tuple[str, ...], object]:
        """Flat (kind, name[, member]) -> value view that the delta tracker diffs; elements
        only of the containers in `sets` (None: all)."""
        out: dict[tuple[str, ...], object] = {("counter", c): "counter" for c in self.counters}
        out.update({("set", n): s for n, s in self.sets.items()})
        out.update({("chain", n): ("chain", h) for n, h in self.chains.items()})
        for name, members in self.elements.items():
            if sets is None or name in sets:
                out.update({("element", name, ip): ("to", t) for ip, t in members.items()})
        out.update({("rule", c, m): "rule" for c, m in self.rules})
        return out


def set_name(key: str, fam: Fam) -> str:
    return f"{key}_{fam.suffix}"


def out_chain(key: str) -> str:
    return f"out_{key}"


def in_chain(key: str) -> str:
    return f"in_{key}"


def canonical_ip(text: str) -> tuple[Fam, str]:
    """(family, the spelling nft prints) of one address; ConfigError for anything else."""
    for fam, af in ((FAMILIES[0], socket.AF_INET), (FAMILIES[1], socket.AF_INET6)):
        try:
            return fam, socket.inet_ntop(af, socket.inet_pton(af, text))
        except (OSError, ValueError, TypeError):
            continue
    raise ConfigError(f"address {text!r}: not an IPv4 or IPv6 address")


def validate(d: NftDesired) -> None:
    mask = d.mask if d.mask is not None else d.mark
    if not 0 < d.mark <= _MAX_MARK or not 0 < mask <= _MAX_MARK:
        raise ConfigError(f"mark {d.mark:#x}/{mask:#x}: must be non-zero 32-bit values")
    if d.mark & mask != d.mark:
        raise ConfigError(f"mark {d.mark:#x} has bits outside mask {mask:#x}")
    if not 0 < len(d.wg_ifname) <= 15 or any(c in d.wg_ifname for c in ' /"\\'):
        raise ConfigError(f"wg_ifname {d.wg_ifname!r}: not an interface name")
    for key in {*d.local_class.values(), *d.class_selectors}:
        if not _CLASS_KEY.fullmatch(key) or key in _RESERVED_KEYS:
            raise ConfigError(f"class key {key!r}: must be an identifier (not 'out'/'in')")
    for name in {*d.selector_ips, *(n for names in d.class_selectors.values() for n in names)}:
        if not _CLASS_KEY.fullmatch(name) or name in _RESERVED_KEYS:
            raise ConfigError(f"selector {name!r}: must be an identifier (not 'out'/'in')")


def _match(op: str, left: Json, right: object) -> Json:
    return {"match": {"op": op, "left": left, "right": right}}


def _meta(key: str) -> Json:
    return {"meta": {"key": key}}


def _addr(fam: Fam, field_: str) -> Json:
    return {"payload": {"protocol": fam.proto, "field": field_}}


def _rule(chain: str, *stmts: Json | str) -> RuleSpec:
    """A rule of `stmts` (JSON values, or their canonical encoding from `_encoded`)."""
    expr = tuple(st if isinstance(st, str) else _encoded(st) for st in stmts)
    digest = hashlib.sha256("\n".join(expr).encode()).hexdigest()[:12]
    return RuleSpec(chain, COMMENT_PREFIX + digest, expr)


def _encoded(stmt: Json) -> str:
    return json.dumps(stmt, sort_keys=True, separators=(",", ":"))


@functools.lru_cache(maxsize=8192)
def _decoded(text: str) -> Json:
    """Statements recur across the ~10 k class rules at scale (a few hundred distinct):
    decoded once each."""
    found: Json = json.loads(text)
    return found


@functools.lru_cache(maxsize=8192)
def _set_match(proto: str, field_: str, set_ref: str) -> str:
    return _encoded(_match("==", {"payload": {"protocol": proto, "field": field_}}, set_ref))


def _set_mark(mark: int, mask: int) -> Json:
    """`meta mark set meta mark | MARK`, clearing the rest of the mask first if it is wider.

    With a wider mask a plain OR could leave another of our bits set, and then neither the
    guard nor the `ip rule` (both compare `mark & mask == MARK`) would see the packet.
    """
    current: Json = _meta("mark")
    if mask != mark:
        current = {"&": [current, _MAX_MARK & ~mask]}
    return {"mangle": {"key": _meta("mark"), "value": {"|": [current, mark]}}}


def _class_rules(key: str, selectors: Collection[str], d: NftDesired, mask: int
                 ) -> list[RuleSpec]:
    """One rule per selector and family in each of the class's chains; the first match
    acts and returns (so a packet is counted once, whatever number of selectors hold it).
    Statements are encoded once per class (the set matches once per selector)."""
    counter = _encoded({"counter": {"packets": 0, "bytes": 0}})
    marking = [_encoded(_set_mark(d.mark, mask))] if d.enforce else []
    back = _encoded({"return": None})
    verdict = ([_encoded({"counter": "ingress_drops"}), _encoded({"drop": None})] if d.enforce
               else [_encoded({"counter": "ingress_audit"}), back])
    not_tunnel = _encoded(_match("!=", _meta("iifname"), d.wg_ifname))
    out_name, in_name = out_chain(key), in_chain(key)
    rules: list[RuleSpec] = []
    for selector in sorted(selectors):
        for fam in FAMILIES:
            peers = "@" + set_name(selector, fam)
            rules.append(_rule(out_name, _set_match(fam.proto, "daddr", peers),
                               counter, *marking, back))
            rules.append(_rule(in_name, not_tunnel, _set_match(fam.proto, "saddr", peers),
                               *verdict))
    return rules


def _base_rules(d: NftDesired, mask: int) -> list[RuleSpec]:
    rules = []
    for direction, field_ in (("out", "saddr"), ("in", "daddr")):
        for fam in FAMILIES:
            vmap = {"vmap": {"key": _addr(fam, field_), "data": f"@{direction}_{fam.suffix}"}}
            rules.append(_rule(PREROUTING, vmap))
    rules.append(
        _rule(
            EGRESS_GUARD,
            _match("==", {"&": [_meta("mark"), mask]}, d.mark),
            _match("!=", _meta("oifname"), d.wg_ifname),
            {"counter": "guard_drops"},
            {"drop": None},
        )
    )
    return rules


@dataclass(frozen=True)
class _SetMembers:
    """A selector's remote IPs as last given, and whether any was spelled non-canonically."""

    src: frozenset[str]
    aliased: bool


class DesiredTable:
    """The desired `TableState`, kept across updates so that an update costs its change.

    Pitfalls:
    - A selector whose remote IPs are `==` to the last ones (identity first, then a C-level
      frozenset compare) keeps its element dicts; those dicts are never mutated afterwards
      (a changed selector gets new dicts), so a state handed out stays valid.
    - Input may spell one address two ways ("fd00::9", "fd00:0::9"). A selector where that
      ever happened is recanonicalised whole when it changes: removing one spelling by
      the fast path would drop an element still desired under the other.
    - `update()` is atomic: on ConfigError nothing changes.
    """

    def __init__(self) -> None:
        self.desired: NftDesired | None = None
        self.state = TableState()
        self._selectors: dict[str, _SetMembers] = {}
        self._rules: dict[tuple[object, ...], list[RuleSpec]] = {}
        self._canon: dict[str, tuple[Fam, str]] = {}
        self._shape: tuple[object, ...] = ()
        self.skeleton_changed = True
        """Whether the last update changed anything but elements (counters, sets, chains,
        rules): the manager skips diffing the ~10 k rules when it did not."""

    def canonical(self, text: str) -> tuple[Fam, str]:
        """`canonical_ip` through a cache (remote IPs recur in several selector sets)."""
        hit = self._canon.get(text)
        if hit is None:
            if len(self._canon) >= _CANON_CACHE_MAX:
                self._canon.clear()
            hit = self._canon[text] = canonical_ip(text)
        return hit

    def update(self, d: NftDesired) -> set[str]:
        """Make `state` the table for `d`; returns the selector sets whose elements changed."""
        validate(d)
        mask = d.mask if d.mask is not None else d.mark
        old = self.state
        shape = (d.mark, mask, d.enforce, d.wg_ifname, frozenset(d.local_class.values()),
                 frozenset(d.selector_ips))
        same_skeleton = (self.desired is not None and shape == self._shape
                         and d.class_selectors == self.desired.class_selectors)
        state = TableState(counters=set(COUNTERS))
        for name in LOCAL_MAPS:
            state.elements[name] = {}
        rule_cache: dict[tuple[object, ...], list[RuleSpec]] = {}

        def cached(key: str, selectors: frozenset[str] = frozenset()) -> list[RuleSpec]:
            at = (key, selectors, d.mark, mask, d.enforce, d.wg_ifname)
            found = self._rules.get(at)
            if found is None:
                found = (_base_rules(d, mask) if key == ""
                         else _class_rules(key, selectors, d, mask))
            rule_cache[at] = found
            return found

        if same_skeleton:  # chains, sets and rules are the last ones (never mutated)
            state.counters, state.chains, state.sets = old.counters, old.chains, old.sets
            state.rules, rule_cache = old.rules, self._rules
        else:
            state.chains[PREROUTING] = BaseHook("filter", "prerouting", -150, "accept")
            state.chains[EGRESS_GUARD] = BaseHook("filter", "postrouting", 0, "accept")
            for name in LOCAL_MAPS:
                state.sets[name] = SetSpec(_BY_SUFFIX[name[-2:]].addr_type, "verdict")
        rules = [] if same_skeleton else list(cached(""))
        members: dict[str, _SetMembers] = {}
        changed: set[str] = set()
        used = {n for names in d.class_selectors.values() for n in names}
        for selector in sorted({*d.selector_ips, *used}):
            names = [set_name(selector, fam) for fam in FAMILIES]
            if not same_skeleton:
                for fam, name in zip(FAMILIES, names, strict=True):
                    state.sets[name] = SetSpec(fam.addr_type)
            src = d.selector_ips.get(selector, _NO_PEERS)
            prev = self._selectors.get(selector)
            if prev is not None and (prev.src is src or prev.src == src):
                members[selector] = prev
                state.elements.update((n, old.elements[n]) for n in names)
            else:
                members[selector] = self._set_members(selector, src, prev, state)
                changed.update(names)
        if not same_skeleton:
            for key in sorted({*d.local_class.values(), *d.class_selectors}):
                state.chains[out_chain(key)] = None
                state.chains[in_chain(key)] = None
                rules.extend(cached(key, frozenset(d.class_selectors.get(key, ()))))
            state.rules = {(r.chain, r.comment): r for r in rules}
        for ip, key in d.local_class.items():
            fam, canon = self.canonical(ip)
            state.elements[f"out_{fam.suffix}"][canon] = out_chain(key)
            state.elements[f"in_{fam.suffix}"][canon] = in_chain(key)
        self.skeleton_changed = not same_skeleton and (
            self.desired is None or state.rules.keys() != old.rules.keys()
            or state.sets != old.sets or state.chains != old.chains
            or state.counters != old.counters)
        self.desired, self.state, self._selectors, self._rules = d, state, members, rule_cache
        self._shape = shape
        return changed

    def _set_members(self, key: str, src: frozenset[str], prev: _SetMembers | None,
                     state: TableState) -> _SetMembers:
        """Fill `state` with the selector's new element dicts (fresh ones, never the old)."""
        names = {fam.suffix: set_name(key, fam) for fam in FAMILIES}
        if prev is not None and not prev.aliased:
            added = [(ip, *self.canonical(ip)) for ip in src - prev.src]
            removed = [(ip, *self.canonical(ip)) for ip in prev.src - src]
            if all(ip == canon for ip, _, canon in [*added, *removed]):
                members = {n: dict(self.state.elements[n]) for n in names.values()}
                for _, fam, canon in removed:
                    members[names[fam.suffix]].pop(canon, None)
                for _, fam, canon in added:
                    members[names[fam.suffix]][canon] = None
                state.elements.update(members)
                return _SetMembers(src, aliased=False)
        # a whole set at once (first apply: ~0.34 M elements): cache lookups in C, the
        # misses canonicalised one by one
        hits = list(map(self._canon.get, src))
        if None in hits:
            hits = [hit if hit is not None else self.canonical(ip)
                    for ip, hit in zip(src, hits, strict=True)]
        v4, v6 = FAMILIES
        state.elements[names[v4.suffix]] = dict.fromkeys(c for f, c in hits if f is v4)
        state.elements[names[v6.suffix]] = dict.fromkeys(c for f, c in hits if f is v6)
        aliased = any(c != ip for ip, (_, c) in zip(src, hits, strict=True))
        return _SetMembers(src, aliased)


def desired_table(d: NftDesired) -> TableState:
    """The whole table for `d`; raises ConfigError for input that cannot become nft names."""
    table = DesiredTable()
    table.update(d)
    return table.state


def parse_listing(listing: Json,
                  canon: Callable[[str], tuple[Fam, str]] = canonical_ip) -> TableState:
    """Read `nft -j list table inet tfcrypt` output into a TableState (with handles).

    `raw_elements` keeps nft's spelling only where it differs from the canonical one."""
    state = TableState()
    for entry in listing.get("nftables", []):
        ((kind, obj),) = entry.items()
        if kind not in _KNOWN_KINDS:
            state.foreign.append(f"{kind} {obj.get('name', '?')}")
        elif kind == "table" and obj.get("flags"):
            state.foreign.append(f"table flags {obj['flags']}")
        elif kind == "counter":
            state.counters.add(obj["name"])
            state.handles[("counter", obj["name"])] = obj["handle"]
        elif kind in ("set", "map"):
            _parse_set(state, kind, obj, canon)
        elif kind == "chain":
            hook = None
            if "hook" in obj:
                hook = BaseHook(obj["type"], obj["hook"], obj["prio"], obj.get("policy", "accept"))
            state.chains[obj["name"]] = hook
            state.handles[("chain", obj["name"])] = obj["handle"]
        elif kind == "rule":
            _parse_rule(state, obj)
    return state


def _parse_set(state: TableState, kind: str, obj: Json,
               canon_of: Callable[[str], tuple[Fam, str]]) -> None:
    name = obj["name"]
    spec = SetSpec(obj["type"] if isinstance(obj["type"], str) else json.dumps(obj["type"]),
                   obj.get("map") if kind == "map" else None)
    if obj.get("flags") or spec.type not in _BY_TYPE:
        state.foreign.append(f"{kind} {name} of type {spec.type} flags {obj.get('flags')}")
    state.sets[name] = spec
    state.handles[("set", name)] = obj["handle"]
    members: dict[str, str | None] = {}
    for raw in obj.get("elem", []):
        key, value = (raw[0], raw[1]) if kind == "map" else (raw, None)
        if isinstance(key, dict) and "elem" in key:
            key = key["elem"].get("val")
        target = value["jump"]["target"] if isinstance(value, dict) and "jump" in value else None
        if not isinstance(key, str) or (kind == "map" and target is None):
            state.foreign.append(f"element {json.dumps(raw)} in {name}")
            continue
        try:
            _, canon = canon_of(key)
        except ConfigError:
            state.foreign.append(f"element {key!r} in {name}")
            continue
        members[canon] = target
        if canon != key:
            state.raw_elements[(name, canon)] = key
    state.elements[name] = members


def _parse_rule(state: TableState, obj: Json) -> None:
    chain, comment, handle = obj["chain"], obj.get("comment", ""), obj["handle"]
    key = (chain, comment)
    if not comment.startswith(COMMENT_PREFIX) or key in state.rules:
        state.stray_rules.append((chain, handle))
        return
    state.rules[key] = RuleSpec(chain, comment)
    state.rule_handles[key] = handle


def counter_values(listing: Json) -> dict[str, tuple[int, int]]:
    """Named counters, plus `out:<class>` summed over the anonymous counters of its chain."""
    out: dict[str, tuple[int, int]] = {}
    for entry in listing.get("nftables", []):
        ((kind, obj),) = entry.items()
        if kind == "counter":
            out[obj["name"]] = (obj["packets"], obj["bytes"])
        elif kind == "rule" and obj["chain"].startswith("out_"):
            for stmt in obj.get("expr", []):
                counter = stmt.get("counter")
                if isinstance(counter, dict):
                    name = "out:" + obj["chain"][4:]
                    p, b = out.get(name, (0, 0))
                    out[name] = (p + counter["packets"], b + counter["bytes"])
    return out
