"""EncryptionPolicy: which workload pairs must be encrypted, as a CRD-shaped document.

Rules (DESIGN.md, "Policy model"; docs/policy.md):
- Document shape: apiVersion tfcrypt.io/v1alpha1, kind EncryptionPolicy, metadata.name a
  DNS-1123 subdomain, spec.mode enforce (default) or audit, spec.rules a non-empty list of
  {endpoint1, endpoint2, match_tags}. An endpoint has exactly one of `tags` (a non-empty
  list, all must hold), `subnet` (a CIDR without host bits), `any: true`.
- match_tags lists tag types (lowercased, deduplicated, sorted); `label` is refused,
  because a multi-valued type has no single value to compare. Default empty: for
  encryption a surprising non-match would leave traffic in plaintext, so nothing is
  implied.
- A bad policy is rejected whole, with a PolicyError whose message names the source, the
  field path and the problem ("payments.yaml: spec.rules[1].endpoint2: exactly one of
  tags, subnet, any"). Half a policy could select less than its author meant.
- Files are strict: an unknown key is an error (a typo must not pass unnoticed). Signed
  payloads from etcd ignore unknown keys, so an older agent keeps enforcing what it
  understands of a newer controller's policy; every new selector lives in an endpoint,
  where a selector the reader does not know leaves "exactly one of" unmet and rejects.
- An endpoint whose tags name two values of a single-valued type can never match and is
  refused as a mistake.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tfcrypt import safeyaml
from tfcrypt.errors import ConfigError, Rejected, RejectReason
from tfcrypt.model.tags import LABEL, Tag, check_single_values, sorted_tag_texts

if TYPE_CHECKING:
    from tfcrypt.identity.verify import Verified

KIND = "EncryptionPolicy"
API_VERSION = "tfcrypt.io/v1alpha1"
DNS_SUBDOMAIN_RE = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$")
_TOP_KEYS = frozenset({"apiVersion", "kind", "metadata", "spec", "status"})
_SPEC_KEYS = frozenset({"mode", "rules"})
_RULE_KEYS = frozenset({"endpoint1", "endpoint2", "match_tags"})
_ENDPOINT_KEYS = ("tags", "subnet", "any")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class PolicyError(ConfigError):
    """A policy document that cannot be used; the message is `source: path: problem`."""


class Mode(enum.Enum):
    """enforce changes the dataplane; audit (TF draft mode) is computed and reported only."""

    ENFORCE = "enforce"
    AUDIT = "audit"


class EndpointKind(enum.Enum):
    TAGS = "tags"
    SUBNET = "subnet"
    ANY = "any"


def policy_key(name: str) -> str:
    """The etcd key (relative to the prefix) of policy `name`."""
    return f"policies/{name}"


def is_policy_name(name: str) -> bool:
    return DNS_SUBDOMAIN_RE.fullmatch(name) is not None and ".." not in name


@dataclass(frozen=True)
class Endpoint:
    """One side of a rule: exactly one of `tags` (all must hold), `subnet`, `any`."""

    tags: frozenset[Tag] | None = None
    subnet: str | None = None
    any: bool = False

    def __post_init__(self) -> None:
        given = [self.tags is not None, self.subnet is not None, self.any]
        if sum(given) != 1:
            raise ValueError("exactly one of tags, subnet, any")
        if self.tags is not None:
            if not self.tags:
                raise ValueError("tags: at least one tag (use any: true to match everything)")
            try:
                check_single_values(self.tags)
            except ValueError as e:
                raise ValueError(f"tags: can never match: {e}") from None
        if self.subnet is not None:
            object.__setattr__(self, "subnet", str(_parse_subnet(self.subnet)))

    @property
    def kind(self) -> EndpointKind:
        if self.tags is not None:
            return EndpointKind.TAGS
        return EndpointKind.SUBNET if self.subnet is not None else EndpointKind.ANY

    @property
    def network(self) -> Network | None:
        return ipaddress.ip_network(self.subnet) if self.subnet is not None else None

    def to_document(self) -> dict[str, Any]:
        if self.tags is not None:
            return {"tags": sorted_tag_texts(self.tags)}
        if self.subnet is not None:
            return {"subnet": self.subnet}
        return {"any": True}

    def describe(self) -> str:
        """Short human form: `tags application=payments,site=a`, `subnet 10.0.0.0/8`, `any`."""
        if self.tags is not None:
            return "tags " + ",".join(sorted_tag_texts(self.tags))
        return f"subnet {self.subnet}" if self.subnet is not None else "any"


@dataclass(frozen=True)
class Rule:
    """Select pairs with one workload in each endpoint (either way round), match_tags equal."""

    endpoint1: Endpoint
    endpoint2: Endpoint
    match_tags: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "match_tags", normalise_match_tags(self.match_tags))

    def to_document(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"endpoint1": self.endpoint1.to_document(),
                               "endpoint2": self.endpoint2.to_document()}
        if self.match_tags:
            doc["match_tags"] = list(self.match_tags)
        return doc


@dataclass(frozen=True)
class EncryptionPolicy:
    """A named, validated policy; `==` compares content (mode and rules, in order)."""

    name: str
    mode: Mode
    rules: tuple[Rule, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not is_policy_name(self.name):
            raise ValueError(f"metadata.name: {_x(self.name)} is not a DNS-1123 subdomain name")
        if not isinstance(self.mode, Mode):
            raise ValueError(f"spec.mode: {_x(self.mode)} is not a Mode")
        object.__setattr__(self, "rules", tuple(self.rules))
        if not self.rules:
            raise ValueError("spec.rules: at least one rule")

    @property
    def key(self) -> str:
        return policy_key(self.name)

    @property
    def enforced(self) -> bool:
        return self.mode is Mode.ENFORCE

    def spec_document(self) -> dict[str, Any]:
        return {"mode": self.mode.value, "rules": [r.to_document() for r in self.rules]}

    def to_document(self) -> dict[str, Any]:
        """The CRD-shaped document (what `policy list` shows, what a file holds)."""
        return {"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": self.name},
                "spec": self.spec_document()}

    def to_payload(self, *, epoch: int, issued_at: int) -> dict[str, Any]:
        """The payload to sign with `sign_envelope` and store at `self.key`."""
        return {"kind": KIND, "key": self.key, "epoch": epoch, "issued_at": issued_at,
                "name": self.name, "spec": self.spec_document()}

    @classmethod
    def from_verified(cls, verified: Verified) -> EncryptionPolicy:
        """The policy in a verified envelope, or Rejected naming the offending field."""
        p: Mapping[str, Any] = verified.payload
        if verified.kind != KIND:
            raise Rejected(RejectReason.INVALID_FIELD,
                           f"payload.kind: {_x(verified.kind)}, expected {KIND!r}")
        for name in ("name", "spec"):
            if name not in p:
                raise Rejected(RejectReason.MISSING_FIELD, f"payload.{name}")
        if not isinstance(p["name"], str):
            raise Rejected(RejectReason.INVALID_FIELD, "payload.name: not a string")
        if verified.key != policy_key(p["name"]):
            raise Rejected(RejectReason.KEY_MISMATCH,
                           f"payload.name {_x(p['name'])} does not match key {_x(verified.key)}")
        try:
            return _build(p["name"], p["spec"], "spec", strict=False)
        except _FieldError as e:
            raise Rejected(RejectReason.INVALID_FIELD, f"payload.{e.path}: {e.problem}") \
                from None


class _FieldError(ValueError):
    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


def parse_policy_document(text: str, source: str = "FILE") -> EncryptionPolicy:
    """Parse one YAML (or JSON) EncryptionPolicy document; PolicyError names source and path.

    YAML is read by tfcrypt.safeyaml: duplicate keys, anchors and aliases are refused."""
    try:
        doc = safeyaml.load(text, source)
    except safeyaml.InputError as e:
        raise PolicyError(str(e)) from None
    return policy_from_document(doc, source)


def read_policy_file(path: str, what: str = "-f") -> EncryptionPolicy:
    """The policy in file `path`, read by tfcrypt.safeyaml (bounded size, UTF-8)."""
    try:
        text = safeyaml.read_text(path, what=what, noun="policy file")
    except safeyaml.InputError as e:
        raise PolicyError(str(e)) from None
    return parse_policy_document(text, source=path)


def policy_from_document(doc: object, source: str = "FILE") -> EncryptionPolicy:
    """Validate an already-loaded document (a dict); strict about unknown keys."""
    try:
        top = _mapping(doc, "(document)")
        _no_unknown(top, _TOP_KEYS, "")
        for name, expected in (("apiVersion", API_VERSION), ("kind", KIND)):
            if name not in top:
                raise _FieldError(name, "missing")
            if top[name] != expected:
                raise _FieldError(name, f"{_x(top[name])}, expected {expected!r}")
        meta = _mapping(top.get("metadata"), "metadata")
        if "name" not in meta:
            raise _FieldError("metadata.name", "missing")
        if not isinstance(meta["name"], str) or not is_policy_name(meta["name"]):
            raise _FieldError("metadata.name", f"{_x(meta['name'])} is not a DNS-1123 "
                              "subdomain name (lowercase letters, digits, '-', '.')")
        if "spec" not in top:
            raise _FieldError("spec", "missing")
        return _build(meta["name"], top["spec"], "spec", strict=True)
    except _FieldError as e:
        raise PolicyError(f"{source}: {e.path}: {e.problem}") from None


def _build(name: str, spec_doc: object, path: str, *, strict: bool) -> EncryptionPolicy:
    spec = _mapping(spec_doc, path)
    if strict:
        _no_unknown(spec, _SPEC_KEYS, path)
    mode_text = spec.get("mode", Mode.ENFORCE.value)
    try:
        mode = Mode(mode_text)
    except ValueError:
        raise _FieldError(f"{path}.mode", f"{_x(mode_text)}, expected one of "
                          f"{', '.join(m.value for m in Mode)}") from None
    if "rules" not in spec:
        raise _FieldError(f"{path}.rules", "missing (at least one rule)")
    rules_doc = spec["rules"]
    if not isinstance(rules_doc, list):
        raise _FieldError(f"{path}.rules", "not a list")
    if not rules_doc:
        raise _FieldError(f"{path}.rules", "empty (at least one rule)")
    rules = tuple(_rule(r, f"{path}.rules[{i}]", strict) for i, r in enumerate(rules_doc))
    return EncryptionPolicy(name=name, mode=mode, rules=rules)


def _rule(doc: object, path: str, strict: bool) -> Rule:
    rule = _mapping(doc, path)
    if strict:
        _no_unknown(rule, _RULE_KEYS, path)
    ends = []
    for side in ("endpoint1", "endpoint2"):
        if side not in rule:
            raise _FieldError(f"{path}.{side}", "missing")
        ends.append(_endpoint(rule[side], f"{path}.{side}", strict))
    match = rule.get("match_tags", [])
    if not isinstance(match, list):
        raise _FieldError(f"{path}.match_tags", "not a list of tag types")
    try:
        match_tags = normalise_match_tags(match)
    except _FieldError as e:
        raise _FieldError(f"{path}.match_tags{e.path}", e.problem) from None
    return Rule(ends[0], ends[1], match_tags)


def _endpoint(doc: object, path: str, strict: bool) -> Endpoint:
    ep = _mapping(doc, path)
    if strict:
        _no_unknown(ep, frozenset(_ENDPOINT_KEYS), path)
    present = [k for k in _ENDPOINT_KEYS if k in ep]
    if len(present) != 1:
        raise _FieldError(path, "exactly one of tags, subnet, any")
    kind = present[0]
    value = ep[kind]
    if kind == "any":
        if value is not True:
            raise _FieldError(f"{path}.any", f"{_x(value)}: must be true (to match everything)")
        return Endpoint(any=True)
    if kind == "subnet":
        if not isinstance(value, str):
            raise _FieldError(f"{path}.subnet", f"{_x(value)} is not a CIDR string")
        try:
            return Endpoint(subnet=str(_parse_subnet(value)))
        except ValueError as e:
            raise _FieldError(f"{path}.subnet", str(e)) from None
    if not isinstance(value, list):
        raise _FieldError(f"{path}.tags", "not a list of type=value strings")
    if not value:
        raise _FieldError(f"{path}.tags", "empty (use any: true to match everything)")
    tags: set[Tag] = set()
    for i, text in enumerate(value):
        try:
            tags.add(Tag.parse(text))
        except ValueError as e:
            raise _FieldError(f"{path}.tags[{i}]", str(e)) from None
    try:
        return Endpoint(tags=frozenset(tags))
    except ValueError as e:
        raise _FieldError(path, str(e)) from None


def normalise_match_tags(values: Sequence[object]) -> tuple[str, ...]:
    """Lowercased, deduplicated, sorted tag types; `label` refused.

    Raises _FieldError (a ValueError-like with a `[i]` path suffix) so the parser can
    name the position; Rule construction turns it into ValueError.
    """
    if isinstance(values, str):
        raise _FieldError("", "a list of tag types, not one string")
    types: set[str] = set()
    for i, value in enumerate(values):
        if not isinstance(value, str):
            raise _FieldError(f"[{i}]", f"{_x(value)} is not a tag type")
        kind = value.lower()
        if kind == LABEL:
            raise _FieldError(f"[{i}]", "label holds many values and cannot be matched")
        try:
            Tag(kind, "x")
        except ValueError:
            raise _FieldError(f"[{i}]", f"{_x(value)} is not a tag type") from None
        types.add(kind)
    return tuple(sorted(types))


def _parse_subnet(value: str) -> Network:
    """address/prefix-length only, as the CRD's `format: cidr` (Go's ParseCIDR) reads it:
    a bare address or an address/netmask would mean one thing here and be refused by the
    API server."""
    _, slash, prefix = value.partition("/")
    if not slash or not prefix.isdigit():
        raise ValueError(f"{_x(value)} is not a network CIDR (address/prefix-length, "
                         "e.g. 10.0.0.0/24)")
    try:
        return ipaddress.ip_network(value, strict=True)
    except ValueError:
        raise ValueError(f"{_x(value)} is not a network CIDR (host bits set?)") from None


def _x(value: object) -> str:
    """A value quoted in a message: a bounded excerpt (a message must stay one short line)."""
    return safeyaml.excerpt(value)


def _mapping(value: object, path: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise _FieldError(path, "not a mapping")
    return value


def _no_unknown(doc: Mapping[str, Any], known: frozenset[str], path: str) -> None:
    unknown = sorted(str(k) for k in doc if k not in known)
    if unknown:
        first = unknown[0] if len(unknown[0]) <= safeyaml.MAX_EXCERPT else _x(unknown[0])
        where = f"{path}.{first}" if path else first
        raise _FieldError(where, f"unknown field (known: {', '.join(sorted(known))})")
