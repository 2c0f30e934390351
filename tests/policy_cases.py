"""EncryptionPolicy documents the CRD (deploy/kubernetes/crd-encryptionpolicies.yaml) and
tfcrypt's own parser must agree on, each with what the real API server says about it.

Why a table of its own: tests/test_kube_lab.py applies every case to a real
kube-apiserver (`kubectl apply --dry-run=server`) and checks the parser's verdict on the
same document, so the CRD's schema and CEL rules are proven by the server that enforces
them, not by a transcription. `refusal` is None for a document both must accept, else a
piece of the message `kubectl apply` must print (field path and problem), so a case
refused for another reason than the one it is about fails.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tfcrypt.model.policy import API_VERSION, KIND

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Case:
    id: str
    doc: dict[str, Any]
    refusal: str | None  # None: accepted; else a substring of kubectl's error
    # a bound only the API server has (the CEL cost budget caps tags per endpoint at 12,
    # crd-encryptionpolicies.yaml): the parser accepts the document
    server_only: bool = False


def ep(**selector: Any) -> dict[str, Any]:
    return selector


ANY = ep(any=True)
PAYMENTS = ep(tags=["application=payments"])


def policy(*rules: dict[str, Any], mode: str | None = "enforce", name: str = "p",
           top: dict[str, Any] | None = None, spec: dict[str, Any] | None = None
           ) -> dict[str, Any]:
    body: dict[str, Any] = {} if mode is None else {"mode": mode}
    body["rules"] = list(rules)
    body.update(spec or {})
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": name},
            "spec": body, **(top or {})}


def rule(e1: dict[str, Any], e2: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"endpoint1": e1, "endpoint2": e2, **extra}


def examples() -> list[Case]:
    out = []
    for path in sorted((ROOT / "examples").glob("*.yaml")):
        doc = yaml.safe_load(path.read_text())
        if isinstance(doc, dict) and doc.get("kind") == KIND:
            out.append(Case(f"examples/{path.name}", doc, None))
    return out


E1 = "spec.rules[0].endpoint1"
ONE_OF = f'"{E1}" must validate one and only one schema (oneOf).'
SINGLE_VALUED = "a tag type other than label holds one value per workload"
TAG_PATTERN = "in body should match '^[A-Za-z][A-Za-z0-9_-]{0,62}="
CASES: list[Case] = [
    *examples(),
    Case("ipv6-subnet", policy(rule(ep(subnet="fd00:10::/64"), ANY)), None),
    Case("subnet-to-tags", policy(rule(ep(subnet="10.200.0.0/16"),
                                       ep(tags=["application=shop", "site=east"]))), None),
    Case("mode-omitted-defaults-to-enforce", policy(rule(PAYMENTS, ANY), mode=None), None),
    Case("many-labels", policy(rule(ep(tags=["label=pci", "label=gdpr"]), ANY)), None),
    Case("type-case-folded", policy(rule(ep(tags=["Application=Payments"]), ANY,
                                         match_tags=["Site"])), None),
    Case("value-with-equals", policy(rule(ep(tags=["application=a=b"]), ANY)), None),
    Case("same-tag-twice", policy(rule(ep(tags=["tier=db", "TIER=db"]), ANY)), None),
    Case("twelve-tags", policy(rule(ep(tags=[f"label=l{i}" for i in range(12)]), ANY)), None),
    Case("thirteen-tags", policy(rule(ep(tags=[f"label=l{i}" for i in range(13)]), ANY)),
         f"{E1}.tags: Too many: 13: must have at most 12 items", server_only=True),
    Case("two-rules-and-status", policy(rule(PAYMENTS, ANY), rule(ANY, ANY),
                                        top={"status": {"observedGeneration": 1}}), None),
    Case("two-selectors-in-an-endpoint",
         policy(rule(ep(tags=["application=payments"], any=True), ANY)),
         f"{ONE_OF} Found 2 valid alternatives"),
    Case("subnet-and-tags", policy(rule(ep(tags=["a=b"], subnet="10.0.0.0/8"), ANY)),
         f"{ONE_OF} Found 2 valid alternatives"),
    Case("no-selector", policy(rule(ep(), ANY)), f"{ONE_OF} Found none valid"),
    Case("bad-mode", policy(rule(PAYMENTS, ANY), mode="permissive"),
         'spec.mode: Unsupported value: "permissive"'),
    Case("mode-is-case-sensitive", policy(rule(PAYMENTS, ANY), mode="Enforce"),
         'spec.mode: Unsupported value: "Enforce"'),
    Case("empty-rules", policy(), "spec.rules in body should have at least 1 items"),
    Case("missing-rules", {**policy(), "spec": {"mode": "enforce"}},
         "spec.rules: Required value"),
    Case("missing-endpoint2", policy({"endpoint1": ANY}),
         "spec.rules[0].endpoint2: Required value"),
    Case("label-in-match_tags", policy(rule(PAYMENTS, ANY, match_tags=["label"])),
         '"spec.rules[0].match_tags[0]" must not validate the schema (not)'),
    Case("LABEL-in-match_tags", policy(rule(PAYMENTS, ANY, match_tags=["site", "LABEL"])),
         '"spec.rules[0].match_tags[1]" must not validate the schema (not)'),
    Case("match_tags-bad-type", policy(rule(PAYMENTS, ANY, match_tags=["1site"])),
         'spec.rules[0].match_tags[0]: Invalid value: "1site"'),
    Case("match_tags-not-a-list", policy(rule(PAYMENTS, ANY, match_tags="site")),
         "spec.rules[0].match_tags in body must be of type array"),
    Case("tag-without-value", policy(rule(ep(tags=["application"]), ANY)),
         f"{E1}.tags[0] {TAG_PATTERN}"),
    Case("tag-with-space", policy(rule(ep(tags=["application=my app"]), ANY)),
         f"{E1}.tags[0] {TAG_PATTERN}"),
    Case("tag-empty-value", policy(rule(ep(tags=["application="]), ANY)),
         f"{E1}.tags[0] {TAG_PATTERN}"),
    Case("tag-bad-type", policy(rule(ep(tags=["9app=x"]), ANY)),
         f"{E1}.tags[0] {TAG_PATTERN}"),
    Case("tags-empty", policy(rule(ep(tags=[]), ANY)),
         f"{E1}.tags in body should have at least 1 items"),
    Case("tags-a-string", policy(rule(ep(tags="application=payments"), ANY)),
         f"{E1}.tags in body must be of type array"),
    Case("two-values-of-one-type",
         policy(rule(ep(tags=["application=a", "Application=b"]), ANY)),
         f"{E1}.tags: Invalid value: {SINGLE_VALUED}"),
    Case("subnet-prefix-too-long", policy(rule(ep(subnet="10.0.0.0/33"), ANY)),
         f"{E1}.subnet in body must be of type cidr"),
    Case("subnet-garbage", policy(rule(ep(subnet="ten.0.0.0/8"), ANY)),
         f"{E1}.subnet in body must be of type cidr"),
    Case("subnet-host-bits", policy(rule(ep(subnet="10.0.0.1/8"), ANY)),
         f'{E1}.subnet: Invalid value: "10.0.0.1/8": a network CIDR without host bits'),
    Case("subnet-v6-host-bits", policy(rule(ep(subnet="fd00::1/64"), ANY)),
         f'{E1}.subnet: Invalid value: "fd00::1/64": a network CIDR without host bits'),
    Case("any-false", policy(rule(ep(any=False), ANY)), f"{E1}.any: Unsupported value"),
    Case("unknown-rule-field", policy(rule(PAYMENTS, ANY, match_tag=["site"])),
         'unknown field "spec.rules[0].match_tag"'),
    Case("unknown-endpoint-field", policy(rule(ep(any=True, negate=True), ANY)),
         f'unknown field "{E1}.negate"'),
    Case("unknown-spec-field", policy(rule(PAYMENTS, ANY), spec={"selector": {}}),
         'unknown field "spec.selector"'),
    Case("wrong-kind", {**policy(rule(ANY, ANY)), "kind": "NetworkPolicy"},
         'no matches for kind "NetworkPolicy"'),
    Case("bad-name", policy(rule(ANY, ANY), name="Payments_1"),
         'metadata.name: Invalid value: "Payments_1"'),
    Case("subnet-bare-address", policy(rule(ep(subnet="10.0.0.0"), ANY)),
         f"{E1}.subnet in body must be of type cidr"),
    Case("subnet-netmask", policy(rule(ep(subnet="10.0.0.0/255.0.0.0"), ANY)),
         f"{E1}.subnet in body must be of type cidr"),
]
