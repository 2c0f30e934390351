"""The vocabulary of `table inet tfcrypt`: its names, its input, and its state as data.

Rules of this module:
- Pure values, no I/O. `NftDesired` is what the core asks for; `TableState` is one view of
  the table (the desired one from tfcrypt/dataplane/nft_desired.py, the actual one from
  tfcrypt/dataplane/nft_listing.py), and the manager diffs the two. Everything the diff
  compares is a hashable value keyed by the object's name (sets, chains, counters) or by
  (container, element), so "nothing to do" is `==`.
- Every object name tfcrypt creates is made here (`set_name`, `out_chain`, `in_chain`, the
  base chains, counters and local maps); class keys and selector names become object
  names, so `validate` checks them before anything is built.
- Infrastructure addresses (issue #14: every verified node's addresses, the etcd
  endpoints, configured CIDRs) live in the interval sets `infra_v4` / `infra_v6`; the
  prerouting dispatch never classifies a packet to or from one (tfcrypt/dataplane/
  nft_rules.py), whatever the selector sets hold. `infra_elements` collapses them into
  non-overlapping prefixes (the kernel refuses overlapping intervals).
- One path for IPv4 and IPv6 (`FAMILIES`); addresses are canonicalised with
  `inet_pton`/`inet_ntop` (what nft itself prints with, and ~10x cheaper than `ipaddress`),
  so that nft's spelling never shows up as a difference.
- A rule's statements are kept as canonical JSON strings (`encoded`), which is what its
  identity (the comment hash, tfcrypt/dataplane/nft_rules.py) is computed from.
- Flow accounting (issue #19, docs/flows.md): when `NftDesired.flows` is set, the table
  also holds the `forward` base chain, its per-family chains `fwd_v4`/`fwd_v6`, the
  strict-ingress drop chains `drop_v4`/`drop_v6`, and the dynamic sets `seen_*` that the
  kernel fills (one element per flow, with its counter). Their elements are the
  kernel's, never desired and never diffed: the listing skips them
  (tfcrypt/dataplane/nft_listing.py) and tfcrypt/dataplane/flow_listing.py reads them.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import re
import socket
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from tfcrypt.errors import ConfigError

FAMILY = "inet"
TABLE = "tfcrypt"
COUNTERS = ("guard_drops", "ingress_drops", "ingress_audit", "spoof_drops")
PREROUTING = "prerouting"
EGRESS_GUARD = "egress_guard"
SELECTED = "selected"  # a regular chain: the selected path's spoof check, then the mark
COMMENT_PREFIX = "tfcrypt:"
MAX_MARK = 0xFFFFFFFF
_CLASS_KEY = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}")
FORWARD = "forward"
FLOW_FLAGS = ("timeout",)  # nft 1.0.6 JSON knows no "dynamic"; `update` sets it
FLOW_KINDS = ("sel", "uns", "drop")  # marked (selected), unmarked, dropped by strict ingress
FLOW_PROTOS_WITH_PORTS = ("tcp", "udp", "sctp")
_RESERVED_KEYS = frozenset({"out", "in", "infra",
                            *(f"seen_{k}{np}" for k in FLOW_KINDS for np in ("", "_np"))})
INFRA = "infra"
INTERVAL = ("interval",)
LOCAL_MAPS = ("out_v4", "out_v6", "in_v4", "in_v6")

Json = dict[str, Any]


@dataclass(frozen=True)
class Fam:
    """One address family: suffix of object names, nft payload protocol, set type."""

    suffix: str
    proto: str
    addr_type: str


FAMILIES = (Fam("v4", "ip", "ipv4_addr"), Fam("v6", "ip6", "ipv6_addr"))
BY_ADDR_TYPE = {f.addr_type: f for f in FAMILIES}
BY_SUFFIX = {f.suffix: f for f in FAMILIES}


@dataclass(frozen=True)
class FlowAccounting:
    """The kernel's flow accounting: each `seen_*` set holds at most `size` flows, and a
    flow not seen for `timeout` seconds leaves it (the agent reads more often)."""

    size: int = 65536
    timeout: int = 120


@dataclass(frozen=True)
class NftDesired:
    """What the core asks of the nftables dataplane.

    `local_class`: local workload IP -> class key; `class_selectors`: class key -> the names
    of its selectors; `selector_ips`: selector name -> the remote IPs it selects (a class
    selects the union of its selectors' sets). `mark` is the bit set on selected packets
    and `mask` the bits tfcrypt owns in the fwmark (None means `mark`). `enforce=False` is
    observe-only: the class rules count what they would mark or drop, and change no packet.
    `infrastructure`: addresses and CIDRs never classified (neither marked nor dropped by
    strict ingress), in enforce and observe mode alike. `flows`: count every forwarded
    flow and every strict-ingress drop in the `seen_*` sets (None: off).
    """

    local_class: Mapping[str, str]
    class_selectors: Mapping[str, frozenset[str]]
    selector_ips: Mapping[str, frozenset[str]]
    mark: int
    mask: int | None = None
    wg_ifname: str = "tfcrypt0"
    enforce: bool = True
    infrastructure: frozenset[str] = frozenset()
    flows: FlowAccounting | None = None

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
    """A set (`map` None) or a map whose values are of type `map` (tfcrypt: "verdict");
    `flags` ("interval" for the infrastructure sets, FLOW_FLAGS for the flow sets), and
    a flow set's element `timeout` (seconds) and `size`."""

    type: str
    map: str | None = None
    flags: tuple[str, ...] = ()
    timeout: int | None = None
    size: int | None = None

    @property
    def type_json(self) -> object:
        """`type` as nft's JSON takes it: a concatenation (`a . b`) is a list."""
        return self.type.split(" . ") if " . " in self.type else self.type


@dataclass(frozen=True)
class RuleSpec:
    chain: str
    comment: str
    expr: tuple[str, ...] = ()
    """Statements as canonical JSON strings (empty for rules read back from nft)."""

    def expr_json(self) -> list[Json]:
        """The statements as JSON values (shared between rules: never mutate them)."""
        return [decoded(s) for s in self.expr]


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


def infra_set(fam: Fam) -> str:
    return f"{INFRA}_{fam.suffix}"


def pre_chain(fam: Fam) -> str:
    """The regular chain prerouting sends one family's packets to (`meta nfproto`)."""
    return f"pre_{fam.suffix}"


def fwd_chain(fam: Fam) -> str:
    """The regular chain `forward` sends one family's packets to (flow accounting)."""
    return f"fwd_{fam.suffix}"


def drop_chain(fam: Fam) -> str:
    """Where a class's strict-ingress rule sends a packet to be counted, then dropped."""
    return f"drop_{fam.suffix}"


def flow_set(kind: str, fam: Fam, ports: bool) -> str:
    """`seen_<kind>[_np]_<fam>`: `kind` one of FLOW_KINDS; `_np` for protocols without
    ports (their `th dport` would be other header bytes: an ICMP checksum)."""
    return f"seen_{kind}{'' if ports else '_np'}_{fam.suffix}"


def flow_set_type(kind: str, fam: Fam, ports: bool) -> str:
    """(src . dst . protocol [. dport] [. interface]): `sel` keeps the output interface
    (the tunnel, or not: a guard drop), `uns` the input one (the tunnel: decrypted)."""
    parts = [fam.addr_type, fam.addr_type, "inet_proto"]
    if ports:
        parts.append("inet_service")
    if kind != "drop":
        parts.append("ifname")
    return " . ".join(parts)


def flow_sets() -> list[tuple[str, str, Fam, bool]]:
    """(name, kind, family, ports) of every flow set."""
    return [(flow_set(k, f, p), k, f, p) for f in FAMILIES for k in FLOW_KINDS
            for p in (True, False)]


def infra_elements(prefixes: Collection[str]) -> dict[str, dict[str, str | None]]:
    """Set name -> the elements of the infrastructure sets for `prefixes` (addresses or
    CIDRs, host bits allowed): collapsed per family into non-overlapping prefixes, a host
    spelled as its address and a wider prefix as `addr/len` (what the listing gives back,
    tfcrypt/dataplane/nft_listing.py). ConfigError for anything that is not a prefix."""
    nets: dict[int, list[ipaddress.IPv4Network | ipaddress.IPv6Network]] = {4: [], 6: []}
    for text in prefixes:
        try:
            net = ipaddress.ip_network(text, strict=False)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"infrastructure {text!r}: not an address or CIDR") from exc
        nets[net.version].append(net)
    out: dict[str, dict[str, str | None]] = {}
    for fam, version in zip(FAMILIES, (4, 6), strict=True):
        found: dict[str, str | None] = {}
        for net in ipaddress.collapse_addresses(nets[version]):  # type: ignore[type-var]
            _, addr = canonical_ip(str(net.network_address))
            found[addr if net.prefixlen == net.max_prefixlen else f"{addr}/{net.prefixlen}"] = None
        out[infra_set(fam)] = found
    return out


def element_json(set_spec: SetSpec, key: str) -> object:
    """One element of a plain set as nft's JSON takes it: a prefix of an interval set as
    `{"prefix": ...}`, anything else as the address."""
    if set_spec.flags and "/" in key:
        addr, length = key.split("/")
        return {"prefix": {"addr": addr, "len": int(length)}}
    return key


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
    if not 0 < d.mark <= MAX_MARK or not 0 < mask <= MAX_MARK:
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


def encoded(stmt: Json) -> str:
    return json.dumps(stmt, sort_keys=True, separators=(",", ":"))


@functools.lru_cache(maxsize=8192)
def decoded(text: str) -> Json:
    """Statements recur across the ~10 k class rules at scale (a few hundred distinct):
    decoded once each."""
    found: Json = json.loads(text)
    return found
