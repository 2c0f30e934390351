"""Workload: one workload's addresses and effective tags, as the controller publishes them.

Rules:
- Stored at `workloads/<node>/<name>`, signed by a controller (tfcrypt.identity.authz).
  The name is a DNS-1123 label, or `<namespace>.<pod>` for a Kubernetes pod (the
  controller's form: docs/controller.md); an agent older than that form refuses those.
  The record's `node` is where the workload runs: the controller-signed inventory is
  trusted for placement, a node cannot claim a workload for itself.
- Constructing a Workload validates and normalises every field (ValueError naming the
  field); `from_verified` turns those into Rejected(MISSING_FIELD / INVALID_FIELD /
  KEY_MISMATCH) with the field path, like NodeRecord.
- Normal forms, so that "nothing changed" is `==`: `ips` are plain addresses (no prefix)
  in compressed form, deduplicated, IPv4 first then by address; `tags` a frozenset of Tag.
- An address that cannot be a workload's (unspecified, multicast, loopback, an IPv6 zone)
  is refused: it would make selection match traffic that is not the workload's.
- `epoch` and `issued_at` belong to the envelope, not to the workload: the signer passes
  them to `to_payload`, and two versions with the same content compare equal.
- Unknown payload fields are ignored so a newer writer does not break an older reader.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from tfcrypt.errors import Rejected, RejectReason
from tfcrypt.identity.authz import is_node_name
from tfcrypt.model.tags import Tag, parse_tags, sorted_tag_texts

if TYPE_CHECKING:
    from tfcrypt.identity.verify import Verified

KIND = "Workload"
DNS_LABEL_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_LABEL = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
# `<namespace>.<pod>`: a DNS-1123 label, a dot, a DNS-1123 subdomain (tfcrypt controller)
K8S_NAME_RE = re.compile(rf"^{_LABEL}\.{_LABEL}(\.{_LABEL})*$")
MAX_K8S_NAME = 63 + 1 + 253
_STRING_FIELDS = ("name", "node")
_LIST_FIELDS = ("ips", "tags")

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
V6_BASE = 1 << 128  # IPv6 numbers sit above every IPv4 one: one number line for both


def ip_number(addr: Address) -> int:
    """An address on tfcrypt's single number line (IPv4 value; IPv6 value + 2**128), so
    that a subnet of either family is one interval (`network_span`)."""
    return int(addr) if addr.version == 4 else int(addr) + V6_BASE


def network_span(network: Network) -> tuple[int, int]:
    """The first and last number (`ip_number`) of `network`."""
    return ip_number(network.network_address), ip_number(network.broadcast_address)
TagKeySplit = tuple[frozenset[tuple[str, str]], tuple[tuple[str, str], ...]]


def workload_key(node: str, name: str) -> str:
    """The etcd key (relative to the prefix) of workload `name` on `node`."""
    return f"workloads/{node}/{name}"


def is_dns_label(name: str) -> bool:
    return DNS_LABEL_RE.fullmatch(name) is not None


def is_workload_name(name: str) -> bool:
    """A DNS-1123 label (`tfcrypt workload set`), or `<namespace>.<pod>` as the
    Kubernetes controller names pods (docs/controller.md)."""
    return is_dns_label(name) or (len(name) <= MAX_K8S_NAME
                                  and K8S_NAME_RE.fullmatch(name) is not None)


def ip_sort_key(ip: str) -> tuple[int, bytes]:
    """IPv4 before IPv6, then by address: the order every tfcrypt listing uses."""
    addr = ipaddress.ip_address(ip)
    return addr.version, addr.packed


@functools.lru_cache(maxsize=1 << 16)
def _shared_keys(keys: frozenset[tuple[str, str]]) -> frozenset[tuple[str, str]]:
    """One object per distinct set of single-valued keys (grouping by it is then an
    identity hit)."""
    return keys


@functools.lru_cache(maxsize=1 << 16)
def _tag_views(tags: frozenset[Tag]) -> tuple[frozenset[Tag], Mapping[str, str],
                                              frozenset[tuple[str, str]], frozenset[str],
                                              TagKeySplit]:
    """One shared copy of a tag set and its derived views: 100,000 workloads carry a few
    hundred distinct tag sets, and a copy per workload was ~75 MiB of the agent (C3)."""
    single = _shared_keys(frozenset((t.type, t.value) for t in tags if t.single_valued))
    labels = tuple(sorted((t.type, t.value) for t in tags if not t.single_valued))
    return (tags, MappingProxyType({t.type: t.value for t in tags if t.single_valued}),
            frozenset((t.type, t.value) for t in tags),
            frozenset(t.value for t in tags if not t.single_valued), (single, labels))


@dataclass(frozen=True, slots=True)
class Workload:
    """A workload's placement, addresses and effective tags (TF inheritance resolved)."""

    name: str
    node: str
    ips: tuple[str, ...]
    tags: frozenset[Tag]
    # Derived, read-only views (plain slots, not properties: indexes read them 100,000
    # times per build, and a property call costs more than the read):
    # `numbers`: `ips` as `ip_number`s, in the same order (selection tests subnets on
    # them; ints instead of address objects: smaller, and no call to compare);
    # `tag_keys`: `tags` as (type, value) tuples, hashed and compared in C;
    # `tag_key_split`: `tag_keys` split into the single-valued ones (a frozenset shared by
    # every workload with the same ones: few distinct, so indexes group workloads by it)
    # and the label ones.
    numbers: tuple[int, ...] = field(init=False, repr=False, compare=False)
    tag_keys: frozenset[tuple[str, str]] = field(init=False, repr=False, compare=False)
    tag_key_split: TagKeySplit = field(init=False, repr=False, compare=False)
    _values: Mapping[str, str] = field(init=False, repr=False, compare=False)
    _labels: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not is_workload_name(self.name):
            raise ValueError(f"name: {self.name!r} is not a DNS-1123 label nor "
                             "<namespace>.<pod>")
        if not isinstance(self.node, str) or not is_node_name(self.node):
            raise ValueError(f"node: {self.node!r} is not a valid node name")
        addresses = parse_ips(self.ips)
        object.__setattr__(self, "numbers", tuple(map(ip_number, addresses)))
        object.__setattr__(self, "ips", tuple(str(a) for a in addresses))
        try:
            tags = parse_tags(self.tags)
        except ValueError as e:
            raise ValueError(f"tags{e}") from None
        tags, values, tag_keys, labels, split = _tag_views(tags)
        object.__setattr__(self, "tags", tags)
        object.__setattr__(self, "_values", values)
        object.__setattr__(self, "tag_keys", tag_keys)
        object.__setattr__(self, "_labels", labels)
        object.__setattr__(self, "tag_key_split", split)

    @property
    def key(self) -> str:
        return workload_key(self.node, self.name)

    @property
    def labels(self) -> frozenset[str]:
        """The values of the multi-valued `label` type."""
        return self._labels

    def tag_value(self, tag_type: str) -> str | None:
        """The value of a single-valued type, None if the workload lacks it (or for label)."""
        return self._values.get(tag_type.lower())

    def to_payload(self, *, epoch: int, issued_at: int) -> dict[str, Any]:
        """The payload to sign with `sign_envelope` and store at `self.key`."""
        return {
            "kind": KIND,
            "key": self.key,
            "epoch": epoch,
            "issued_at": issued_at,
            "name": self.name,
            "node": self.node,
            "ips": list(self.ips),
            "tags": sorted_tag_texts(self.tags),
        }

    @classmethod
    def from_verified(cls, verified: Verified) -> Workload:
        """The workload in a verified envelope, or Rejected naming the offending field."""
        p: Mapping[str, Any] = verified.payload
        if verified.kind != KIND:
            raise Rejected(RejectReason.INVALID_FIELD,
                           f"payload.kind: {verified.kind!r}, expected {KIND!r}")
        for name in _STRING_FIELDS + _LIST_FIELDS:
            if name not in p:
                raise Rejected(RejectReason.MISSING_FIELD, f"payload.{name}")
        for name in _STRING_FIELDS:
            if not isinstance(p[name], str):
                raise Rejected(RejectReason.INVALID_FIELD, f"payload.{name}: not a string")
        for name in _LIST_FIELDS:
            if not isinstance(p[name], list):
                raise Rejected(RejectReason.INVALID_FIELD, f"payload.{name}: not a list")
        if verified.key != workload_key(p["node"], p["name"]):
            raise Rejected(RejectReason.KEY_MISMATCH,
                           f"payload.node/name {p['node']!r}/{p['name']!r} does not match "
                           f"key {verified.key!r}")
        try:
            return cls(name=p["name"], node=p["node"], ips=tuple(p["ips"]), tags=p["tags"])
        except ValueError as e:
            raise Rejected(RejectReason.INVALID_FIELD, f"payload.{e}") from None


def normalise_ips(values: Iterable[object]) -> tuple[str, ...]:
    """Plain unicast addresses, compressed, deduplicated, IPv4 first then by address."""
    return tuple(str(a) for a in parse_ips(values))


def parse_ips(values: Iterable[object]) -> tuple[Address, ...]:
    """`normalise_ips`, as address objects; ValueError names `ips[i]`."""
    if isinstance(values, str):
        raise ValueError("ips: a list of addresses, not one string")
    addrs: set[Address] = set()
    for i, value in enumerate(values):
        if not isinstance(value, str):
            raise ValueError(f"ips[{i}]: not a string")
        try:
            addr = ipaddress.ip_address(value)
        except ValueError:
            raise ValueError(f"ips[{i}]: {value!r} is not an IP address "
                             "(no prefix length)") from None
        if isinstance(addr, ipaddress.IPv6Address) and addr.scope_id is not None:
            raise ValueError(f"ips[{i}]: {value!r}: a zone is local to one host")
        if addr.is_unspecified or addr.is_multicast or addr.is_loopback:
            raise ValueError(f"ips[{i}]: {value!r} cannot be a workload address")
        addrs.add(addr)
    return tuple(sorted(addrs, key=lambda a: (a.version, a.packed)))

