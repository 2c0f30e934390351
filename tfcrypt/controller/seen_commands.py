"""What `tfcrypt policy plan --against-seen`, `tfcrypt policy suggest` and `tfcrypt
report` do, as functions of a session, and how their results are shown.

Rules of this module (docs/flows.md):
- One read of the inventory (the session's verified view) and one of the seen-traffic
  keyspace (tfcrypt/controller/seen_read.py) per command; everything else is the pure
  core (tfcrypt/core/seen*.py). Nothing is written.
- Refused reports are named in the output (text and JSON), never a crash.
- Times are shown as ages ("12 s ago") against the `now` the command was given, so two
  runs read the same way whatever the clock says.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tfcrypt.controller.commands import inventory_of, plan_of, plan_to_json, render_plan
from tfcrypt.controller.seen_read import SeenRead, read_seen
from tfcrypt.controller.session import ControllerSession
from tfcrypt.core.explain import GlobalView
from tfcrypt.core.seen import (
    DEFAULT_READINESS,
    Change,
    Readiness,
    SeenPlan,
    enforced_diff,
    flow_text,
    pair_text,
    plan_against_seen,
)
from tfcrypt.core.seen_proof import ProofReport, proof_report
from tfcrypt.core.seen_suggest import Suggestion, suggest
from tfcrypt.model.flow import Verdict
from tfcrypt.model.policy import EncryptionPolicy
from tfcrypt.model.tags import Tag

MAX_SHOWN = 50  # unseen pairs listed one by one; the rest are counted


async def _read(s: ControllerSession, now: float) -> tuple[GlobalView, SeenRead]:
    view = await s.read_view()
    return inventory_of(view), await read_seen(s, view, now)


def _ago(now: float, t: float | None) -> str:
    return "never" if t is None else f"{max(0.0, now - t):.0f} s ago"


def _since_text(now: float, since: float | None) -> str:
    return "every record in the reports" if since is None else \
        f"records last seen within {now - since:.0f} s"


async def plan_against_seen_command(s: ControllerSession, policy: EncryptionPolicy, *,
                                    now: float, since: float | None,
                                    infrastructure: Mapping[str, str] | None = None,
                                    readiness: Readiness = DEFAULT_READINESS) -> dict[str, Any]:
    """`policy_plan`'s result, and the seen flows the change moves with their readiness."""
    inventory, read = await _read(s, now)
    diff = enforced_diff(inventory, policy, infrastructure)
    seen_plan = plan_against_seen(inventory, policy, read.seen, now=now, since=since,
                                  infrastructure=infrastructure, readiness=readiness,
                                  diff=diff)
    return {"plan": plan_of(inventory, policy, infrastructure, diff), "seen": seen_plan,
            "read": read, "now": now, "since": since, "readiness": readiness}


def seen_plan_to_json(result: dict[str, Any]) -> dict[str, Any]:
    seen: SeenPlan = result["seen"]
    readiness: Readiness = result["readiness"]
    return {**plan_to_json(result["plan"]),
            "against_seen": {**seen.to_json(), "since": result["since"], "now": result["now"],
                             "report_max_age": readiness.report_max_age,
                             "handshake_max_age": readiness.handshake_max_age,
                             **result["read"].to_json()}}


def render_seen_plan(result: dict[str, Any]) -> str:
    seen: SeenPlan = result["seen"]
    read: SeenRead = result["read"]
    readiness: Readiness = result["readiness"]
    now = result["now"]
    lines = [render_plan(result["plan"]), "",
             f"against seen traffic ({_since_text(now, result['since'])}):", read.render()]
    if not read.seen.reports:
        lines.append("  no flow report believed: nothing to check the change against")
    lines.append(f"{len(seen.flows)} seen flow(s) would change "
                 f"(of {seen.considered} record(s) considered)")
    for f in seen.flows:
        verb = "encrypt" if f.change is Change.ENCRYPT else "leave  "
        head = (f"  {verb} {flow_text(f.flow)} (nodes {', '.join(f.nodes)}; seen by "
                f"{', '.join(f.reporters)} as {', '.join(f.verdicts)}; {f.counts.packets} "
                f"packets, last {_ago(now, f.counts.last_seen)})")
        if f.black_holed:
            lines.append(f"{head}: WOULD BE BLACK-HOLED")
            lines += [f"      {p}" for p in f.problems]
        else:
            lines.append(f"{head}" + (": ready" if f.change is Change.ENCRYPT
                                      else ": leaves the tunnel"))
    rule = (f"a verified key, its own report within {readiness.report_max_age:.0f} s, a "
            f"handshake between the two within {readiness.handshake_max_age:.0f} s")
    if seen.black_holed:
        lines.append(f"NOT READY: {len(seen.black_holed)} seen flow(s) would be dropped once "
                     f"enforced; each node they need must have {rule}")
    else:
        lines.append(f"ready against seen traffic: every node a seen flow to be encrypted "
                     f"needs has {rule}")
    return "\n".join(lines)


async def suggest_command(s: ControllerSession, touching: frozenset[Tag], *, now: float,
                          since: float | None, name: str | None = None,
                          infrastructure: Mapping[str, str] | None = None
                          ) -> tuple[Suggestion, SeenRead]:
    inventory, read = await _read(s, now)
    return suggest(inventory, read.seen.since(since), touching, name=name,
                   infrastructure=infrastructure), read


def render_suggestion(sug: Suggestion, read: SeenRead, now: float) -> str:
    """What goes to stderr beside the YAML: the covered flows, and what was not covered."""
    lines = [read.render()]
    assert sug.policy is not None
    lines.append(f"policy {sug.policy.name} (audit mode, {len(sug.policy.rules)} rule(s)) "
                 f"covers {len(sug.covered)} seen flow(s):")
    lines += [f"  {flow_text(c.flow)}: rule {', '.join(str(r) for r in c.rules)}; "
              f"{c.counts.packets} packets, last {_ago(now, c.counts.last_seen)}"
              for c in sug.covered]
    lines += [f"  not covered: {flow_text(f)}: {why}" for f, why in sug.uncovered]
    if sug.unseen_pairs:
        lines.append(f"it would also select {len(sug.unseen_pairs)} pair(s) no seen flow "
                     "used (same tags as a seen peer):")
        lines += [f"  {pair_text(p)}" for p in sug.unseen_pairs[:MAX_SHOWN]]
        if len(sug.unseen_pairs) > MAX_SHOWN:
            lines.append(f"  and {len(sug.unseen_pairs) - MAX_SHOWN} more (--json lists all)")
    else:
        lines.append("it selects no pair beyond the seen ones")
    return "\n".join(lines)


def render_no_suggestion(sug: Suggestion, read: SeenRead) -> str:
    tags = ", ".join(sorted(str(t) for t in sug.touching))
    lines = [read.render(), f"no seen flow touching {tags} can be selected: nothing to "
                            "suggest"]
    lines += [f"  not covered: {flow_text(f)}: {why}" for f, why in sug.uncovered]
    return "\n".join(lines)


async def report_command(s: ControllerSession, *, now: float, since: float | None,
                         infrastructure: Mapping[str, str] | None = None
                         ) -> tuple[ProofReport, SeenRead]:
    inventory, read = await _read(s, now)
    return proof_report(inventory, read.seen, since=since,
                        infrastructure=infrastructure), read


def report_to_json(proof: ProofReport, read: SeenRead, now: float,
                   since: float | None) -> dict[str, Any]:
    return {**proof.to_json(), "now": now, "since": since, **read.to_json()}


def render_report(proof: ProofReport, read: SeenRead, now: float, since: float | None) -> str:
    lines = [f"proof of encryption ({_since_text(now, since)})", read.render()]
    lines += [f"  report {r.node}: generated {_ago(now, r.generated_at)}, {r.records} "
              f"record(s)" + (f", {r.omitted} omitted (its bound)" if r.omitted else "")
              for r in proof.reports]
    lines += [f"  report {n}: none believed (its traffic is missing from this report)"
              for n in proof.unreported]
    if not proof.policies:
        lines.append("no enforced policy: nothing to prove")
    for p in proof.policies:
        wg, ing = p.total(Verdict.WIREGUARD), p.total(Verdict.INGRESS_DROP)
        guard, plain = p.total(Verdict.GUARD_DROP), p.total(Verdict.PLAINTEXT)
        lines += ["", f"policy {p.policy}: {len(p.pairs)} of {p.selected_pairs} selected "
                      "pair(s) carried traffic",
                  f"  inside WireGuard: {wg.packets} packets, {wg.bytes} bytes",
                  f"  plaintext dropped by strict ingress: {ing.packets} packets",
                  f"  dropped by the egress guard: {guard.packets} packets"]
        lines += [f"    ingress drop {flow_text(f)}: {c.packets} packets, last "
                  f"{_ago(now, c.last_seen)}" for f, c in p.ingress_drop_flows]
        if p.plaintext_flows:
            lines.append(f"  PLAINTEXT of selected pairs: {plain.packets} packets (should be "
                         "none: a bug, an attack, or traffic from before the policy was "
                         "enforced: see --since)")
            lines += [f"    plaintext {flow_text(f)}: {c.packets} packets, last "
                      f"{_ago(now, c.last_seen)}" for f, c in p.plaintext_flows]
        else:
            lines.append("  plaintext of selected pairs: none")
        lines += [f"  handshake {a} <-> {b}: {_ago(now, t)}" for a, b, t in p.handshakes]
    return "\n".join(lines)
