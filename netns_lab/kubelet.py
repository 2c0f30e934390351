"""The lab plays the kubelet: a Node object per lab node, a Pod object per lab workload.

Why: the lab's workloads are network namespaces, not containers, and no kubelet runs;
yet the tfcrypt controller reads Pods (spec.nodeName, status.podIPs, labels) the way a
real cluster presents them. So the lab writes what a kubelet would:
- Node `<node>` (n1, ...): addresses (InternalIP = its underlay address(es), Hostname),
  podCIDRs = its workload subnet(s), condition Ready, through the status subresource
  (a merge patch: server-side apply keys addresses by type, so cannot hold two).
- Pod `<workload>` (n1-w1, ...) in POD_NAMESPACE: spec.nodeName = its node (bound at
  creation, as if scheduled), one container that never runs anything, no ServiceAccount
  token; then, through the status subresource, phase Running, Ready, hostIP(s) = the
  node's underlay address(es) and podIP(s) = the workload's addresses (IPv4 first), so
  `kubectl get pods -o wide` shows the lab.
- Labels come from the caller: `put_pods(lab, labels_of)`; `labels_for_tags` turns lab
  tags into labels by the mapping documented in docs/lab.md ("Kubernetes").
- Deletion: a bound pod deleted with a grace period stays Terminating until its kubelet
  confirms; `delete_pod(..., force=False)` leaves it so (what a controller sees while a
  pod shuts down), `finish_pod` / `force=True` is the kubelet's final delete.
Pods are written with server-side apply under the field manager `netns-lab`, so a
test's own `kubectl label` (another manager) is kept by a later put_pods.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import yaml

from . import kube
from .errors import LabError

if TYPE_CHECKING:
    from .lab import Lab

POD_NAMESPACE = "lab"
CONTAINER = "workload"
IMAGE = "netns-lab/workload:none"  # never pulled: no kubelet
LAB_LABEL = "netns-lab.tfcrypt.io/lab"
LABEL_PREFIX = "label.tfcrypt.io/"


def labels_for_tags(tags: Iterable[str]) -> dict[str, str]:
    """Lab tags -> Pod labels: `type=value` -> label `type: value` (the label's key is the
    tag type, as Tungsten Fabric's kube-manager makes a tag per label); `label=v` (the
    one multi-valued type) -> `label.tfcrypt.io/v: ""` (a label key holds one value)."""
    out: dict[str, str] = {}
    for tag in tags:
        kind, sep, value = tag.partition("=")
        if not sep:
            raise LabError(f"tag {tag!r} is not type=value")
        if kind.lower() == "label":
            out[f"{LABEL_PREFIX}{value}"] = ""
        else:
            out[kind.lower()] = value
    return out


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def node_objects(lab: Lab) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(Node objects, their status documents)."""
    objs: list[dict[str, Any]] = []
    statuses: list[dict[str, Any]] = []
    now = _now()
    for n in lab.layout.all_nodes():
        cidrs = [n.workload_subnet, *([n.workload_subnet6] if n.workload_subnet6 else [])]
        meta: dict[str, Any] = {"name": n.name}
        objs.append({"apiVersion": "v1", "kind": "Node", "metadata": {
            **meta, "labels": {"kubernetes.io/hostname": n.name, "kubernetes.io/os": "linux",
                               LAB_LABEL: lab.name}},
            "spec": {"podCIDR": cidrs[0], "podCIDRs": cidrs}})
        ips = sorted({n.underlay_ip, *([n.underlay_ip6] if n.underlay_ip6 else [])},
                     key=lambda a: (":" in a, a))
        statuses.append({"apiVersion": "v1", "kind": "Node", "metadata": meta, "status": {
            "addresses": [*({"type": "InternalIP", "address": a} for a in ips),
                          {"type": "Hostname", "address": n.name}],
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                            "message": "netns_lab plays the kubelet",
                            "lastHeartbeatTime": now, "lastTransitionTime": now}]}})
    return objs, statuses


def pod_objects(lab: Lab, labels_of: Mapping[str, Mapping[str, str]] | None = None,
                namespace: str = POD_NAMESPACE, only: Iterable[str] | None = None
                ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(Pod objects, their status documents) for the lab's workloads (or `only` those)."""
    lay = lab.layout
    nodes = {n.name: n for n in lay.all_nodes()}
    wanted = None if only is None else set(only)
    objs: list[dict[str, Any]] = []
    statuses: list[dict[str, Any]] = []
    now = _now()
    for w in lay.all_workloads():
        if wanted is not None and w.name not in wanted:
            continue
        node = nodes[w.node]
        meta: dict[str, Any] = {"name": w.name, "namespace": namespace}
        objs.append({"apiVersion": "v1", "kind": "Pod", "metadata": {
            **meta, "labels": dict((labels_of or {}).get(w.name, {}))},
            "spec": {"nodeName": w.node, "automountServiceAccountToken": False,
                     "enableServiceLinks": False,
                     "containers": [{"name": CONTAINER, "image": IMAGE}]}})
        host_ips = sorted({node.underlay_ip, *([node.underlay_ip6] if node.underlay_ip6
                                               else [])}, key=lambda a: (":" in a, a))
        cond = [{"type": t, "status": "True", "lastTransitionTime": now}
                for t in ("PodScheduled", "Initialized", "ContainersReady", "Ready")]
        statuses.append({"apiVersion": "v1", "kind": "Pod", "metadata": meta, "status": {
            "phase": "Running", "conditions": cond, "startTime": now,
            "hostIP": host_ips[0], "hostIPs": [{"ip": a} for a in host_ips],
            "podIP": w.ips[0], "podIPs": [{"ip": a} for a in w.ips],
            "containerStatuses": [{
                "name": CONTAINER, "image": IMAGE, "imageID": "", "ready": True,
                "started": True, "restartCount": 0,
                "state": {"running": {"startedAt": now}}}]}})
    if wanted is not None and (unknown := wanted - {o["metadata"]["name"] for o in objs}):
        raise LabError(f"unknown workload(s) {', '.join(sorted(unknown))} in lab {lab.name}")
    return objs, statuses


def _apply(lab: Lab, objs: list[dict[str, Any]], *, status: bool = False) -> None:
    if not objs:
        return
    kube.kubectl(lab, "apply", "--server-side", f"--field-manager={kube.FIELD_MANAGER}",
                 "--force-conflicts", *(["--subresource=status"] if status else []),
                 "-f", "-", input=yaml.safe_dump_all(objs, sort_keys=False))


def ensure_namespace(lab: Lab, namespace: str) -> None:
    _apply(lab, [{"apiVersion": "v1", "kind": "Namespace",
                  "metadata": {"name": namespace, "labels": {LAB_LABEL: lab.name}}}])


def register(lab: Lab) -> None:
    """`up --kubernetes`: every Node, the pod namespace, every Pod (no labels yet)."""
    nodes, node_status = node_objects(lab)
    _apply(lab, nodes)
    for st in node_status:  # a merge patch: apply cannot hold two InternalIPs (dual stack),
        # server-side apply keys status.addresses by type
        kube.kubectl(lab, "patch", "node", st["metadata"]["name"], "--subresource=status",
                     "--type=merge", "-p", json.dumps({"status": st["status"]}))
    ensure_namespace(lab, POD_NAMESPACE)
    put_pods(lab)


def put_pods(lab: Lab, labels_of: Mapping[str, Mapping[str, str]] | None = None,
             namespace: str = POD_NAMESPACE, only: Iterable[str] | None = None) -> None:
    """Create or update the Pods of the lab's workloads (or `only` those) with the labels
    `labels_of[workload]` (labels this function set before and no longer gives are
    removed; labels set by others stay), then their Running status."""
    if namespace != POD_NAMESPACE:
        ensure_namespace(lab, namespace)
    pods, pod_status = pod_objects(lab, labels_of, namespace, only)
    _apply(lab, pods)
    _apply(lab, pod_status, status=True)


def delete_pod(lab: Lab, workload: str, namespace: str = POD_NAMESPACE, *,
               force: bool = False) -> None:
    """Delete a lab Pod. Without `force` it stays Terminating (deletionTimestamp set) until
    `finish_pod`, as a real pod does until its kubelet has stopped it."""
    args = ["delete", "pod", workload, "-n", namespace, "--wait=false"]
    if force:
        args += ["--grace-period=0", "--force"]
    kube.kubectl(lab, *args)


def finish_pod(lab: Lab, workload: str, namespace: str = POD_NAMESPACE) -> None:
    """The kubelet's last word on a terminating pod: remove the object."""
    delete_pod(lab, workload, namespace, force=True)
