"""The controller's pure mapping: Pods + Namespaces -> workload records, EncryptionPolicy
objects -> policies, the sync plan and the status (docs/controller.md)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from tfcrypt.controller import mapping
from tfcrypt.controller.desired import desired_state, plan_sync
from tfcrypt.controller.mapping import map_pod, map_policy
from tfcrypt.controller.policy_status import accepted_status, refused_status
from tfcrypt.errors import ConfigError
from tfcrypt.model.policy import EncryptionPolicy
from tfcrypt.model.tags import parse_tags
from tfcrypt.model.workload import Workload


def pod(name: str = "web-1", ns: str = "shop", node: str | None = "n1",
        ips: tuple[str, ...] = ("10.200.1.11", "fd00:200:1::11"),
        labels: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "metadata": {"name": name, "namespace": ns, "labels": labels or {}},
        "spec": {"nodeName": node} if node else {},
        "status": {"phase": "Running", "podIPs": [{"ip": ip} for ip in ips]}}
    for path, value in extra.items():
        part, _, leaf = path.partition("__")
        obj[part][leaf] = value
    return obj


def tags(w: Workload | None) -> set[str]:
    assert w is not None
    return {str(t) for t in w.tags}


def test_a_pod_is_a_workload_named_namespace_dot_pod_with_both_families() -> None:
    m = map_pod(pod(labels={"application": "payments", "tier": "web"}), {})
    assert m.key == "workloads/n1/shop.web-1"
    assert m.workload is not None and m.workload.key == m.key
    assert m.workload.ips == ("10.200.1.11", "fd00:200:1::11")
    assert tags(m.workload) == {"namespace=shop", "application=payments", "tier=web"}


def test_namespace_labels_are_inherited_and_the_pods_own_value_wins() -> None:
    m = map_pod(pod(labels={"site": "paris", "label": "pci"}),
                {"site": "lyon", "deployment": "prod", "label": "gdpr"})
    assert tags(m.workload) == {"namespace=shop", "site=paris", "deployment=prod",
                                "label=pci", "label=gdpr"}


def test_label_tfcrypt_io_keys_are_values_of_the_multi_valued_label_type() -> None:
    m = map_pod(pod(labels={"label.tfcrypt.io/pci": "", "label.tfcrypt.io/gdpr": ""}),
                {"label.tfcrypt.io/eu": ""})
    assert tags(m.workload) == {"namespace=shop", "label=pci", "label=gdpr", "label=eu"}


def test_tfcrypt_prefixed_keys_name_the_type_and_win_other_prefixes_are_ignored() -> None:
    ignored: Counter[str] = Counter()
    single, _ = mapping.tags_of({"tfcrypt.io/application": "pay", "application": "x",
                                 "app.kubernetes.io/name": "shop"}, ignored)
    assert {str(t) for t in single.values()} == {"application=pay"}
    assert ignored == {mapping.PREFIXED: 1, mapping.DUPLICATE: 1}


@pytest.mark.parametrize("key,value,reason", [
    ("app.version", "1", mapping.NOT_A_TYPE),      # a dot: no tag type
    ("9lives", "1", mapping.NOT_A_TYPE),           # a tag type starts with a letter
    ("site", "", mapping.BAD_VALUE),               # empty value
    ("namespace", "other", mapping.RESERVED),      # set by the controller
    ("kubernetes.io/metadata.name", "shop", mapping.PREFIXED),
])
def test_labels_that_are_no_tag_are_ignored_and_counted(key: str, value: str,
                                                         reason: str) -> None:
    m = map_pod(pod(labels={key: value, "tier": "web"}), {})
    assert m.workload is not None, "the rest of the pod is still published"
    assert tags(m.workload) == {"namespace=shop", "tier=web"}
    assert m.ignored == {reason: 1}


def test_a_pod_with_200_labels_is_capped_deterministically_and_counted() -> None:
    labels = {f"custom{i:03d}": "v" for i in range(200)} | {"application": "pay"}
    m = map_pod(pod(labels=labels), {})
    assert m.workload is not None
    assert len(m.workload.tags) == mapping.MAX_TAGS
    assert "application=pay" in tags(m.workload) and "namespace=shop" in tags(m.workload)
    assert m.ignored[mapping.TOO_MANY] == 201 + 1 - mapping.MAX_TAGS
    assert map_pod(pod(labels=dict(reversed(labels.items()))), {}).workload == m.workload


@pytest.mark.parametrize("obj,reason", [
    (pod(spec__hostNetwork=True), mapping.HOST_NETWORK),
    (pod(node=None), mapping.NOT_SCHEDULED),
    (pod(ips=()), mapping.NO_IPS),
    (pod(status__phase="Succeeded"), mapping.FINISHED),
    (pod(ips=("127.0.0.1",)), mapping.INVALID),
])
def test_pods_without_a_usable_record_are_skipped_with_a_reason(obj: dict[str, Any],
                                                                reason: str) -> None:
    m = map_pod(obj, {})
    assert (m.workload, m.skipped) == (None, reason)


def test_a_terminating_pod_keeps_its_record() -> None:
    obj = pod(metadata__deletionTimestamp="2026-12-03T17:00:00Z", status__phase="Succeeded")
    assert map_pod(obj, {}).workload is not None


def test_status_pod_ip_is_used_when_pod_ips_is_absent() -> None:
    obj = pod(ips=())
    obj["status"]["podIP"] = "10.200.1.12"
    m = map_pod(obj, {})
    assert m.workload is not None and m.workload.ips == ("10.200.1.12",)


POLICY = {"apiVersion": "tfcrypt.io/v1alpha1", "kind": "EncryptionPolicy",
          "metadata": {"name": "pay", "generation": 3, "uid": "x", "resourceVersion": "9",
                       "managedFields": [{"manager": "kubectl"}]},
          "spec": {"mode": "enforce", "rules": [
              {"endpoint1": {"tags": ["application=payments"]},
               "endpoint2": {"tags": ["application=db"]}}]},
          "status": {"observedGeneration": 2}}


def test_a_policy_object_is_parsed_by_the_cli_parser_ignoring_server_metadata() -> None:
    p = map_policy(POLICY)
    assert isinstance(p, EncryptionPolicy) and p.key == "policies/pay"


def test_a_refused_policy_names_the_field_and_gets_no_record() -> None:
    bad = {**POLICY, "spec": {"rules": [{"endpoint1": {"tags": ["a=1"], "any": True},
                                         "endpoint2": {"any": True}}]}}
    err = map_policy(bad)
    assert isinstance(err, ConfigError)
    assert "spec.rules[0].endpoint1: exactly one of tags, subnet, any" in str(err)
    d = desired_state({}, {}, {"pay": bad})
    assert d.records == {} and "spec.rules[0].endpoint1" in d.refused["pay"]
    st = refused_status(bad, d.refused["pay"], "2026-12-03T00:00:00Z")
    assert st["observedGeneration"] == 3
    assert st["conditions"][0]["type"] == "Accepted"
    assert st["conditions"][0]["status"] == "False"
    assert "spec.rules[0].endpoint1" in st["conditions"][0]["message"]


def _wl(name: str, node: str, ip: str, *tag_texts: str) -> Workload:
    return Workload(name=name, node=node, ips=(ip,), tags=parse_tags(tag_texts))


def test_status_counts_the_selected_pairs_and_names_nodes_without_a_key() -> None:
    p = map_policy(POLICY)
    assert isinstance(p, EncryptionPolicy)
    wls = {w.key: w for w in (_wl("shop.a", "n1", "10.0.0.1", "application=payments"),
                              _wl("shop.b", "n2", "10.0.0.2", "application=db"),
                              _wl("shop.c", "n2", "10.0.0.3", "application=other"))}
    st = accepted_status(POLICY, p, wls, {"pay": p}, {}, "2026-12-03T00:00:00Z")
    assert (st["pairs"], st["nodes"], st["observedGeneration"]) == (1, 2, 3)
    ready = st["conditions"][1]
    assert (ready["type"], ready["status"], ready["reason"]) == ("Ready", "False",
                                                                  "MissingKeys")
    assert "n1, n2" in ready["message"]
    again = accepted_status({**POLICY, "status": st}, p, wls, {"pay": p}, {},
                            "2026-12-03T01:00:00Z")
    assert again == st, "a resync writes the same status (transition times kept)"


def test_sync_plan_writes_only_what_differs_and_deletes_only_owned_records() -> None:
    a = _wl("shop.a", "n1", "10.0.0.1", "tier=web")
    b = _wl("shop.b", "n1", "10.0.0.2", "tier=web")
    c = _wl("shop.c", "n2", "10.0.0.3")
    plan = plan_sync({a.key: a, b.key: b, c.key: c},
                     owned={a.key: a, b.key: _wl("shop.b", "n1", "10.0.0.9"),
                            "workloads/n3/shop.gone": c},
                     held={c.key: "a record signed by someone else",
                           "workloads/n1/n1-w1": "the CLI"})
    assert set(plan.puts) == {b.key}
    assert plan.deletes == ("workloads/n3/shop.gone",)
    assert set(plan.conflicts) == {c.key}


def _started(obj: dict[str, Any], start: str, created: str = "2026-12-03T10:00:00Z"
             ) -> dict[str, Any]:
    obj["status"]["startTime"] = start
    obj["metadata"]["creationTimestamp"] = created
    return obj


def test_an_ip_listed_by_two_pods_is_published_for_the_newer_one_only() -> None:
    old = _started(pod("a", node="n1", ips=("10.200.1.11",), labels={"tier": "old"}),
                   "2026-12-03T10:00:00Z")
    new = _started(pod("b", node="n2", ips=("10.200.1.11",), labels={"tier": "new"}),
                   "2026-12-03T10:05:00Z")
    for order in (("a", "b"), ("b", "a")):  # whatever order the cache lists them
        objs = {"a": old, "b": new}
        d = desired_state({k: objs[k] for k in order}, {}, {})
        assert set(d.records) == {"workloads/n2/shop.b"}
        assert d.skipped == {mapping.IP_CONFLICT: 1}
        assert "10.200.1.11" in d.skip_details["workloads/n1/shop.a"]
        assert "published for the newest, n2/shop.b" in d.ip_conflicts["10.200.1.11"]


def test_the_older_pod_keeps_its_other_addresses() -> None:
    old = _started(pod("a", ips=("10.200.1.11", "fd00:200:1::11")), "2026-12-03T10:00:00Z")
    new = _started(pod("b", ips=("10.200.1.11",)), "2026-12-03T10:00:00Z",
                   created="2026-12-03T10:00:01Z")  # same start second: creation decides
    d = desired_state({"a": old, "b": new}, {}, {})
    a, b = d.records["workloads/n1/shop.a"], d.records["workloads/n1/shop.b"]
    assert isinstance(a, Workload) and isinstance(b, Workload)
    assert (a.ips, b.ips) == (("fd00:200:1::11",), ("10.200.1.11",))
    assert d.skipped == {} and set(d.ip_conflicts) == {"10.200.1.11"}


def test_two_pods_of_the_same_age_listing_one_ip_get_it_in_neither_record() -> None:
    a = _started(pod("a", ips=("10.200.1.11",)), "2026-12-03T10:00:00Z")
    b = _started(pod("b", node="n2", ips=("10.200.1.11",)), "2026-12-03T10:00:00Z")
    d = desired_state({"a": a, "b": b}, {}, {})
    assert d.records == {} and d.skipped == {mapping.IP_CONFLICT: 2}
    assert "published for neither" in d.ip_conflicts["10.200.1.11"]


def test_a_finished_pod_does_not_contest_the_ip_its_successor_got() -> None:
    gone = _started(pod("a", ips=("10.200.1.11",), status__phase="Succeeded"),
                    "2026-12-03T11:00:00Z")
    new = _started(pod("b", ips=("10.200.1.11",)), "2026-12-03T10:00:00Z")
    d = desired_state({"a": gone, "b": new}, {}, {})
    assert set(d.records) == {"workloads/n1/shop.b"} and d.ip_conflicts == {}
