"""Seen traffic against policies (tfcrypt/core/seen*.py) on hand-built inventories and
reports: plan --against-seen, suggest, the proof report (issue #19)."""

from __future__ import annotations

import base64
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from tfcrypt.core.explain import GlobalView
from tfcrypt.core.seen import REPORT_MAX_AGE_S, Change, Seen, local_flows, plan_against_seen
from tfcrypt.core.seen_proof import proof_report
from tfcrypt.core.seen_suggest import default_name, suggest
from tfcrypt.core.selection import is_selected_pairwise
from tfcrypt.model.flow import FlowKey, FlowRecord, FlowReport, Verdict
from tfcrypt.model.node import NodeRecord
from tfcrypt.model.policy import EncryptionPolicy, Mode, parse_policy_document, read_policy_file
from tfcrypt.model.tags import parse_tags
from tfcrypt.model.workload import Workload

NOW = 1_800_000_000.0
PCI, WEB = "10.200.1.11", "10.200.1.12"
DB, BARE = "10.200.2.11", "10.200.2.20"
DB3, DB3B = "10.200.3.11", "10.200.3.12"


def wl(name: str, node: str, ip: str, tags: str = "") -> Workload:
    return Workload(name, node, (ip,), parse_tags(t for t in tags.split() if t))


def rec(node: str, n: int) -> NodeRecord:
    key = base64.b64encode(bytes([n]) * 32).decode()
    return NodeRecord(node, f"spiffe://lab.tfcrypt/tfcrypt/node/{node}", key,
                      f"192.0.2.{n}:51820", (), 1, 1)


WORKLOADS = [wl("pci", "n1", PCI, "label=pci application=pay"),
             wl("web", "n1", WEB, "application=web"),
             wl("db", "n2", DB, "application=db"),
             wl("bare", "n2", BARE),
             wl("db3", "n3", DB3, "application=db site=b"),
             wl("db3b", "n3", DB3B, "application=db")]
NODES = {n: rec(n, i) for i, n in enumerate(("n1", "n2", "n3"), 1)}


def policy(name: str, rules: str, mode: str = "enforce") -> EncryptionPolicy:
    return parse_policy_document(
        f"apiVersion: tfcrypt.io/v1alpha1\nkind: EncryptionPolicy\nmetadata: {{name: {name}}}\n"
        f"spec:\n  mode: {mode}\n  rules:\n{rules}", f"{name}.yaml")


PCI_DB = policy("pci-db", """\
  - endpoint1: {tags: [label=pci]}
    endpoint2: {tags: [application=db]}
""", mode="audit")


def view(*policies: EncryptionPolicy, workloads: list[Workload] = WORKLOADS,
         nodes: dict[str, NodeRecord] = NODES) -> GlobalView:
    return GlobalView({w.key: w for w in workloads}, {p.name: p for p in policies}, nodes)


def flow(src: str, dst: str, verdict: Verdict = Verdict.PLAINTEXT, *, proto: str = "tcp",
         dport: int | None = 5432, packets: int = 10, last: float = NOW - 5) -> FlowRecord:
    return FlowRecord(FlowKey(src, dst, proto, dport, verdict), last - 60, last, packets,
                      packets * 100)


def report(node: str, *flows: FlowRecord, age: float = 10.0,
           handshakes: dict[str, float | None] | None = None) -> FlowReport:
    if handshakes is None:
        handshakes = {n: NOW - 20 for n in NODES if n != node}
    return FlowReport(node, NOW - age, NOW - 3600, flows, handshakes)


def seen(*reports: FlowReport, workloads: list[Workload] = WORKLOADS) -> Seen:
    return local_flows({r.node: r for r in reports}, {w.key: w for w in workloads})


def test_local_flows_keep_only_records_whose_local_end_is_on_the_reporting_node() -> None:
    s = seen(report("n1", flow(PCI, DB)),
             # n2 claims a flow between n1 and n3: not its traffic
             report("n2", flow(PCI, DB3), flow(PCI, DB, Verdict.WIREGUARD)))
    assert [(f.node, f.local, f.remote) for f in s.flows] == [("n1", PCI, DB), ("n2", DB, PCI)]
    assert s.not_local == 1


def test_plan_a_flow_becoming_encrypted_with_a_ready_pair_and_one_black_holed() -> None:
    s = seen(report("n1", flow(PCI, DB), flow(PCI, DB3), flow(WEB, DB)),
             report("n2", flow(PCI, DB)),
             report("n3", flow(PCI, DB3), age=300))  # n3's agent stopped 5 minutes ago
    plan = plan_against_seen(view(), PCI_DB, s, now=NOW)
    assert plan.as_if_enforced
    by_dst = {f.flow[1]: f for f in plan.flows}
    assert set(by_dst) == {DB, DB3}  # web -> db is not touched by the policy
    ready, holed = by_dst[DB], by_dst[DB3]
    assert ready.change is Change.ENCRYPT and not ready.problems and not ready.black_holed
    assert ready.nodes == ("n1", "n2") and ready.reporters == ("n1", "n2")
    assert ready.counts.packets == 10  # both nodes count the same packets: not 20
    assert holed.black_holed and holed.nodes == ("n1", "n3")
    assert holed.problems == ("n3: its report is 300 s old (fresh: within 120 s; is its "
                              "agent running?)",)
    assert plan.black_holed == (holed,)


def test_plan_names_a_missing_key_a_missing_report_and_an_old_handshake() -> None:
    nodes = {n: r for n, r in NODES.items() if n != "n2"}  # n2's record is gone
    s = seen(report("n1", flow(PCI, DB), handshakes={"n2": NOW - 400, "n3": None}))
    plan = plan_against_seen(view(nodes=nodes), PCI_DB, s, now=NOW)
    (f,) = plan.flows
    assert f.black_holed
    assert any(p.startswith("n2: no verified usable key") for p in f.problems)
    assert "n2: no flow report (is its agent running?)" in f.problems
    assert "n1 <-> n2: no handshake within 180 s (last 400 s ago)" in f.problems


def test_plan_a_flow_whose_pair_loses_selection_is_shown_and_not_black_holed() -> None:
    before = policy("pci-db", """\
  - endpoint1: {tags: [label=pci]}
    endpoint2: {any: true}
""")
    s = seen(report("n1", flow(PCI, DB, Verdict.WIREGUARD), flow(PCI, BARE, Verdict.WIREGUARD,
                                                                 proto="icmp", dport=None)),
             report("n2", age=1000))  # a node not ready does not matter to leaving flows
    plan = plan_against_seen(view(before), PCI_DB, s, now=NOW)
    (f,) = plan.flows
    assert f.flow == (PCI, BARE, "icmp", None) and f.change is Change.LEAVE
    assert not f.black_holed and f.problems == ()


def test_plan_since_leaves_out_flows_last_seen_before() -> None:
    s = seen(report("n1", flow(PCI, DB, last=NOW - 7200), flow(PCI, DB3, last=NOW - 60)),
             report("n2"), report("n3"))
    assert [f.flow[1] for f in plan_against_seen(view(), PCI_DB, s, now=NOW).flows] == [DB, DB3]
    later = plan_against_seen(view(), PCI_DB, s, now=NOW, since=NOW - 3600)
    assert [f.flow[1] for f in later.flows] == [DB3] and later.considered == 1


def test_suggest_covers_every_seen_flow_touching_the_tag_and_loads_back(tmp_path: Path) -> None:
    s = seen(report("n1", flow(PCI, DB), flow(PCI, DB3), flow(WEB, DB),
                    flow(PCI, BARE, proto="icmp", dport=None)),
             report("n2", flow(DB, PCI, dport=40000)))
    touching = parse_tags(["label=pci"])
    sug = suggest(view(), s, touching)
    assert sug.policy is not None and sug.policy.mode is Mode.AUDIT
    assert sug.policy.name == default_name(touching) == "seen-label-pci"
    ends = [r.endpoint2.describe() for r in sug.policy.rules]
    assert ends == ["tags application=db", "tags application=db,site=b",
                    f"subnet {BARE}/32"]
    assert all(r.endpoint1.tags == touching for r in sug.policy.rules)
    assert {c.flow for c in sug.covered} == {(PCI, DB, "tcp", 5432), (PCI, DB3, "tcp", 5432),
                                             (PCI, BARE, "icmp", None),
                                             (DB, PCI, "tcp", 40000)}
    assert sug.uncovered == ()
    # the blast radius: db3b carries application=db too, and was never seen
    assert sug.unseen_pairs == ((PCI, DB3B),)

    path = tmp_path / "suggested.yaml"
    path.write_text(sug.yaml())
    loaded = read_policy_file(str(path))
    assert loaded == sug.policy
    # once enforced, every pair it selects has the pci workload at one end
    enforced = [EncryptionPolicy(loaded.name, Mode.ENFORCE, loaded.rules)]
    for a in WORKLOADS:
        for b in WORKLOADS:
            if is_selected_pairwise(a, a.ips[0], b, b.ips[0], enforced):
                assert "pci" in (a.name, b.name)
    assert not is_selected_pairwise(WORKLOADS[1], WEB, WORKLOADS[2], DB, enforced)


def test_suggest_names_what_it_cannot_cover_and_none_when_nothing_touches() -> None:
    s = seen(report("n1", flow(PCI, "10.9.9.9"), flow(PCI, WEB)))  # unknown peer, same node
    sug = suggest(view(), s, parse_tags(["label=pci"]), name="pci")
    assert sug.policy is None
    assert dict(sug.uncovered) == {
        (PCI, "10.9.9.9", "tcp", 5432): "no workload has 10.9.9.9: tfcrypt selects only "
                                        "workloads' addresses",
        (PCI, WEB, "tcp", 5432): "both ends on the same node: it never leaves it"}
    assert suggest(view(), s, parse_tags(["application=none"])).policy is None


def test_proof_report_counts_wireguard_once_ingress_drops_and_flags_plaintext() -> None:
    enforced = EncryptionPolicy("pci-db", Mode.ENFORCE, PCI_DB.rules)
    s = seen(report("n1", flow(PCI, DB, Verdict.WIREGUARD, packets=50),
                    flow(PCI, DB3, Verdict.GUARD_DROP, packets=3),
                    flow(WEB, DB, Verdict.PLAINTEXT, packets=7)),
             report("n2", flow(PCI, DB, Verdict.WIREGUARD, packets=50),
                    flow(PCI, DB, Verdict.INGRESS_DROP, dport=22, packets=4),
                    flow(PCI, DB, Verdict.PLAINTEXT, dport=80, packets=2)),
             report("n3", handshakes={"n1": None}))
    proof = proof_report(view(enforced, EncryptionPolicy("audit", Mode.AUDIT, PCI_DB.rules)),
                         s)
    (p,) = proof.policies  # the audit policy proves nothing
    assert p.policy == "pci-db" and p.selected_pairs == 3  # pci with db, db3, db3b
    assert p.total(Verdict.WIREGUARD).packets == 50
    assert p.total(Verdict.WIREGUARD).bytes == 5000
    assert p.total(Verdict.INGRESS_DROP).packets == 4
    assert p.total(Verdict.GUARD_DROP).packets == 3
    assert [f for f, _ in p.ingress_drop_flows] == [(PCI, DB, "tcp", 22)]
    assert [f for f, _ in p.plaintext_flows] == [(PCI, DB, "tcp", 80)]
    assert proof.plaintext_found
    assert [pp.pair for pp in p.pairs] == [(PCI, DB), (PCI, DB3)]
    assert p.handshakes == (("n1", "n2", NOW - 20), ("n1", "n3", NOW - 20))
    assert [r.node for r in proof.reports] == ["n1", "n2", "n3"] and proof.unreported == ()


def test_proof_report_since_drops_old_plaintext() -> None:
    enforced = EncryptionPolicy("pci-db", Mode.ENFORCE, PCI_DB.rules)
    s = seen(report("n1", flow(PCI, DB, Verdict.PLAINTEXT, last=NOW - 7200),
                    flow(PCI, DB, Verdict.WIREGUARD, dport=443, last=NOW - 10)))
    assert proof_report(view(enforced), s).plaintext_found
    assert proof_report(view(enforced), s).unreported == ("n2", "n3")
    recent = proof_report(view(enforced), s, since=NOW - 3600)
    assert not recent.plaintext_found
    assert recent.policies[0].total(Verdict.WIREGUARD).packets == 10


TAGS = ["application=a", "application=b", "label=pci", "site=x"]
ENDPOINTS = ["{tags: [application=a]}", "{tags: [label=pci]}", "{tags: [site=x]}",
             "{any: true}", "{subnet: 10.1.2.0/24}"]


@st.composite
def inventories(draw: st.DrawFn) -> tuple[list[Workload], EncryptionPolicy | None,
                                          EncryptionPolicy, list[FlowReport]]:
    workloads = []
    for n in range(1, 4):
        for i in range(draw(st.integers(1, 3))):
            tags = draw(st.sets(st.sampled_from(TAGS), max_size=3))
            if {"application=a", "application=b"} <= tags:
                tags.discard("application=b")
            workloads.append(wl(f"w{n}{i}", f"n{n}", f"10.1.{n}.{i + 1}", " ".join(tags)))

    def rules() -> str:
        return "".join(f"  - endpoint1: {draw(st.sampled_from(ENDPOINTS))}\n"
                       f"    endpoint2: {draw(st.sampled_from(ENDPOINTS))}\n"
                       for _ in range(draw(st.integers(1, 2))))
    current = policy("current", rules()) if draw(st.booleans()) else None
    name = draw(st.sampled_from(["current", "file"]))
    proposed = policy(name, rules(), mode=draw(st.sampled_from(["audit", "enforce"])))
    reports = []
    for node in ("n1", "n2", "n3"):
        mine = [w.ips[0] for w in workloads if w.node == node]
        others = [w.ips[0] for w in workloads if w.node != node]
        flows = [flow(draw(st.sampled_from(mine)), draw(st.sampled_from(others)), dport=port)
                 for port in range(draw(st.integers(1, 5)))]
        reports.append(report(node, *flows))
    return workloads, current, proposed, reports


@settings(max_examples=80, deadline=None)
@given(inventories())
def test_plan_names_exactly_the_seen_flows_whose_selection_enforcing_changes(
        case: tuple[list[Workload], EncryptionPolicy | None, EncryptionPolicy,
                    list[FlowReport]]) -> None:
    workloads, current, proposed, reports = case
    before = [current] if current else []
    after = [p for p in before if p.name != proposed.name] + [
        EncryptionPolicy(proposed.name, Mode.ENFORCE, proposed.rules)]
    by_ip = {w.ips[0]: w for w in workloads}
    expected = {}
    for r in reports:
        for f in r.flows:
            a, b = by_ip[f.key.src], by_ip[f.key.dst]
            was, will = (is_selected_pairwise(a, a.ips[0], b, b.ips[0], ps)
                         for ps in (before, after))
            if was != will:
                expected[(f.key.src, f.key.dst, f.key.proto, f.key.dport)] = (
                    Change.ENCRYPT if will else Change.LEAVE)
    plan = plan_against_seen(view(*before, workloads=workloads), proposed,
                             seen(*reports, workloads=workloads), now=NOW)
    assert {f.flow: f.change for f in plan.flows} == expected
    assert not plan.black_holed  # every node has a key, a fresh report and a handshake


def test_the_cli_default_report_age_is_the_core_one() -> None:
    from tfcrypt.flows_view import duration
    from tfcrypt.seen_cli import REPORT_MAX_AGE
    assert duration(REPORT_MAX_AGE) == REPORT_MAX_AGE_S
