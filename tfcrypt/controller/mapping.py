"""Kubernetes objects -> tfcrypt records: pure functions of the objects' JSON (no I/O).

Rules (docs/controller.md, "Mapping"):
- A Pod becomes the workload `workloads/<spec.nodeName>/<namespace>.<name>`, its
  addresses `status.podIPs` (both families; `status.podIP` if the list is absent).
- Tags follow Tungsten Fabric's kube-manager: a label `key: value` is the tag
  `key=value` (the key is the tag type: application, tier, deployment, site, label or a
  custom type), and every pod carries `namespace=<its namespace>` as kube-manager adds.
  A key `tfcrypt.io/<type>` names the type explicitly (it wins over a plain key of the
  same type). `label.tfcrypt.io/<value>` (any value, usually "") adds `label=<value>`:
  a Kubernetes label key holds one value, TF's `label` type many. Other prefixed keys
  (`app.kubernetes.io/name`, `kubernetes.io/...`) are Kubernetes' own vocabulary, not
  tags: ignored, counted.
- Namespace labels are inherited the way TF inherits project tags: a pod's own label of
  a single-valued type wins; `label` holds many values, so the two are united.
- A label that cannot be a tag (a key that is no tag type, e.g. with dots; an empty
  value; the reserved `namespace`) is ignored and counted with its reason, never a crash:
  the rest of the pod's tags are still published.
- At most MAX_TAGS tags: `namespace` first, then the well-known types, then custom types
  alphabetically; the rest is dropped and counted (a 200-label pod stays well under the
  readers' 64 KiB envelope bound, and its record is deterministic).
- Skipped, with a counted reason: host-network pods (their IP is the node's: selecting it
  would capture node traffic), pods not yet scheduled, pods without IPs, finished pods
  (Succeeded/Failed: their IP may already be another pod's) unless terminating, and pods
  whose record the model refuses (the detail says why).
- A terminating pod (deletionTimestamp set) keeps its record until the object is gone.
- An EncryptionPolicy object goes through the CLI's parser (policy_from_document), so
  the cluster and `tfcrypt policy apply -f` accept exactly the same policies.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tfcrypt.errors import ConfigError
from tfcrypt.model.policy import API_VERSION, KIND, EncryptionPolicy, policy_from_document
from tfcrypt.model.tags import LABEL, WELL_KNOWN_TYPES, Tag
from tfcrypt.model.workload import Workload, workload_key

TFCRYPT_PREFIX = "tfcrypt.io/"
LABEL_PREFIX = "label.tfcrypt.io/"  # one key per value of the multi-valued `label` type
NAMESPACE_TYPE = "namespace"
MAX_TAGS = 64

# skip reasons (metric label values; docs/controller.md)
HOST_NETWORK = "host-network"
NOT_SCHEDULED = "not-scheduled"
NO_IPS = "no-ips"
FINISHED = "finished"
INVALID = "invalid"
IP_CONFLICT = "ip-conflict"  # decided across pods: desired.py

# ignored-label reasons
PREFIXED = "prefixed-key"
NOT_A_TYPE = "key-not-a-tag-type"
BAD_VALUE = "value-not-a-tag-value"
RESERVED = "reserved-key"
TOO_MANY = "over-max-tags"
DUPLICATE = "duplicate-type"


@dataclass(frozen=True)
class PodMapping:
    """What one Pod becomes: a workload, or a skip reason; plus the labels ignored."""

    key: str
    workload: Workload | None
    skipped: str | None = None
    detail: str = ""
    ignored: Counter[str] = field(default_factory=Counter)


def pod_name(pod: Mapping[str, Any]) -> str:
    """`<namespace>.<name>`: the workload name of a pod (unique in the cluster)."""
    meta = pod.get("metadata") or {}
    return f"{meta.get('namespace', 'default')}.{meta.get('name', '')}"


def label_tag(key: str, value: object) -> Tag | str:
    """The tag a label means, or the reason it means none."""
    if "/" in key:
        prefix, _, name = key.partition("/")
        if f"{prefix}/" == LABEL_PREFIX:  # `label.tfcrypt.io/pci: ""` -> label=pci
            return _tag(LABEL, name)
        if f"{prefix}/" != TFCRYPT_PREFIX:
            return PREFIXED
        key = name
    kind = key.lower()
    if kind == NAMESPACE_TYPE:
        return RESERVED
    try:
        Tag(kind, "x")
    except ValueError:
        return NOT_A_TYPE
    return _tag(kind, value)


def _tag(kind: str, value: object) -> Tag | str:
    if not isinstance(value, str):
        return BAD_VALUE
    try:
        return Tag(kind, value)
    except ValueError:
        return BAD_VALUE


def tags_of(labels: Mapping[str, Any], ignored: Counter[str]) -> tuple[dict[str, Tag],
                                                                       set[Tag]]:
    """Single-valued tags by type and `label` tags from one object's labels; an explicit
    `tfcrypt.io/<type>` key wins over the plain key of the same type."""
    single: dict[str, Tag] = {}
    explicit: set[str] = set()
    multi: set[Tag] = set()
    for key in sorted(labels):
        tag = label_tag(key, labels[key])
        if isinstance(tag, str):
            ignored[tag] += 1
            continue
        if tag.type == LABEL:
            multi.add(tag)
            continue
        is_explicit = key.startswith(TFCRYPT_PREFIX)
        if tag.type in single:
            ignored[DUPLICATE] += 1  # `Site` and `site`, or a plain and an explicit key
            if tag.type in explicit or not is_explicit:
                continue
        single[tag.type] = tag
        if is_explicit:
            explicit.add(tag.type)
    return single, multi


def effective_tags(namespace: str, pod_labels: Mapping[str, Any],
                   namespace_labels: Mapping[str, Any],
                   ignored: Counter[str]) -> frozenset[Tag]:
    """The pod's tags with the namespace's inherited (the pod's own single value wins,
    `label` values unite), `namespace=<ns>` added, capped at MAX_TAGS."""
    ns_single, ns_multi = tags_of(namespace_labels, ignored)
    pod_single, pod_multi = tags_of(pod_labels, ignored)
    single = {**ns_single, **pod_single}
    tags = [Tag(NAMESPACE_TYPE, namespace)]
    order = {t: i for i, t in enumerate(WELL_KNOWN_TYPES)}
    tags += sorted(single.values(), key=lambda t: (order.get(t.type, len(order)), t.type))
    tags += sorted(ns_multi | pod_multi)
    if len(tags) > MAX_TAGS:
        ignored[TOO_MANY] += len(tags) - MAX_TAGS
        tags = tags[:MAX_TAGS]
    return frozenset(tags)


def pod_ips(pod: Mapping[str, Any]) -> list[str]:
    status = pod.get("status") or {}
    listed = [e.get("ip") for e in status.get("podIPs") or [] if isinstance(e, dict)]
    if not listed and status.get("podIP"):
        listed = [status["podIP"]]
    return [ip for ip in listed if isinstance(ip, str) and ip]


def map_pod(pod: Mapping[str, Any], namespace_labels: Mapping[str, Any]) -> PodMapping:
    """The workload record for `pod` (its namespace's labels given), or why none."""
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    status = pod.get("status") or {}
    namespace = str(meta.get("namespace", "default"))
    name = pod_name(pod)
    node = spec.get("nodeName") or ""
    key = workload_key(node or "-", name)
    if spec.get("hostNetwork"):
        return PodMapping(key, None, HOST_NETWORK, "its IP is the node's")
    if not node:
        return PodMapping(key, None, NOT_SCHEDULED, "no spec.nodeName yet")
    terminating = meta.get("deletionTimestamp") is not None
    if status.get("phase") in ("Succeeded", "Failed") and not terminating:
        return PodMapping(key, None, FINISHED, f"phase {status.get('phase')}")
    ips = pod_ips(pod)
    if not ips:
        return PodMapping(key, None, NO_IPS, "no status.podIPs yet")
    ignored: Counter[str] = Counter()
    tags = effective_tags(namespace, meta.get("labels") or {}, namespace_labels, ignored)
    try:
        workload = Workload(name=name, node=str(node), ips=tuple(ips), tags=tags)
    except ValueError as exc:
        return PodMapping(key, None, INVALID, str(exc), ignored)
    return PodMapping(key, workload, ignored=ignored)


def policy_document(obj: Mapping[str, Any]) -> dict[str, Any]:
    """The parser's document for an EncryptionPolicy object: what a user wrote (name,
    spec), without the server's metadata and status."""
    meta = obj.get("metadata") or {}
    return {"apiVersion": obj.get("apiVersion", API_VERSION), "kind": obj.get("kind", KIND),
            "metadata": {"name": meta.get("name")}, "spec": obj.get("spec")}


def map_policy(obj: Mapping[str, Any]) -> EncryptionPolicy | ConfigError:
    """The policy an object means, or the parser's error naming the field."""
    name = (obj.get("metadata") or {}).get("name")
    try:
        return policy_from_document(policy_document(obj), f"EncryptionPolicy {name}")
    except ConfigError as exc:
        return exc
