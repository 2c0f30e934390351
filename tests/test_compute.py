"""compute() and explain() on hand-written inventories an operator would recognise."""

from __future__ import annotations

import base64
import re

import pytest

from tfcrypt.core.compute import Desired, Snapshot, compute
from tfcrypt.core.explain import diff_selection, explain
from tfcrypt.model.node import NodeRecord
from tfcrypt.model.policy import EncryptionPolicy, parse_policy_document
from tfcrypt.model.tags import parse_tags
from tfcrypt.model.workload import Workload


def key(n: int) -> str:
    return base64.b64encode(bytes([n]) * 32).decode()


def rec(node: str, n: int, k: int | None = None) -> NodeRecord:
    return NodeRecord(node, f"spiffe://lab.tfcrypt/tfcrypt/node/{node}", key(k or n),
                      f"192.0.2.{n}:51820", (), 1, 1)


def wl(name: str, node: str, *ips: str, tags: str = "") -> Workload:
    return Workload(name, node, ips, parse_tags(t for t in tags.split() if t))


def policy(name: str, rules: str, mode: str = "enforce") -> EncryptionPolicy:
    return parse_policy_document(
        f"apiVersion: tfcrypt.io/v1alpha1\nkind: EncryptionPolicy\nmetadata: {{name: {name}}}\n"
        f"spec:\n  mode: {mode}\n  rules:\n{rules}", f"{name}.yaml")


PAYMENTS_SITE = policy("payments", """\
    - endpoint1: {tags: [application=payments]}
      endpoint2: {any: true}
      match_tags: [site]
""")
W = [wl("n1-w1", "n1", "10.200.1.11", tags="application=payments site=a"),
     wl("n2-w1", "n2", "10.200.2.11", tags="application=db site=a"),
     wl("n3-w1", "n3", "10.200.3.11", tags="application=db site=b"),
     wl("n1-w2", "n1", "10.200.1.12", tags="application=db site=a")]
RECORDS = {n: rec(n, i) for i, n in enumerate(("n1", "n2", "n3"), 1)}


def run(own: str, workloads: list[Workload], policies: list[EncryptionPolicy],
        nodes: dict[str, NodeRecord] = RECORDS) -> Desired:
    return compute(snap(own, workloads, policies, nodes))


def snap(own: str, workloads: list[Workload], policies: list[EncryptionPolicy],
         nodes: dict[str, NodeRecord] = RECORDS) -> Snapshot:
    return Snapshot(own, {w.key: w for w in workloads}, {p.name: p for p in policies}, nodes,
                    nodes[own].wg_public_key if own in nodes else key(99))


def pairs(d: Desired) -> set[tuple[str, str]]:
    return {(x, y) for x, c in d.local_class.items() for y in d.class_peers[c]}


def allowed(d: Desired) -> dict[str, set[str]]:
    return {p.node: set(p.allowed_ips) for p in d.peers.values()}


def test_match_tags_site_selects_only_the_same_site() -> None:
    d = run("n1", W, [PAYMENTS_SITE])
    assert pairs(d) == {("10.200.1.11", "10.200.2.11")}
    assert allowed(d) == {"n2": {"10.200.2.11/32"}, "n3": set()}
    assert d.selected_pair_count == 1 and not d.missing_peers
    assert pairs(run("n3", W, [PAYMENTS_SITE])) == set()


def test_a_workload_lacking_the_match_tag_is_never_selected_by_that_rule() -> None:
    no_site = [W[0], wl("n2-w1", "n2", "10.200.2.11", tags="application=db")]
    assert pairs(run("n1", no_site, [PAYMENTS_SITE])) == set()


def test_no_policy_no_selection_but_peers_stay_ready() -> None:
    d = run("n1", W, [])
    assert (d.local_class, d.class_peers, d.selected_pair_count) == ({}, {}, 0)
    assert allowed(d) == {"n2": set(), "n3": set()}


def test_label_endpoint_matches_one_of_many_labels() -> None:
    pci = policy("pci", "    - endpoint1: {tags: [label=pci]}\n"
                        "      endpoint2: {tags: [label=vault]}\n")
    ws = [wl("a", "n1", "10.0.1.1", tags="label=gdpr label=pci"),
          wl("b", "n2", "10.0.2.1", tags="label=vault label=x"),
          wl("c", "n2", "10.0.2.2", tags="label=pci")]
    assert pairs(run("n1", ws, [pci])) == {("10.0.1.1", "10.0.2.1")}
    assert pairs(run("n2", ws, [pci])) == {("10.0.2.1", "10.0.1.1")}


def test_subnet_endpoint_is_per_ip_and_works_for_v6() -> None:
    sub = policy("sub", "    - endpoint1: {subnet: fd00:2::/64}\n"
                        "      endpoint2: {tags: [tier=web]}\n")
    ws = [wl("web", "n1", "10.0.1.1", "fd00:1::1", tags="tier=web"),
          wl("db", "n2", "10.0.2.1", "fd00:2::1")]
    d = run("n1", ws, [sub])
    assert pairs(d) == {("10.0.1.1", "fd00:2::1"), ("fd00:1::1", "fd00:2::1")}
    assert allowed(d)["n2"] == {"fd00:2::1/128"}
    assert len(set(d.local_class.values())) == 1


def test_any_any_encrypts_every_cross_node_pair() -> None:
    everything = policy("all", "    - endpoint1: {any: true}\n      endpoint2: {any: true}\n")
    d = run("n1", W, [everything])
    assert pairs(d) == {(x, y) for x in ("10.200.1.11", "10.200.1.12")
                        for y in ("10.200.2.11", "10.200.3.11")}
    assert set(d.local_class.values()) == set(d.class_peers)


def test_missing_key_is_reported_and_no_peer_made() -> None:
    d = run("n1", W, [PAYMENTS_SITE], {"n1": RECORDS["n1"]})
    assert d.missing_peers == {"n2"} and d.peers == {}
    assert pairs(d) == {("10.200.1.11", "10.200.2.11")}


def test_shared_public_key_makes_no_peer() -> None:
    nodes = {**RECORDS, "n3": rec("n3", 3, k=2)}
    d = run("n1", W, [PAYMENTS_SITE], nodes)
    assert allowed(d) == {}
    assert d.missing_peers == {"n2"}
    assert "public key shared by n2, n3: no peer for it" in d.conflicts
    own_key = run("n1", W, [PAYMENTS_SITE], {**RECORDS, "n3": rec("n3", 3, k=1)})
    assert "public key shared by n1, n3: no peer for it" in own_key.conflicts


def test_ip_claimed_on_two_nodes_is_selected_but_given_to_no_peer() -> None:
    ws = [*W, wl("n3-dup", "n3", "10.200.2.11", tags="application=db site=a")]
    d = run("n1", ws, [PAYMENTS_SITE])
    assert ("10.200.1.11", "10.200.2.11") in pairs(d)
    assert allowed(d) == {"n2": set(), "n3": set()}
    assert d.conflicts == ("ip 10.200.2.11 claimed by n2/n2-w1, n3/n3-dup: given to no peer",)


def test_ip_claimed_twice_on_one_node_still_goes_to_that_peer() -> None:
    ws = [*W, wl("n2-w1b", "n2", "10.200.2.11", tags="site=a")]
    d = run("n1", ws, [PAYMENTS_SITE])
    assert allowed(d)["n2"] == {"10.200.2.11/32"}
    assert d.conflicts == ("ip 10.200.2.11 claimed by n2/n2-w1, n2/n2-w1b",)


def test_audit_policy_is_reported_not_enforced() -> None:
    draft = policy("draft", "    - endpoint1: {tags: [application=db]}\n"
                            "      endpoint2: {any: true}\n", mode="audit")
    d = run("n1", W, [PAYMENTS_SITE, draft], {"n1": RECORDS["n1"], "n2": RECORDS["n2"]})
    assert pairs(d) == {("10.200.1.11", "10.200.2.11")}
    assert d.audit.pair_count == 3  # n1-w2 with n2-w1 and n3-w1; n1-w1 with n3-w1
    assert d.audit.per_policy == {"draft": 3}
    assert d.audit.missing_peers == {"n3"}
    assert d.missing_peers == frozenset()


def test_local_class_ignores_remote_churn() -> None:
    before = run("n1", W, [PAYMENTS_SITE])
    after = run("n1", [*W[:1], W[3], wl("n4-w1", "n4", "10.200.4.1", tags="site=a")],
                [PAYMENTS_SITE])
    assert before.local_class == after.local_class
    assert after.class_peers[after.local_class["10.200.1.11"]] == {"10.200.4.1"}


# --- explain ---------------------------------------------------------------------------------

def test_explain_selected_with_rule_and_orientation() -> None:
    e = explain(snap("n1", W, [PAYMENTS_SITE]), "10.200.2.11", "10.200.1.11")
    assert e.selected and not e.dropped
    (match,) = e.matches
    assert (match.policy, match.rule) == ("payments", 0)
    assert match.orientations == ("src in endpoint2, dst in endpoint1",)
    assert e.render().splitlines()[0] == \
        "10.200.2.11 (n2-w1@n2) -> 10.200.1.11 (n1-w1@n1): selected"
    assert "payments rule 0: selects (src in endpoint2, dst in endpoint1)" in e.render()


@pytest.mark.parametrize("src,dst,lines", [
    ("10.200.1.11", "10.200.3.11",
     ["payments rule 0: match_tags site: n1-w1 has site=a, n3-w1 has site=b"]),
    ("10.200.2.11", "10.200.3.11",
     ["as src in endpoint1, dst in endpoint2: src 10.200.2.11 (n2-w1) lacks tag "
      "application=payments",
      "as src in endpoint2, dst in endpoint1: dst 10.200.3.11 (n3-w1) lacks tag "
      "application=payments"]),
    ("10.200.1.11", "10.200.1.12", ["same node n1"]),
    ("10.200.1.11", "10.9.9.9", ["unknown IP 10.9.9.9: no workload has it"]),
])
def test_explain_not_selected_says_why(src: str, dst: str, lines: list[str]) -> None:
    e = explain(snap("n1", W, [PAYMENTS_SITE]), src, dst)
    assert not e.selected
    for line in lines:
        assert line in e.render(), e.render()


def test_explain_subnet_reason_and_audit() -> None:
    sub = policy("sub", "    - endpoint1: {subnet: 10.9.0.0/16}\n      endpoint2: {any: true}\n")
    draft = policy("draft", "    - endpoint1: {any: true}\n      endpoint2: {any: true}\n",
                   mode="audit")
    e = explain(snap("n1", W, [sub, draft]), "10.200.1.11", "10.200.2.11")
    assert not e.selected
    assert "src 10.200.1.11 (n1-w1) is not in subnet 10.9.0.0/16" in e.render()
    assert "audit: draft rule 0 would select" in e.render()
    assert e.to_json()["audit_matches"][0]["policy"] == "draft"


def test_explain_missing_peer_key_means_dropped() -> None:
    e = explain(snap("n1", W, [PAYMENTS_SITE], {"n1": RECORDS["n1"]}),
                "10.200.1.11", "10.200.2.11")
    assert e.selected and e.dropped and e.missing_keys == ("n2",)
    assert "missing peer key for n2: traffic is dropped" in e.render()
    assert e.to_json()["dropped"] is True


def test_plan_lists_new_pairs_per_node_and_missing_keys() -> None:
    workloads = {w.key: w for w in W}
    plan = diff_selection({}, {"payments": PAYMENTS_SITE}, workloads, {"n1": RECORDS["n1"]})
    assert plan.added == {("10.200.1.11", "10.200.2.11")} and not plan.removed
    assert {n: (p.added, p.removed) for n, p in plan.per_node.items()} == {
        "n1": (1, 0), "n2": (1, 0)}
    assert plan.missing_peers == {"n2"}
    assert "+ 10.200.1.11 <-> 10.200.2.11" in plan.render()
    back = diff_selection({"payments": PAYMENTS_SITE}, {}, workloads, RECORDS)
    assert back.removed == plan.added and not back.missing_peers


def test_sets_are_per_remote_selector_and_shared_by_classes() -> None:
    """Two local roles selecting the same remote side share one selector set: a remote IP
    is stored once, not once per class."""
    shared = policy("shared", "    - endpoint1: {tags: [tier=web]}\n"
                              "      endpoint2: {tags: [application=db]}\n"
                              "    - endpoint1: {tags: [tier=app]}\n"
                              "      endpoint2: {tags: [application=db]}\n"
                              "    - endpoint1: {tags: [tier=app]}\n"
                              "      endpoint2: {subnet: 10.0.3.0/24}\n")
    ws = [wl("web", "n1", "10.0.1.1", tags="tier=web"),
          wl("app", "n1", "10.0.1.2", tags="tier=app"),
          wl("db", "n2", "10.0.2.1", tags="application=db"),
          wl("x", "n3", "10.0.3.1")]
    d = run("n1", ws, [shared])
    web, app = d.local_class["10.0.1.1"], d.local_class["10.0.1.2"]
    assert web != app and len(d.class_selectors[web] & d.class_selectors[app]) == 1
    (db_set,) = d.class_selectors[web]
    assert d.selector_ips[db_set] == {"10.0.2.1"}
    assert sum(map(len, d.selector_ips.values())) == 2  # 10.0.2.1 stored once
    assert all(re.fullmatch(r"s[0-9a-f]{10}(_\d+)?", s) for s in d.selector_ips)
    assert d.selected_pair_count == 3 == len(pairs(d))


def test_explain_and_plan_say_an_infrastructure_address_is_never_selected() -> None:
    everything = policy("all", """\
    - endpoint1: {any: true}
      endpoint2: {any: true}
""")
    squat = [*W, wl("host-n2", "n2", "192.0.2.2"), wl("etcd", "n3", "10.77.0.2")]
    view = snap("n1", squat, [everything])
    out = explain(view, "10.200.1.11", "192.0.2.2")
    assert not out.selected and out.refused == (("192.0.2.2", "node address"),)
    assert ("192.0.2.2 is infrastructure (node address): refused for selection, never "
            "encrypted (traffic to and from it is never classified)") in out.render()
    assert out.to_json()["refused"] == {"192.0.2.2": "node address"}
    etcd = explain(view, "10.200.1.11", "10.77.0.2", {"10.77.0.2": "etcd endpoint"})
    assert not etcd.selected and "10.77.0.2 is infrastructure (etcd endpoint)" in etcd.render()
    assert explain(view, "10.200.1.11", "10.77.0.2").selected  # nobody said it was etcd
    assert explain(view, "10.200.1.11", "10.200.2.11").selected

    plan = diff_selection({}, {"all": everything}, view.workloads, RECORDS,
                          {"10.77.0.0/24": "configured"})
    assert plan.refused == {"10.77.0.2": "configured", "192.0.2.2": "node address"}
    assert not any(ip in pair for pair in plan.added for ip in plan.refused)
    assert ("  2 workload address(es) refused as infrastructure, never selected: "
            "10.77.0.2 (configured), 192.0.2.2 (node address)") in plan.render().splitlines()
