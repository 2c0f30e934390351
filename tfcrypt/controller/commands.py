"""What `tfcrypt workload ...` and `tfcrypt policy ...` do, as functions of a session.

Rules:
- Input is parsed and validated before anything is written: a bad policy file or tag is a
  ConfigError naming the problem, and etcd is untouched.
- A workload's key holds its node (`workloads/<node>/<name>`): `workload set` for a
  workload that exists on another node writes the new key first, then deletes the old
  one, so agents see it move without a moment in which it is unknown.
- Listings show what agents would believe: every value under the prefix goes through the
  readers' verification and parsing (the same VerifiedView), and one they would refuse is
  a row in state `refused: <reason>` rather than hidden: a policy that is in etcd but
  enforced nowhere must be visible.
- Nothing is written that the readers would refuse (ControllerSession.put_signed).
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Mapping
from typing import Any

from tfcrypt.controller.session import ControllerSession
from tfcrypt.core.explain import (
    Explanation,
    GlobalView,
    PlanDiff,
    explain,
)
from tfcrypt.core.infrastructure import infrastructure_of, screen_one
from tfcrypt.core.seen import enforced_diff
from tfcrypt.errors import ConfigError
from tfcrypt.identity.view import VerifiedView
from tfcrypt.model.node import NodeRecord
from tfcrypt.model.policy import EncryptionPolicy, policy_key
from tfcrypt.model.tags import sorted_tag_texts
from tfcrypt.model.workload import Workload, workload_key


def build_workload(name: str, node: str, ips: list[str], tags: list[str]) -> Workload:
    try:
        return Workload(name=name, node=node, ips=tuple(ips), tags=frozenset(tags))  # type: ignore[arg-type]
    except ValueError as exc:
        raise ConfigError(f"workload {name}: {exc}") from None


async def workload_set(s: ControllerSession, workload: Workload,
                       infrastructure: Mapping[str, str] | None = None) -> str:
    """Write the workload; say which of its addresses agents refuse for selection as
    infrastructure (written anyway: a host-network pod's record is legitimate, its
    address is just never selected; docs/policy.md)."""
    s.require_controller()
    view = await s.read_view()
    elsewhere = [k for k, w in view.of("workloads/").items()
                 if w.name == workload.name and k != workload.key]
    epoch = s.next_epoch(view, workload.key)
    await s.put_signed(workload.key, workload.to_payload(epoch=epoch,
                                                         issued_at=int(time.time())),
                       workload)
    for key in elsewhere:
        await s.delete(key)
    moved = f" (moved from {', '.join(k.split('/')[1] for k in elsewhere)})" if elsewhere else ""
    _, refused = screen_one(workload, infrastructure_of(infrastructure or {},
                                                        _global_view(view)[2]))
    note = "".join(f"\n  {ip} is infrastructure ({why}): agents refuse it for selection"
                   for ip, why in refused.items())
    return f"workload {workload.name} on {workload.node}: set, epoch {epoch}{moved}{note}"


async def workload_delete(s: ControllerSession, name: str, node: str | None) -> str:
    if node is not None:
        keys = [workload_key(node, name)]
    else:
        listed = await s.registry.get_all("workloads/")
        keys = [k for k in listed.items if k.rsplit("/", 1)[-1] == name]
    deleted = [k for k in keys if await s.delete(k)]
    if not deleted:
        raise ConfigError(f"workload {name}: not found"
                          f"{' on node ' + node if node else ''}")
    return f"workload {name}: deleted ({', '.join(deleted)})"


async def workload_rows(s: ControllerSession) -> list[dict[str, Any]]:
    view = await s.read_view()
    rows: list[dict[str, Any]] = [
        {"key": k, "name": w.name, "node": w.node, "ips": list(w.ips),
         "tags": sorted_tag_texts(w.tags), "epoch": view.epoch(k), "state": "ok",
         "verified": True}
        for k, w in view.of("workloads/").items()]
    rows += [{"key": k, "name": k.rsplit("/", 1)[-1], "node": k.split("/")[1], **_refused(view, k)}
             for k in _refused_keys(view, "workloads/")]
    return sorted(rows, key=lambda r: r["key"])


def _refused_keys(view: VerifiedView, prefix: str) -> list[str]:
    """Keys under `prefix` holding a value the agents would not believe."""
    return [k for k in view.raw if k.startswith(prefix) and k not in view.records]


def _refused(view: VerifiedView, key: str) -> dict[str, Any]:
    reason = view.last_rejection.get(key, "not verified")
    return {"state": f"refused: {reason}", "verified": False, "rejected": reason}


async def policy_apply(s: ControllerSession, policy: EncryptionPolicy) -> str:
    s.require_controller()
    view = await s.read_view()
    before = view.records.get(policy.key)
    if before == policy:
        return f"policy {policy.name}: unchanged"
    epoch = s.next_epoch(view, policy.key)
    await s.put_signed(policy.key, policy.to_payload(epoch=epoch, issued_at=int(time.time())),
                       policy)
    verb = "configured" if before is not None else "created"
    return f"policy {policy.name}: {verb} ({policy.mode.value}, {len(policy.rules)} rule(s))"


async def policy_delete(s: ControllerSession, name: str) -> str:
    if not await s.delete(policy_key(name)):
        raise ConfigError(f"policy {name}: not found")
    return f"policy {name}: deleted"


async def policy_rows(s: ControllerSession) -> list[dict[str, Any]]:
    view = await s.read_view()
    rows: list[dict[str, Any]] = [
        {"key": k, "name": p.name, "mode": p.mode.value, "rules": len(p.rules),
         "epoch": view.epoch(k), "state": "ok", "verified": True, "document": p.to_document()}
        for k, p in view.of("policies/").items()]
    rows += [{"key": k, "name": k.removeprefix("policies/"), **_refused(view, k)}
             for k in _refused_keys(view, "policies/")]
    return sorted(rows, key=lambda r: r["key"])


def _global_view(view: VerifiedView) -> tuple[dict[str, Workload],
                                                dict[str, EncryptionPolicy],
                                                dict[str, NodeRecord]]:
    return (view.of("workloads/"),
            {p.name: p for p in view.of("policies/").values()},
            {r.node: r for r in view.of("nodes/").values()})


def inventory_of(view: VerifiedView) -> GlobalView:
    """The verified workloads, policies and node records of `view`, as explain reads them."""
    return GlobalView(*_global_view(view))


async def explain_flow(s: ControllerSession, src_ip: str, dst_ip: str,
                       infrastructure: Mapping[str, str] | None = None) -> Explanation:
    for what, ip in (("SRC_IP", src_ip), ("DST_IP", dst_ip)):
        try:
            ipaddress.ip_address(ip)
        except ValueError:
            raise ConfigError(f"{what}: {ip!r} is not an IP address") from None
    return explain(GlobalView(*_global_view(await s.read_view())), src_ip, dst_ip,
                   infrastructure)


async def policy_plan(s: ControllerSession, policy: EncryptionPolicy,
                      infrastructure: Mapping[str, str] | None = None) -> dict[str, Any]:
    """What enforcing `policy` (as written, or as if enforced when it is audit-mode) would
    change, and whether every node it needs has a verified key; infrastructure addresses
    (node records', plus `infrastructure`) are screened out as the agents do."""
    return plan_of(inventory_of(await s.read_view()), policy, infrastructure)


def plan_of(inventory: GlobalView, policy: EncryptionPolicy,
            infrastructure: Mapping[str, str] | None = None,
            diff: PlanDiff | None = None) -> dict[str, Any]:
    """`policy_plan` of an inventory already read; `diff`: `enforced_diff` of the same
    arguments, when the caller has it (`plan --against-seen` computes it once)."""
    if diff is None:
        diff = enforced_diff(inventory, policy, infrastructure)
    affected = sorted(set(diff.per_node) | diff.missing_peers)
    nodes = inventory.nodes
    return {
        "policy": policy.name,
        "as_if_enforced": not policy.enforced,
        "diff": diff,
        "nodes": [{"node": n, "verified_key": n in nodes and n not in diff.missing_peers,
                   "added": diff.per_node[n].added if n in diff.per_node else 0,
                   "removed": diff.per_node[n].removed if n in diff.per_node else 0}
                  for n in affected],
    }


def render_plan(plan: dict[str, Any]) -> str:
    diff: PlanDiff = plan["diff"]
    head = f"policy {plan['policy']}" + (" (audit mode; shown as if enforced)"
                                         if plan["as_if_enforced"] else "")
    lines = [head, diff.render(), "", "node  verified key  pairs added  pairs removed"]
    lines += [f"{n['node']:<4}  {'yes' if n['verified_key'] else 'NO':<12}  "
              f"{n['added']:<11}  {n['removed']}" for n in plan["nodes"]]
    if any(not n["verified_key"] for n in plan["nodes"]):
        lines.append("NOT READY: selected traffic to nodes without a verified key is dropped")
    else:
        lines.append("ready: every node the change needs has a verified key "
                     "(each agent's `tfcrypt status` shows its handshakes)")
    return "\n".join(lines)


def plan_to_json(plan: dict[str, Any]) -> dict[str, Any]:
    return {**plan, "diff": plan["diff"].to_json(),
            "ready": all(n["verified_key"] for n in plan["nodes"])}


async def resign(s: ControllerSession) -> str:
    """Re-sign every workload and policy the agents believe that the controller's current
    SVID's authority did not sign (same content, next epoch): the step before revoking
    an old CA (`spire-server localauthority x509 revoke`). Values written once are
    checked against the bundle at every trust change, so those still signed under the
    revoked root would be refused by every agent, their policies enforced nowhere and
    their traffic no longer selected (docs/operations.md, "Rotating SPIRE's CA").
    Also those stored in another envelope version than the session's: `resign
    --envelope-version 2` moves a cluster's values to chains stored once (docs/trust.md)."""
    s.require_controller()
    view = await s.read_view()
    ours = s.svid_authority()
    done = 0
    for key, record in sorted({**view.of("workloads/"), **view.of("policies/")}.items()):
        if view.authority.get(key) == ours and (view.chain_ref_of(key) is not None) == (
                s.by_ref):
            continue
        payload = record.to_payload(epoch=s.next_epoch(view, key), issued_at=int(time.time()))
        await s.put_signed(key, payload, record)
        done += 1
    refused = len(_refused_keys(view, "workloads/")) + len(_refused_keys(view, "policies/"))
    note = (f"; {refused} stored value(s) already refused, left alone (see `workload list`,"
            " `policy list`)") if refused else ""
    return f"re-signed {done} value(s) under authority {ours or 'unknown'}{note}"

