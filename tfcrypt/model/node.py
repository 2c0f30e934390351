"""NodeRecord: what a node publishes at `nodes/<node>` so peers can reach it.

Rules:
- Constructing a NodeRecord validates and normalises every field (ValueError naming the
  field); a record read from etcd goes through `from_verified`, which turns those errors
  into Rejected(MISSING_FIELD / INVALID_FIELD) with the field path.
- The record speaks for its signer only: `spiffe_id` must equal the envelope's signer
  (UNAUTHORIZED otherwise) and `node` must be the node of the key it is stored at.
- Normal forms, so that "nothing changed" is `==`: endpoint `a.b.c.d:port` or `[v6]:port`
  with the address in its compressed form; workload_subnets as network CIDRs (no host
  bits), deduplicated and sorted IPv4 first.
- `workload_subnets` is optional on read (empty when absent): the mesh stepping stone uses
  it; once workloads come from their own keys it is ignored.
- Unknown payload fields are ignored so a newer writer does not break an older reader.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tfcrypt.errors import Rejected, RejectReason
from tfcrypt.identity.authz import is_node_name

if TYPE_CHECKING:
    from tfcrypt.identity.verify import Verified

KIND = "NodeRecord"
_PORT_RE = re.compile(r"^[0-9]{1,5}$")
_STRING_FIELDS = ("node", "spiffe_id", "wg_public_key", "endpoint")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def node_key(node: str) -> str:
    """The etcd key (relative to the prefix) of `node`'s record."""
    return f"nodes/{node}"


@dataclass(frozen=True)
class NodeRecord:
    """One node's WireGuard identity, bound to its SPIFFE ID by the envelope signature."""

    node: str
    spiffe_id: str
    wg_public_key: str
    endpoint: str
    workload_subnets: tuple[str, ...]
    epoch: int
    issued_at: int

    def __post_init__(self) -> None:
        if not isinstance(self.node, str) or not is_node_name(self.node):
            raise ValueError(f"node: {self.node!r} is not a valid node name")
        if not isinstance(self.spiffe_id, str) or not self.spiffe_id.startswith("spiffe://"):
            raise ValueError("spiffe_id: not a spiffe:// URI")
        _check_wg_key(self.wg_public_key)
        object.__setattr__(self, "endpoint", normalise_endpoint(self.endpoint))
        object.__setattr__(self, "workload_subnets",
                           normalise_subnets(self.workload_subnets))
        for name in ("epoch", "issued_at"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name}: not an integer")
        if self.epoch < 0:
            raise ValueError("epoch: must be >= 0")

    @property
    def key(self) -> str:
        return node_key(self.node)

    def to_payload(self) -> dict[str, Any]:
        """The payload to sign with `sign_envelope` and store at `self.key`."""
        return {
            "kind": KIND,
            "key": self.key,
            "epoch": self.epoch,
            "issued_at": self.issued_at,
            "node": self.node,
            "spiffe_id": self.spiffe_id,
            "wg_public_key": self.wg_public_key,
            "endpoint": self.endpoint,
            "workload_subnets": list(self.workload_subnets),
        }

    @classmethod
    def from_verified(cls, verified: Verified) -> NodeRecord:
        """The record in a verified envelope, or Rejected naming the offending field."""
        p: Mapping[str, Any] = verified.payload
        if verified.kind != KIND:
            raise Rejected(RejectReason.INVALID_FIELD,
                           f"payload.kind: {verified.kind!r}, expected {KIND!r}")
        for name in _STRING_FIELDS:
            if name not in p:
                raise Rejected(RejectReason.MISSING_FIELD, f"payload.{name}")
            if not isinstance(p[name], str):
                raise Rejected(RejectReason.INVALID_FIELD, f"payload.{name}: not a string")
        subnets = p.get("workload_subnets", [])
        if not isinstance(subnets, list) or not all(isinstance(s, str) for s in subnets):
            raise Rejected(RejectReason.INVALID_FIELD,
                           "payload.workload_subnets: not a list of strings")
        if verified.key != node_key(p["node"]):
            raise Rejected(RejectReason.KEY_MISMATCH,
                           f"payload.node {p['node']!r} does not match key {verified.key!r}")
        if p["spiffe_id"] != verified.signer:
            raise Rejected(RejectReason.UNAUTHORIZED,
                           f"payload.spiffe_id {p['spiffe_id']!r} is not the signer "
                           f"{verified.signer!r}")
        try:
            return cls(node=p["node"], spiffe_id=p["spiffe_id"],
                       wg_public_key=p["wg_public_key"], endpoint=p["endpoint"],
                       workload_subnets=tuple(subnets), epoch=verified.epoch,
                       issued_at=verified.issued_at)
        except ValueError as e:
            raise Rejected(RejectReason.INVALID_FIELD, f"payload.{e}") from None


def _check_wg_key(value: object) -> None:
    if not isinstance(value, str):
        raise ValueError("wg_public_key: not a string")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("wg_public_key: not base64") from None
    if len(raw) != 32 or base64.b64encode(raw).decode("ascii") != value:
        raise ValueError("wg_public_key: not the base64 of 32 bytes")
    if raw == bytes(32):
        raise ValueError("wg_public_key: the all-zero key means no key")


def normalise_endpoint(value: object) -> str:
    """`ip:port` for IPv4, `[ip]:port` for IPv6; the address must be a unicast address."""
    if not isinstance(value, str):
        raise ValueError("endpoint: not a string")
    host, sep, port = value.rpartition(":")
    if not sep or not _PORT_RE.fullmatch(port) or not 1 <= int(port) <= 65535:
        raise ValueError(f"endpoint: {value!r} needs a port 1-65535")
    bracketed = host.startswith("[") and host.endswith("]")
    try:
        addr = ipaddress.ip_address(host[1:-1] if bracketed else host)
    except ValueError:
        raise ValueError(f"endpoint: {value!r} has no IP address") from None
    if bracketed != (addr.version == 6):
        raise ValueError(f"endpoint: {value!r}: IPv6 goes in brackets, IPv4 does not")
    if isinstance(addr, ipaddress.IPv6Address) and addr.scope_id is not None:
        raise ValueError(f"endpoint: {value!r}: a zone is local to one host")
    if addr.is_unspecified or addr.is_multicast:
        raise ValueError(f"endpoint: {value!r} is not a unicast address")
    shown = f"[{addr}]" if addr.version == 6 else str(addr)
    return f"{shown}:{int(port)}"


def normalise_subnets(values: Iterable[object]) -> tuple[str, ...]:
    """Network CIDRs without host bits, deduplicated, IPv4 first, then by address."""
    if isinstance(values, str):
        raise ValueError("workload_subnets: a list of CIDRs, not one string")
    nets: set[Network] = set()
    for i, value in enumerate(values):
        if not isinstance(value, str):
            raise ValueError(f"workload_subnets[{i}]: not a string")
        try:
            nets.add(ipaddress.ip_network(value, strict=True))
        except ValueError:
            raise ValueError(f"workload_subnets[{i}]: {value!r} is not a network CIDR "
                             "(host bits set?)") from None
    ordered = sorted(nets, key=lambda n: (n.version, n.network_address.packed, n.prefixlen))
    return tuple(str(n) for n in ordered)
