"""Seen traffic: one flow record, and the report a node publishes of its own flows.

Rules (docs/flows.md):
- A flow is what the kernel counted for one (src, dst, protocol, destination port,
  verdict) crossing the node: `dport` is None for a protocol without ports. The verdict
  is where the packets went: inside WireGuard, in plaintext, dropped by the egress
  guard, dropped by strict ingress. The same 5-tuple may have two records (a flow that
  was plaintext, then became selected).
- Constructing a FlowRecord validates every field (ValueError naming the field);
  `from_json` turns those into Rejected(INVALID_FIELD/MISSING_FIELD) with the path, so a
  report from etcd is believed whole or not at all.
- `FlowReport` is the payload of `flows/<node>` (a key of the seen-traffic keyspace
  `<prefix>-seen/`, beside the prefix the agents watch, tfcrypt/registry/keys.py
  `seen_prefix`: no agent receives other nodes' reports), signed by
  that node's SVID: a node reports only its own flows, and a reader keeps only records
  whose local end is a workload of that node.
- Bounded on read: at most MAX_REPORT_FLOWS records and MAX_REPORT_PEERS handshakes.
- Times are whole UNIX seconds in JSON (a signed payload admits no floats: canonical
  JSON, tfcrypt/identity/canonical.py); a record's last second is rounded up, so a
  flow seen at all has `last_seen >= first_seen`.
"""

from __future__ import annotations

import enum
import math
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tfcrypt.errors import Rejected, RejectReason
from tfcrypt.identity.authz import is_node_name

if TYPE_CHECKING:
    from tfcrypt.identity.verify import Verified

KIND = "FlowReport"
MAX_REPORT_FLOWS = 5000
MAX_REPORT_PEERS = 10000
PROTOCOLS = {1: "icmp", 6: "tcp", 17: "udp", 58: "ipv6-icmp", 132: "sctp"}
_PROTO_NUMBERS = {**{name: num for num, name in PROTOCOLS.items()},
                  # what else nft may print for a protocol (records show the number)
                  "icmpv6": 58, "esp": 50, "ah": 51, "gre": 47, "udplite": 136, "dccp": 33}


class Verdict(enum.Enum):
    """Where a flow's packets went on this node."""

    WIREGUARD = "wireguard"          # inside the tunnel (out: marked and routed; in: decrypted)
    PLAINTEXT = "plaintext"          # forwarded in the clear
    GUARD_DROP = "guard_drop"        # marked, but not leaving by the tunnel: dropped
    INGRESS_DROP = "ingress_drop"    # plaintext from a selected peer: dropped by strict ingress


def proto_name(number: int) -> str:
    """`tcp`, `udp`, ... or the number as text for a protocol without a short name."""
    return PROTOCOLS.get(number, str(number))


def proto_number(name: str) -> int:
    """The IP protocol number of `name` (`tcp`, `6`); ValueError for anything else."""
    if name in _PROTO_NUMBERS:
        return _PROTO_NUMBERS[name]
    if name.isdigit() and 0 <= int(name) <= 255:
        return int(name)
    raise ValueError(f"proto: {name!r} is not an IP protocol")


def canonical_address(value: object) -> str | None:
    """An IPv4 or IPv6 address as `inet_ntop` spells it (nft's spelling, and ~10x cheaper
    than `ipaddress`: the agent canonicalises every kernel flow element); None for
    anything else."""
    if not isinstance(value, str):
        return None
    for af in (socket.AF_INET, socket.AF_INET6):
        try:
            return socket.inet_ntop(af, socket.inet_pton(af, value))
        except (OSError, ValueError):
            continue
    return None


def _canonical_ip(value: object, name: str) -> str:
    found = canonical_address(value)
    if found is None:
        raise ValueError(f"{name}: {value!r} is not an IP address")
    return found


def _count(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name}: not a non-negative integer")
    return value


def _time(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 2**40:
        raise ValueError(f"{name}: not a UNIX time")
    return float(value)


@dataclass(frozen=True)
class FlowSample:
    """One element of a kernel flow set (tfcrypt/dataplane/flow_listing.py): its flow and
    cumulative counter. `kind`: `sel` (marked), `uns` (unmarked), `drop` (strict
    ingress); `iface`: the output interface of `sel`, the input one of `uns`."""

    kind: str
    src: str
    dst: str
    proto: int
    dport: int | None
    iface: str | None
    packets: int
    bytes: int
    idle: float = 0.0
    """Seconds since the element's last packet (its timeout less what is left of it)."""


@dataclass(frozen=True)
class FlowKey:
    """What one record counts: (src, dst, proto, dport, verdict)."""

    src: str
    dst: str
    proto: str
    dport: int | None
    verdict: Verdict

    def __post_init__(self) -> None:
        object.__setattr__(self, "src", _canonical_ip(self.src, "src"))
        object.__setattr__(self, "dst", _canonical_ip(self.dst, "dst"))
        if (":" in self.src) != (":" in self.dst):
            raise ValueError("dst: not of the family of src")
        if not isinstance(self.proto, str):
            raise ValueError("proto: not a string")
        object.__setattr__(self, "proto", proto_name(proto_number(self.proto)))
        if self.dport is not None and (isinstance(self.dport, bool)
                                       or not isinstance(self.dport, int)
                                       or not 0 <= self.dport <= 65535):
            raise ValueError("dport: not a port 0-65535")
        if not isinstance(self.verdict, Verdict):
            raise ValueError("verdict: not a verdict")


@dataclass(frozen=True)
class FlowRecord:
    """One flow seen on a node: its key, when, and how much."""

    key: FlowKey
    first_seen: float
    last_seen: float
    packets: int
    bytes: int

    def __post_init__(self) -> None:
        _time(self.first_seen, "first_seen")
        _time(self.last_seen, "last_seen")
        if self.last_seen < self.first_seen:
            raise ValueError("last_seen: before first_seen")
        _count(self.packets, "packets")
        _count(self.bytes, "bytes")

    def to_json(self) -> dict[str, Any]:
        k = self.key
        return {"src": k.src, "dst": k.dst, "proto": k.proto, "dport": k.dport,
                "verdict": k.verdict.value, "first_seen": int(self.first_seen),
                "last_seen": math.ceil(self.last_seen), "packets": self.packets,
                "bytes": self.bytes}

    @classmethod
    def from_json(cls, doc: object) -> FlowRecord:
        """A record from its JSON form; ValueError naming the field."""
        if not isinstance(doc, Mapping):
            raise ValueError("not an object")
        for name in ("src", "dst", "proto", "verdict", "first_seen", "last_seen", "packets",
                     "bytes"):
            if name not in doc:
                raise ValueError(f"{name}: missing")
        try:
            verdict = Verdict(doc["verdict"])
        except ValueError:
            raise ValueError(f"verdict: {doc['verdict']!r} is not a verdict") from None
        key = FlowKey(doc["src"], doc["dst"], doc["proto"], doc.get("dport"), verdict)
        return cls(key, doc["first_seen"], doc["last_seen"], doc["packets"], doc["bytes"])


@dataclass(frozen=True)
class FlowReport:
    """What node `node` publishes at `flows/<node>`: its flows seen since `since`,
    `omitted` records it had to leave out (the bound), and the last handshake (UNIX time,
    or None for never) of each peer node, so a reader can tell a node that is ready."""

    node: str
    generated_at: float
    since: float
    flows: tuple[FlowRecord, ...]
    handshakes: Mapping[str, float | None]
    omitted: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.node, str) or not is_node_name(self.node):
            raise ValueError(f"node: {self.node!r} is not a valid node name")
        _time(self.generated_at, "generated_at")
        _time(self.since, "since")
        _count(self.omitted, "omitted")
        if len(self.flows) > MAX_REPORT_FLOWS:
            raise ValueError(f"flows: more than {MAX_REPORT_FLOWS}")
        if len(self.handshakes) > MAX_REPORT_PEERS:
            raise ValueError(f"handshakes: more than {MAX_REPORT_PEERS}")
        for peer, at in self.handshakes.items():
            if not isinstance(peer, str) or not is_node_name(peer):
                raise ValueError(f"handshakes: {peer!r} is not a node name")
            if at is not None:
                _time(at, f"handshakes.{peer}")

    @property
    def key(self) -> str:
        return flows_key(self.node)

    def to_payload(self) -> dict[str, Any]:
        """The payload to sign with `sign_envelope` and store at `self.key`; its epoch is
        the second it was generated (a replayed older report is a rollback)."""
        return {"kind": KIND, "key": self.key, "node": self.node,
                "epoch": int(self.generated_at), "issued_at": int(self.generated_at),
                "generated_at": int(self.generated_at), "since": int(self.since),
                "omitted": self.omitted, "flows": [f.to_json() for f in self.flows],
                "handshakes": {peer: None if at is None else int(at)
                               for peer, at in sorted(self.handshakes.items())}}

    @classmethod
    def from_payload(cls, p: Mapping[str, Any], key: str) -> FlowReport:
        """The report in a payload read at `key`; Rejected naming the offending field."""
        if p.get("kind") != KIND:
            raise Rejected(RejectReason.INVALID_FIELD,
                           f"payload.kind: {p.get('kind')!r}, expected {KIND!r}")
        for name in ("node", "generated_at", "since", "flows", "handshakes"):
            if name not in p:
                raise Rejected(RejectReason.MISSING_FIELD, f"payload.{name}")
        if key != flows_key(str(p["node"])):
            raise Rejected(RejectReason.KEY_MISMATCH,
                           f"payload.node {p['node']!r} does not match key {key!r}")
        flows, handshakes = p["flows"], p["handshakes"]
        if not isinstance(flows, Sequence) or isinstance(flows, str):
            raise Rejected(RejectReason.INVALID_FIELD, "payload.flows: not a list")
        if len(flows) > MAX_REPORT_FLOWS:
            raise Rejected(RejectReason.TOO_LARGE,
                           f"payload.flows: {len(flows)} records, at most {MAX_REPORT_FLOWS}")
        if not isinstance(handshakes, Mapping):
            raise Rejected(RejectReason.INVALID_FIELD, "payload.handshakes: not an object")
        records = []
        for i, doc in enumerate(flows):
            try:
                records.append(FlowRecord.from_json(doc))
            except ValueError as e:
                raise Rejected(RejectReason.INVALID_FIELD, f"payload.flows[{i}].{e}") from None
        try:
            return cls(node=p["node"], generated_at=p["generated_at"], since=p["since"],
                       flows=tuple(records), handshakes=dict(handshakes),
                       omitted=p.get("omitted", 0))
        except ValueError as e:
            raise Rejected(RejectReason.INVALID_FIELD, f"payload.{e}") from None

    @classmethod
    def from_verified(cls, verified: Verified) -> FlowReport:
        return cls.from_payload(verified.payload, verified.key)


def flows_key(node: str) -> str:
    """The key (relative to the seen-traffic keyspace) of `node`'s report."""
    return f"flows/{node}"

