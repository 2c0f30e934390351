"""Tags, Workload and EncryptionPolicy: parse errors name file and field, signed round trips."""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path
from typing import Any

import pytest
from lab_workload_api.ca import LabCA

from tfcrypt.errors import ConfigError, Rejected, RejectReason
from tfcrypt.identity import Authorizer, TrustBundles, Verified, sign_envelope, verify_envelope
from tfcrypt.model.policy import (
    EncryptionPolicy,
    Endpoint,
    Mode,
    PolicyError,
    Rule,
    parse_policy_document,
    read_policy_file,
)
from tfcrypt.model.tags import Tag, parse_tags
from tfcrypt.model.workload import Workload

TD = "lab.tfcrypt"
NOW = dt.datetime(2025, 6, 1, 12, 0, tzinfo=dt.UTC)
CONTROLLER = f"spiffe://{TD}/tfcrypt/controller"

GOOD = """\
apiVersion: tfcrypt.io/v1alpha1
kind: EncryptionPolicy
metadata: {name: payments}
spec:
  mode: audit
  rules:
    - endpoint1: {tags: [application=payments, label=PCI]}
      endpoint2: {any: true}
      match_tags: [Site]
    - endpoint1: {subnet: 10.200.0.0/16}
      endpoint2: {tags: [Tier=DB]}
"""


@pytest.fixture(scope="module")
def ca() -> LabCA:
    return LabCA.generate(TD, now=NOW - dt.timedelta(hours=1))


def signed_and_verified(ca: LabCA, payload: dict[str, Any]) -> Verified:
    svid = ca.issue(CONTROLLER, dt.timedelta(hours=1), now=NOW)
    raw = sign_envelope(payload, svid.key, svid.chain)
    return verify_envelope(raw, payload["key"], bundles=TrustBundles({TD: [ca.cert]}),
                           authorizer=Authorizer(TD), now=NOW)


def workload(**overrides: Any) -> Workload:
    fields: dict[str, Any] = {"name": "n1-w1", "node": "n1", "ips": ("10.200.1.11",),
                              "tags": parse_tags(["application=payments", "site=a"])}
    fields.update(overrides)
    return Workload(**fields)


# --- tags -------------------------------------------------------------------------------

def test_tag_type_is_lowercased_value_keeps_case() -> None:
    tag = Tag.parse("Application=PayMents")
    assert (tag.type, tag.value, str(tag)) == ("application", "PayMents", "application=PayMents")
    assert Tag.parse("SITE=a") == Tag("site", "a") != Tag("site", "A")


def test_only_the_first_equals_splits() -> None:
    assert Tag.parse("custom=a=b") == Tag("custom", "a=b")


@pytest.mark.parametrize("text", ["application", "=x", "application=", "app lication=x",
                                  "site=a b", "site=a,b", "9type=x", 7])
def test_bad_tags_are_refused(text: object) -> None:
    with pytest.raises(ValueError):
        Tag.parse(text)


@pytest.mark.parametrize("kind", ["application", "tier", "deployment", "site", "team"])
def test_single_valued_types_refuse_two_values(kind: str) -> None:
    with pytest.raises(ValueError, match=f"tags: {kind}: one value per workload"):
        workload(tags=[f"{kind}=a", f"{kind.upper()}=b"])


def test_same_value_twice_is_one_tag() -> None:
    assert workload(tags=["site=a", "SITE=a"]).tags == {Tag("site", "a")}


def test_label_holds_many_values() -> None:
    w = workload(tags=["label=pci", "label=gdpr", "site=a"])
    assert w.labels == {"pci", "gdpr"}
    assert w.tag_value("label") is None
    assert (w.tag_value("SITE"), w.tag_value("tier")) == ("a", None)


# --- workloads ----------------------------------------------------------------------------

def test_workload_ips_are_normalised() -> None:
    w = workload(ips=["FD00::0:1", "10.0.0.2", "10.0.0.1", "10.0.0.2"])
    assert w.ips == ("10.0.0.1", "10.0.0.2", "fd00::1")
    assert w == workload(ips=["fd00::1", "10.0.0.1", "10.0.0.2"])


@pytest.mark.parametrize("field,value,message", [
    ("name", "N1", "name"), ("name", "a..b", "name"), ("name", "a" * 64, "name"),
    ("name", "a.", "name"), ("name", "ns.-pod", "name"), ("name", "a." + "b" * 300, "name"),
    ("node", "-n1", "node"),
    ("ips", ["10.0.0.1/32"], r"ips\[0\]"), ("ips", ["10.0.0.1", "banana"], r"ips\[1\]"),
    ("ips", ["0.0.0.0"], r"ips\[0\]"), ("ips", ["224.0.0.1"], r"ips\[0\]"),
    ("ips", ["127.0.0.1"], r"ips\[0\]"), ("ips", ["fe80::1%eth0"], r"ips\[0\]"),
    ("ips", "10.0.0.1", "ips"), ("tags", ["site"], r"tags\[0\]"),
])
def test_bad_workload_fields_name_the_field(field: str, value: Any, message: str) -> None:
    with pytest.raises(ValueError, match=f"^{message}"):
        workload(**{field: value})


def test_workload_round_trip_through_a_signed_envelope(ca: LabCA) -> None:
    w = workload(ips=("10.200.1.11", "fd00:200:1::11"),
                 tags=parse_tags(["application=Pay", "label=a", "label=b"]))
    payload = w.to_payload(epoch=4, issued_at=1748779200)
    assert (payload["kind"], payload["key"], payload["epoch"]) == ("Workload",
                                                                   "workloads/n1/n1-w1", 4)
    assert payload["tags"] == ["application=Pay", "label=a", "label=b"]
    assert Workload.from_verified(signed_and_verified(ca, payload)) == w


@pytest.mark.parametrize("field,value,reason,path", [
    ("ips", ["10.0.0.1", "x"], RejectReason.INVALID_FIELD, "payload.ips[1]"),
    ("ips", "10.0.0.1", RejectReason.INVALID_FIELD, "payload.ips"),
    ("tags", ["site=a", "site=b"], RejectReason.INVALID_FIELD, "payload.tags: site"),
    ("tags", ["ok=1", 5], RejectReason.INVALID_FIELD, "payload.tags[1]"),
    ("name", 5, RejectReason.INVALID_FIELD, "payload.name"),
    ("node", "n2", RejectReason.KEY_MISMATCH, "payload.node"),
    ("kind", "NodeRecord", RejectReason.INVALID_FIELD, "payload.kind"),
])
def test_workload_payload_rejections(ca: LabCA, field: str, value: Any, reason: RejectReason,
                                     path: str) -> None:
    payload = {**workload().to_payload(epoch=1, issued_at=1), field: value}
    with pytest.raises(Rejected) as info:
        Workload.from_verified(signed_and_verified(ca, payload))
    assert info.value.reason is reason
    assert info.value.detail.startswith(path), info.value.detail


@pytest.mark.parametrize("field", ["name", "node", "ips", "tags"])
def test_workload_missing_field(ca: LabCA, field: str) -> None:
    payload = workload().to_payload(epoch=1, issued_at=1)
    del payload[field]
    with pytest.raises(Rejected) as info:
        Workload.from_verified(signed_and_verified(ca, payload))
    assert (info.value.reason, info.value.detail) == (RejectReason.MISSING_FIELD,
                                                      f"payload.{field}")


# --- policies -------------------------------------------------------------------------------

def test_good_policy_parses_to_normal_form() -> None:
    p = parse_policy_document(GOOD, "payments.yaml")
    assert p.name == "payments" and p.mode is Mode.AUDIT
    first, second = p.rules
    assert first.endpoint1.tags == {Tag("application", "payments"), Tag("label", "PCI")}
    assert first.endpoint2.any and first.match_tags == ("site",)
    assert second.endpoint1.subnet == "10.200.0.0/16" and second.match_tags == ()
    assert second.endpoint2.tags == {Tag("tier", "DB")}


def test_mode_defaults_to_enforce() -> None:
    assert parse_policy_document(GOOD.replace("  mode: audit\n", "")).mode is Mode.ENFORCE


def _edit(old: str, new: str) -> str:
    assert old in GOOD
    return GOOD.replace(old, new)


@pytest.mark.parametrize("text,expected", [
    (_edit("endpoint2: {any: true}", "endpoint2: {any: true, subnet: 10.0.0.0/8}"),
     "payments.yaml: spec.rules[0].endpoint2: exactly one of tags, subnet, any"),
    (_edit("endpoint2: {tags: [Tier=DB]}", "endpoint2: {}"),
     "payments.yaml: spec.rules[1].endpoint2: exactly one of tags, subnet, any"),
    (_edit("match_tags: [Site]", "match_tags: [site, Label]"),
     "payments.yaml: spec.rules[0].match_tags[1]: label holds many values"),
    (_edit("match_tags: [Site]", "match_tags: site"),
     "payments.yaml: spec.rules[0].match_tags: not a list"),
    (_edit("10.200.0.0/16", "10.200.0.1/16"),
     "payments.yaml: spec.rules[1].endpoint1.subnet: '10.200.0.1/16' is not a network CIDR"),
    (_edit("10.200.0.0/16", "nowhere"),
     "payments.yaml: spec.rules[1].endpoint1.subnet: 'nowhere' is not a network CIDR"),
    (_edit("application=payments", "application"),
     "payments.yaml: spec.rules[0].endpoint1.tags[0]: 'application': a tag is type=value"),
    (_edit("label=PCI", "application=billing"),
     "payments.yaml: spec.rules[0].endpoint1: tags: can never match: application"),
    (_edit("[Tier=DB]", "[]"), "payments.yaml: spec.rules[1].endpoint2.tags: empty"),
    (_edit("{any: true}", "{any: false}"),
     "payments.yaml: spec.rules[0].endpoint2.any: False: must be true"),
    (_edit("mode: audit", "mode: Enforce"),
     "payments.yaml: spec.mode: 'Enforce', expected one of enforce, audit"),
    (_edit("{name: payments}", "{name: Payments}"),
     "payments.yaml: metadata.name: 'Payments' is not a DNS-1123"),
    (_edit("{name: payments}", "{labels: {}}"), "payments.yaml: metadata.name: missing"),
    (_edit("tfcrypt.io/v1alpha1", "tfcrypt.io/v2"),
     "payments.yaml: apiVersion: 'tfcrypt.io/v2', expected 'tfcrypt.io/v1alpha1'"),
    (_edit("kind: EncryptionPolicy", "kind: NetworkPolicy"), "payments.yaml: kind: "),
    (_edit("  rules:\n", "  rule:\n"), "payments.yaml: spec.rule: unknown field"),
    (_edit("      match_tags: [Site]", "      match_tag: [Site]"),
     "payments.yaml: spec.rules[0].match_tag: unknown field"),
    (_edit("endpoint2: {any: true}", "endpoint_2: {any: true}"),
     "payments.yaml: spec.rules[0].endpoint_2: unknown field"),
    (GOOD.split("  rules:")[0] + "  rules: []\n", "payments.yaml: spec.rules: empty"),
    (GOOD.split("spec:")[0], "payments.yaml: spec: missing"),
    ("- a\n- b\n", "payments.yaml: (document): not a mapping"),
    ("", "payments.yaml: (document): not a mapping"),
    ("spec: [\n", "payments.yaml: not valid YAML"),
    (GOOD + "---\n" + GOOD, "payments.yaml: not valid YAML"),
])
def test_parse_errors_name_file_and_field(text: str, expected: str) -> None:
    with pytest.raises(PolicyError) as info:
        parse_policy_document(text, "payments.yaml")
    assert str(info.value).startswith(expected), str(info.value)
    assert isinstance(info.value, ConfigError)


def test_label_in_match_tags_is_refused_in_code_too() -> None:
    with pytest.raises(ValueError, match="label"):
        Rule(Endpoint(any=True), Endpoint(any=True), ("site", "label"))


def test_document_round_trip() -> None:
    p = parse_policy_document(GOOD)
    assert parse_policy_document(str(p.to_document()).replace("'", '"')
                                 .replace("True", "true")) == p
    assert p.to_document()["spec"]["rules"][0] == {
        "endpoint1": {"tags": ["application=payments", "label=PCI"]},
        "endpoint2": {"any": True}, "match_tags": ["site"]}


def test_policy_round_trip_through_a_signed_envelope(ca: LabCA) -> None:
    p = parse_policy_document(GOOD)
    payload = p.to_payload(epoch=2, issued_at=1748779200)
    assert (payload["kind"], payload["key"]) == ("EncryptionPolicy", "policies/payments")
    assert EncryptionPolicy.from_verified(signed_and_verified(ca, payload)) == p


def test_payload_ignores_unknown_fields_but_rejects_bad_ones(ca: LabCA) -> None:
    p = parse_policy_document(GOOD)
    payload = p.to_payload(epoch=2, issued_at=1)
    payload["spec"]["rules"][0]["comment"] = "from a newer controller"
    assert EncryptionPolicy.from_verified(signed_and_verified(ca, payload)) == p
    payload["spec"]["rules"][1]["endpoint2"] = {"tags": ["tier=db"], "any": True}
    with pytest.raises(Rejected) as info:
        EncryptionPolicy.from_verified(signed_and_verified(ca, payload))
    assert info.value.reason is RejectReason.INVALID_FIELD
    assert info.value.detail == ("payload.spec.rules[1].endpoint2: "
                                 "exactly one of tags, subnet, any")


def test_policy_payload_key_mismatch(ca: LabCA) -> None:
    payload = {**parse_policy_document(GOOD).to_payload(epoch=1, issued_at=1), "name": "other"}
    with pytest.raises(Rejected) as info:
        EncryptionPolicy.from_verified(signed_and_verified(ca, payload))
    assert info.value.reason is RejectReason.KEY_MISMATCH


def test_policy_payload_missing_spec(ca: LabCA) -> None:
    payload = parse_policy_document(GOOD).to_payload(epoch=1, issued_at=1)
    del payload["spec"]
    with pytest.raises(Rejected) as info:
        EncryptionPolicy.from_verified(signed_and_verified(ca, payload))
    assert (info.value.reason, info.value.detail) == (RejectReason.MISSING_FIELD,
                                                      "payload.spec")


# -- YAML input is strict and bounded (issue #14 item 5; tfcrypt.safeyaml) ---------------

LAUGHS = """\
apiVersion: tfcrypt.io/v1alpha1
kind: EncryptionPolicy
metadata: {name: lol}
x0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]
""" + "".join(f"x{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]\n" for i in range(1, 10)) + """\
spec:
  rules:
  - endpoint1: {tags: *a9}
    endpoint2: {any: true}
"""


def test_a_duplicate_key_is_refused_not_resolved_to_the_last() -> None:
    text = GOOD.replace("  mode: audit\n", "  mode: audit\n  mode: enforce\n")
    with pytest.raises(PolicyError, match=r"^p.yaml: .*duplicate key 'mode'"):
        parse_policy_document(text, "p.yaml")


def test_an_alias_bomb_is_refused_before_it_expands() -> None:
    start = time.monotonic()
    with pytest.raises(PolicyError) as info:
        parse_policy_document(LAUGHS, "lol.yaml")
    assert time.monotonic() - start < 1
    assert str(info.value) == ("lol.yaml: not valid YAML (line 9, column 5): more than "
                               "200000 nodes once aliases are expanded")


def test_a_few_aliases_are_read_as_copies() -> None:
    """PyYAML's own dumper writes anchors for shared values (yaml.safe_dump)."""
    text = GOOD.replace("endpoint2: {any: true}", "endpoint2: &all {any: true}") \
        + "    - endpoint1: {subnet: 10.9.0.0/16}\n      endpoint2: *all\n"
    assert parse_policy_document(text).rules[2].endpoint2.any


def test_a_huge_value_is_quoted_as_a_short_excerpt() -> None:
    text = GOOD.replace("kind: EncryptionPolicy", "kind: " + "K" * 1_000_000)
    with pytest.raises(PolicyError) as info:
        parse_policy_document(text, "p.yaml")
    assert len(str(info.value)) < 200 and str(info.value).startswith("p.yaml: kind: 'KKK")


@pytest.mark.parametrize(("content", "problem"), [
    (b"kind: EncryptionPolicy\nmetadata: {name: \xff}\n",
     "the policy file is not UTF-8 text (byte 0xff at offset 40)"),
    (b"#" * (1 << 20) + b"\n", "the policy file is larger than 1048576 bytes: refused"),
    (b"[" * 10_000 + b"]" * 10_000, "not valid YAML (line 1, column 65): nested deeper "
                                    "than 64"),
])
def test_a_file_that_is_not_utf8_too_big_or_too_deep_is_one_line(
        tmp_path: Path, content: bytes, problem: str) -> None:
    path = tmp_path / "p.yaml"
    path.write_bytes(content)
    with pytest.raises(PolicyError) as info:
        read_policy_file(str(path))
    assert str(info.value).endswith(problem) and "\n" not in str(info.value)


def test_a_character_yaml_refuses_is_a_policy_error() -> None:
    with pytest.raises(PolicyError, match=r"^p.yaml: not valid YAML: unacceptable character "
                                          r"#x0007"):
        parse_policy_document("kind: \x07", "p.yaml")
