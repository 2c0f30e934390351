"""Deployment files, validated offline: no cluster, no image build, no systemd as PID 1.

Rules:
- Every built-in Kubernetes object in deploy/kubernetes and spire/k8s validates against
  the Kubernetes OpenAPI schemas shipped by kubernetes-validate, in strict mode (an
  unknown field, a typo, fails).
- Custom kinds are validated against their own schema. EncryptionPolicy: the CRD's
  openAPIV3Schema, run with jsonschema the way the API server applies it (unknown fields
  refused as kubectl's default Strict field validation does, `format: cidr`, the CEL
  rules through a Python transcription keyed by their exact text, object names), must
  accept and reject the same documents as tfcrypt's own parser. ClusterSPIFFEID: a
  schema of spire-controller-manager's fields written here, plus the rendered SPIFFE ID
  must be the one the agent demands.
- The DaemonSet, RBAC, ConfigMap, kustomization, Containerfile and systemd unit are
  checked for the properties docs/deploy.md promises.
"""

from __future__ import annotations

import configparser
import copy
import ipaddress
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tfcrypt.model.policy import API_VERSION, KIND, Mode, PolicyError, parse_policy_document

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "kubernetes"
SPIRE_K8S = ROOT / "spire" / "k8s"
SYSTEMD = ROOT / "deploy" / "systemd"
# The CRD's CEL cidr library needs 1.31; validate against the oldest version we support.
K8S_VERSION = "1.31"
CUSTOM_KINDS = {"ClusterSPIFFEID"}
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def load_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def manifest_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def all_objects() -> list[tuple[str, dict[str, Any]]]:
    files = [*manifest_files(), SPIRE_K8S / "spiffe-csi-driver.yaml"]
    return [(f"{p.relative_to(ROOT)}#{i}", d) for p in files for i, d in enumerate(load_docs(p))]


def the(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for _, d in all_objects()
             if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


# -- built-in kinds against the Kubernetes schemas ---------------------------------------

BUILTIN = [(where, d) for where, d in all_objects()
           if d["kind"] not in CUSTOM_KINDS]


@pytest.mark.parametrize(("where", "doc"), BUILTIN, ids=[w for w, _ in BUILTIN])
def test_builtin_object_validates_strictly_against_the_kubernetes_schema(
        where: str, doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_every_object_is_either_builtin_or_a_custom_kind_validated_here() -> None:
    kinds = {d["kind"] for _, d in all_objects()}
    assert kinds - CUSTOM_KINDS == {d["kind"] for _, d in BUILTIN}
    assert kinds & CUSTOM_KINDS == CUSTOM_KINDS


def test_the_schema_validator_does_catch_a_typo() -> None:
    broken = copy.deepcopy(the("DaemonSet", "tfcrypt-agent"))
    spec = broken["spec"]["template"]["spec"]
    spec["hostNetwrok"] = spec.pop("hostNetwork")
    with pytest.raises(jsonschema.ValidationError, match="hostNetwrok"):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


# -- the EncryptionPolicy CRD against tfcrypt's parser -------------------------------------

def _tag_type(tag: str) -> str:
    return tag.split("=", 1)[0].lower()


def _single_values(tags: list[str]) -> bool:
    if not all(isinstance(t, str) and "=" in t for t in tags):
        return False
    return all(_tag_type(a) != _tag_type(b) or _tag_type(a) == "label"
               or a.split("=", 1)[1] == b.split("=", 1)[1] for a in tags for b in tags)


def _masked_cidr(value: str) -> bool:
    try:
        return ipaddress.ip_network(value, strict=True) is not None
    except ValueError:
        return False


# Each CEL rule of the CRD, transcribed: a changed rule fails until its twin is updated.
CEL_TWINS: dict[str, Callable[[Any], bool]] = {
    "self.all(a, self.all(b, a.split('=', 2)[0].lowerAscii() != "
    "b.split('=', 2)[0].lowerAscii() || a.split('=', 2)[0].lowerAscii() == 'label' || "
    "a.split('=', 2)[1] == b.split('=', 2)[1]))": _single_values,
    "isCIDR(self) && cidr(self) == cidr(self).masked()": _masked_cidr,
}


def _rule_text(rule: str) -> str:
    return " ".join(rule.split()).replace("( ", "(")


def _cel(validator: Any, rules: list[dict[str, str]], instance: Any,
         schema: dict[str, Any]) -> Iterator[jsonschema.ValidationError]:
    for rule in rules:
        if not CEL_TWINS[_rule_text(rule["rule"])](instance):
            yield jsonschema.ValidationError(rule["message"])


CIDR_FORMAT = jsonschema.FormatChecker(formats=())


@CIDR_FORMAT.checks("cidr", raises=ValueError)
def _go_parse_cidr(value: object) -> bool:
    """Go's net.ParseCIDR: address/decimal prefix length; host bits allowed."""
    if not isinstance(value, str):
        return True
    if not re.fullmatch(r"[^/]+/\d{1,3}", value):
        raise ValueError(f"{value!r}: not address/prefix")
    ipaddress.ip_network(value, strict=False)
    return True


def _field_validation_strict(node: Any) -> Any:
    """Unknown fields refused wherever the schema lists properties (kubectl's default)."""
    if isinstance(node, list):
        return [_field_validation_strict(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _field_validation_strict(v) for k, v in node.items()}
    if "properties" in out and not out.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


CRD = the("CustomResourceDefinition", "encryptionpolicies.tfcrypt.io")
CRD_VERSION = CRD["spec"]["versions"][0]
OPENAPI = CRD_VERSION["schema"]["openAPIV3Schema"]
ApiServerValidator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator, {"x-kubernetes-validations": _cel})


API_SERVER = ApiServerValidator(_field_validation_strict(OPENAPI), format_checker=CIDR_FORMAT)


def api_server_refusal(doc: Any) -> str | None:
    """Why the API server would refuse `doc` as an EncryptionPolicy, or None."""
    if not isinstance(doc, dict):
        return "not an object"
    expected = (f"{CRD['spec']['group']}/{CRD_VERSION['name']}", CRD["spec"]["names"]["kind"])
    if (doc.get("apiVersion"), doc.get("kind")) != expected:
        return "not routed to this CRD"
    name = (doc.get("metadata") or {}).get("name")
    if not isinstance(name, str) or len(name) > 253 or not DNS1123_SUBDOMAIN.match(name):
        return f"metadata.name {name!r}"
    error = jsonschema.exceptions.best_match(API_SERVER.iter_errors(doc))
    return None if error is None else f"{'.'.join(map(str, error.path))}: {error.message}"


def parser_refusal(text: str) -> str | None:
    try:
        parse_policy_document(text, "case.yaml")
    except PolicyError as exc:
        return str(exc)
    return None


def ep(**selector: Any) -> dict[str, Any]:
    return selector


ANY = ep(any=True)


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


def _examples() -> list[Any]:
    out = []
    for path in sorted((ROOT / "examples").glob("*.yaml")):
        doc = yaml.safe_load(path.read_text())
        if isinstance(doc, dict) and doc.get("kind") == KIND:
            out.append(pytest.param(doc, True, id=f"examples/{path.name}"))
    return out


def _case(case_id: str, doc: dict[str, Any], accepted: bool) -> Any:
    return pytest.param(doc, accepted, id=case_id)


PAYMENTS = ep(tags=["application=payments"])
POLICY_TABLE = [
    *_examples(),
    _case("ipv6-subnet", policy(rule(ep(subnet="fd00:10::/64"), ANY)), True),
    _case("subnet-to-tags", policy(rule(ep(subnet="10.200.0.0/16"),
                                        ep(tags=["application=shop", "site=east"]))), True),
    _case("mode-omitted-defaults-to-enforce", policy(rule(PAYMENTS, ANY), mode=None), True),
    _case("many-labels", policy(rule(ep(tags=["label=pci", "label=gdpr"]), ANY)), True),
    _case("type-case-folded", policy(rule(ep(tags=["Application=Payments"]), ANY,
                                          match_tags=["Site"])), True),
    _case("value-with-equals", policy(rule(ep(tags=["application=a=b"]), ANY)), True),
    _case("same-tag-twice", policy(rule(ep(tags=["tier=db", "TIER=db"]), ANY)), True),
    _case("two-rules-and-status", policy(rule(PAYMENTS, ANY), rule(ANY, ANY),
                                         top={"status": {"observedGeneration": 1}}), True),
    _case("two-selectors-in-an-endpoint",
          policy(rule(ep(tags=["application=payments"], any=True), ANY)), False),
    _case("subnet-and-tags", policy(rule(ep(tags=["a=b"], subnet="10.0.0.0/8"), ANY)), False),
    _case("no-selector", policy(rule(ep(), ANY)), False),
    _case("bad-mode", policy(rule(PAYMENTS, ANY), mode="permissive"), False),
    _case("mode-is-case-sensitive", policy(rule(PAYMENTS, ANY), mode="Enforce"), False),
    _case("empty-rules", policy(), False),
    _case("missing-rules", {**policy(), "spec": {"mode": "enforce"}}, False),
    _case("missing-endpoint2", policy({"endpoint1": ANY}), False),
    _case("label-in-match_tags", policy(rule(PAYMENTS, ANY, match_tags=["label"])), False),
    _case("LABEL-in-match_tags", policy(rule(PAYMENTS, ANY, match_tags=["site", "LABEL"])),
          False),
    _case("match_tags-bad-type", policy(rule(PAYMENTS, ANY, match_tags=["1site"])), False),
    _case("match_tags-not-a-list", policy(rule(PAYMENTS, ANY, match_tags="site")), False),
    _case("tag-without-value", policy(rule(ep(tags=["application"]), ANY)), False),
    _case("tag-with-space", policy(rule(ep(tags=["application=my app"]), ANY)), False),
    _case("tag-empty-value", policy(rule(ep(tags=["application="]), ANY)), False),
    _case("tag-bad-type", policy(rule(ep(tags=["9app=x"]), ANY)), False),
    _case("tags-empty", policy(rule(ep(tags=[]), ANY)), False),
    _case("tags-a-string", policy(rule(ep(tags="application=payments"), ANY)), False),
    _case("two-values-of-one-type",
          policy(rule(ep(tags=["application=a", "Application=b"]), ANY)), False),
    _case("subnet-prefix-too-long", policy(rule(ep(subnet="10.0.0.0/33"), ANY)), False),
    _case("subnet-garbage", policy(rule(ep(subnet="ten.0.0.0/8"), ANY)), False),
    _case("subnet-host-bits", policy(rule(ep(subnet="10.0.0.1/8"), ANY)), False),
    _case("subnet-v6-host-bits", policy(rule(ep(subnet="fd00::1/64"), ANY)), False),
    _case("any-false", policy(rule(ep(any=False), ANY)), False),
    _case("unknown-rule-field", policy(rule(PAYMENTS, ANY, match_tag=["site"])), False),
    _case("unknown-endpoint-field", policy(rule(ep(any=True, negate=True), ANY)), False),
    _case("unknown-spec-field", policy(rule(PAYMENTS, ANY), spec={"selector": {}}), False),
    _case("wrong-kind", {**policy(rule(ANY, ANY)), "kind": "NetworkPolicy"}, False),
    _case("bad-name", policy(rule(ANY, ANY), name="Payments_1"), False),
    pytest.param(policy(rule(ep(subnet="10.0.0.0"), ANY)), False, id="subnet-bare-address"),
    pytest.param(policy(rule(ep(subnet="10.0.0.0/255.0.0.0"), ANY)), False,
                 id="subnet-netmask"),
]


@pytest.mark.parametrize(("doc", "accepted"), POLICY_TABLE)
def test_crd_schema_and_parser_agree(doc: dict[str, Any], accepted: bool) -> None:
    by_parser = parser_refusal(yaml.safe_dump(doc, sort_keys=False))
    by_crd = api_server_refusal(doc)
    assert (by_parser is None, by_crd is None) == (accepted, accepted), \
        f"parser: {by_parser or 'accepted'}; CRD: {by_crd or 'accepted'}"


def test_policy_table_is_large_enough_and_covers_every_example() -> None:
    assert len(POLICY_TABLE) >= 12
    examples = [p for p in POLICY_TABLE if str(p.id).startswith("examples/")]
    assert len(examples) >= 4


def test_every_cel_rule_of_the_crd_has_a_python_twin() -> None:
    def rules(node: Any) -> Iterator[str]:
        if isinstance(node, dict):
            for r in node.get("x-kubernetes-validations", []):
                yield _rule_text(r["rule"])
            for v in node.values():
                yield from rules(v)
        elif isinstance(node, list):
            for v in node:
                yield from rules(v)
    found = set(rules(OPENAPI))
    assert found == set(CEL_TWINS)


def test_crd_names_scope_and_defaults_match_the_model() -> None:
    names = CRD["spec"]["names"]
    assert f"{CRD['spec']['group']}/{CRD_VERSION['name']}" == API_VERSION
    assert names["kind"] == KIND and names["plural"] == "encryptionpolicies"
    assert CRD["spec"]["scope"] == "Cluster"
    mode = OPENAPI["properties"]["spec"]["properties"]["mode"]
    assert mode["enum"] == [m.value for m in Mode]
    assert mode["default"] == Mode.ENFORCE.value
    assert OPENAPI["properties"]["spec"]["properties"]["rules"]["minItems"] == 1


# -- ClusterSPIFFEIDs ----------------------------------------------------------------------

LABEL_SELECTOR = {
    "type": "object", "additionalProperties": False,
    "properties": {
        "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
        "matchExpressions": {"type": "array", "items": {
            "type": "object", "additionalProperties": False, "required": ["key", "operator"],
            "properties": {"key": {"type": "string"},
                           "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                           "values": {"type": "array", "items": {"type": "string"}}}}},
    },
}
# spire.spiffe.io/v1alpha1 ClusterSPIFFEID spec fields (spire-controller-manager docs).
CLUSTER_SPIFFE_ID = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "spire.spiffe.io/v1alpha1"},
        "kind": {"const": "ClusterSPIFFEID"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object", "required": ["spiffeIDTemplate"], "additionalProperties": False,
            "properties": {
                "spiffeIDTemplate": {"type": "string", "pattern": r"^spiffe://"},
                "className": {"type": "string"},
                "namespaceSelector": LABEL_SELECTOR,
                "podSelector": LABEL_SELECTOR,
                "workloadSelectorTemplates": {"type": "array", "items": {
                    "type": "string", "pattern": r"^[a-z0-9_]+:.+"}},
                "dnsNameTemplates": {"type": "array", "items": {"type": "string"}},
                "federatesWith": {"type": "array", "items": {"type": "string"}},
                "ttl": {"type": "string"}, "jwtTtl": {"type": "string"},
                "admin": {"type": "boolean"}, "downstream": {"type": "boolean"},
                "autoPopulateDNSNames": {"type": "boolean"},
                "fallback": {"type": "boolean"}, "hint": {"type": "string"},
            },
        },
    },
}
SPIFFE_IDS = [d for _, d in all_objects() if d["kind"] == "ClusterSPIFFEID"]


def render_template(template: str, values: dict[str, str]) -> str:
    rendered = re.sub(r"\{\{\s*(\.[A-Za-z.]+)\s*\}\}", lambda m: values[m.group(1)], template)
    assert "{{" not in rendered
    return rendered


@pytest.mark.parametrize("doc", SPIFFE_IDS, ids=[d["metadata"]["name"] for d in SPIFFE_IDS])
def test_cluster_spiffe_id_validates(doc: dict[str, Any]) -> None:
    jsonschema.Draft202012Validator(CLUSTER_SPIFFE_ID).validate(doc)


def test_node_identity_is_the_one_the_agent_demands() -> None:
    from tfcrypt.config import AgentConfig
    node = the("ClusterSPIFFEID", "tfcrypt-node")["spec"]
    rendered = render_template(node["spiffeIDTemplate"],
                               {".TrustDomain": "example.org", ".PodSpec.NodeName": "node-a"})
    cfg = AgentConfig(node_name="node-a", advertise_address="192.0.2.1")
    assert rendered == cfg.node_spiffe_id("example.org")
    controller = the("ClusterSPIFFEID", "tfcrypt-controller")["spec"]
    rendered = render_template(controller["spiffeIDTemplate"], {".TrustDomain": "example.org"})
    assert rendered in cfg.controller_spiffe_ids("example.org")


def test_spiffe_ids_select_exactly_the_tfcrypt_pods() -> None:
    ds = the("DaemonSet", "tfcrypt-agent")
    pod = ds["spec"]["template"]
    node = the("ClusterSPIFFEID", "tfcrypt-node")["spec"]
    assert node["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": ds["metadata"]["namespace"]}
    assert node["podSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert set(node["workloadSelectorTemplates"]) == {
        f"k8s:ns:{ds['metadata']['namespace']}",
        f"k8s:sa:{pod['spec']['serviceAccountName']}",
        f"k8s:container-name:{pod['spec']['containers'][0]['name']}"}
    controller = the("ClusterSPIFFEID", "tfcrypt-controller")["spec"]
    assert "k8s:sa:tfcrypt-controller" in controller["workloadSelectorTemplates"]
    assert the("ServiceAccount", "tfcrypt-controller")
    manager = yaml.safe_load((SPIRE_K8S / "controller-manager.yaml").read_text())
    assert {d["spec"]["className"] for d in SPIFFE_IDS} == {manager["className"]}
    assert ds["metadata"]["namespace"] not in manager["ignoreNamespaces"]


# -- DaemonSet, namespace, RBAC, ConfigMap ---------------------------------------------------

DS = the("DaemonSet", "tfcrypt-agent")
POD = DS["spec"]["template"]["spec"]
AGENT = POD["containers"][0]


def test_daemonset_runs_on_every_node_in_the_host_network() -> None:
    assert POD["hostNetwork"] is True
    assert POD["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert POD["priorityClassName"] == "system-node-critical"
    assert POD["tolerations"] == [{"operator": "Exists"}]
    assert DS["spec"]["updateStrategy"] == {"type": "RollingUpdate",
                                            "rollingUpdate": {"maxUnavailable": 1}}


def test_daemonset_container_has_two_capabilities_and_nothing_else() -> None:
    sc = AGENT["securityContext"]
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW"]}
    assert sc["privileged"] is False and sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert POD["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert POD.get("hostPID") is not True and POD.get("hostIPC") is not True


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def mounts_of(container: dict[str, Any]) -> dict[str, str]:
    return {m["name"]: m["mountPath"] for m in container["volumeMounts"]}


VOLUMES = {v["name"]: v for v in POD["volumes"]}


def test_node_name_address_and_spiffe_socket_come_from_the_node() -> None:
    env = env_of(AGENT)
    assert env["TFCRYPT_NODE_NAME"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    assert env["TFCRYPT_ADVERTISE_ADDRESS"] == {"fieldRef": {"fieldPath": "status.hostIP"}}
    assert env["TFCRYPT_SPIFFE_SOCKET"] == "/spiffe-workload-api/spire-agent.sock"
    assert VOLUMES["spiffe-workload-api"]["csi"] == {"driver": "csi.spiffe.io",
                                                      "readOnly": True}
    assert mounts_of(AGENT)["spiffe-workload-api"] == "/spiffe-workload-api"


def test_host_paths_for_tun_state_and_wireguard_sockets() -> None:
    mounts = mounts_of(AGENT)
    assert VOLUMES["dev-net-tun"]["hostPath"] == {"path": "/dev/net/tun", "type": "CharDevice"}
    assert mounts["dev-net-tun"] == "/dev/net/tun"
    for name, path in (("state", "/var/lib/tfcrypt"), ("run-wireguard", "/run/wireguard")):
        assert VOLUMES[name]["hostPath"] == {"path": path, "type": "DirectoryOrCreate"}
        assert mounts[name] == path
    host_paths = {v["hostPath"]["path"] for v in POD["volumes"] if "hostPath" in v}
    assert host_paths == {"/dev/net/tun", "/var/lib/tfcrypt", "/run/wireguard"}


def test_probes_call_tfcrypt_status_probe() -> None:
    assert AGENT["readinessProbe"]["exec"]["command"] == ["tfcrypt", "status", "--probe"]
    for name in ("startupProbe", "livenessProbe", "readinessProbe"):
        probe = AGENT[name]
        assert "tfcrypt status --probe" in " ".join(probe["exec"]["command"]), name
        assert probe["timeoutSeconds"] <= probe["periodSeconds"] * 3, name
    # Liveness tolerates "unhealthy" (exit 1) and fails only on "cannot reach" (exit 2).
    assert AGENT["livenessProbe"]["exec"]["command"][-1].endswith("test $? -ne 2")
    live = AGENT["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] >= 60


def test_configmap_and_downward_env_make_a_valid_agent_config(tmp_path: Path) -> None:
    config = pytest.importorskip("tfcrypt.config")
    if not hasattr(config, "agent_config"):
        pytest.skip("tfcrypt.config has no config-file loader yet")
    cm = the("ConfigMap", "tfcrypt-agent-config")
    args = AGENT["args"]
    config_path = Path(args[args.index("--config") + 1])
    assert config_path.parent == Path(mounts_of(AGENT)["config"])
    assert VOLUMES["config"]["configMap"]["name"] == cm["metadata"]["name"]
    file = tmp_path / config_path.name
    file.write_text(cm["data"][config_path.name])
    env = {"TFCRYPT_NODE_NAME": "node-a", "TFCRYPT_ADVERTISE_ADDRESS": "192.0.2.7",
           "TFCRYPT_SPIFFE_SOCKET": env_of(AGENT)["TFCRYPT_SPIFFE_SOCKET"]}
    cfg = config.agent_config({}, env, file)
    assert (cfg.node_name, cfg.advertise_address) == ("node-a", "192.0.2.7")
    mounts = mounts_of(AGENT)
    assert cfg.state_dir == mounts["state"]
    assert Path(cfg.status_socket).parent == Path(mounts["run-tfcrypt"])
    assert Path(cfg.spiffe_socket).parent == Path(mounts["spiffe-workload-api"])


def test_namespaced_objects_live_in_tfcrypt_system_not_kube_system() -> None:
    ns = the("Namespace")
    assert ns["metadata"]["name"] == "tfcrypt-system"
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"
    for where, doc in all_objects():
        if where.startswith("deploy/") and "namespace" in doc["metadata"]:
            assert doc["metadata"]["namespace"] == "tfcrypt-system", where


def test_agent_has_no_kubernetes_api_access() -> None:
    sa = the("ServiceAccount", "tfcrypt-agent")
    assert sa["automountServiceAccountToken"] is False
    assert POD["serviceAccountName"] == "tfcrypt-agent"
    assert POD["automountServiceAccountToken"] is False
    for _, doc in all_objects():
        if doc["kind"] in ("RoleBinding", "ClusterRoleBinding"):
            assert all(s["name"] != "tfcrypt-agent" for s in doc["subjects"])


def test_controller_reads_pods_namespaces_policies_and_writes_only_status_and_lease() -> None:
    group, plural = CRD["spec"]["group"], CRD["spec"]["names"]["plural"]
    role = the("ClusterRole", "tfcrypt-controller")
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["pods", "namespaces"],
         "verbs": ["get", "list", "watch"]},
        {"apiGroups": [group], "resources": [plural], "verbs": ["get", "list", "watch"]},
        {"apiGroups": [group], "resources": [f"{plural}/status"],
         "verbs": ["get", "update", "patch"]}]
    lease = the("Role", "tfcrypt-controller-lease")
    assert lease["metadata"]["namespace"] == "tfcrypt-system"
    assert lease["rules"] == [{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
                               "verbs": ["get", "create", "update"]}]
    subject = [{"kind": "ServiceAccount", "name": "tfcrypt-controller",
                "namespace": "tfcrypt-system"}]
    for kind, name in (("ClusterRoleBinding", "tfcrypt-controller"),
                       ("RoleBinding", "tfcrypt-controller-lease")):
        binding = the(kind, name)
        assert binding["subjects"] == subject
        assert binding["roleRef"]["name"] == name


# -- kustomization, Containerfile ----------------------------------------------------------

def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(p.name for p in manifest_files())


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
def test_kustomize_renders_every_object_with_the_image_set() -> None:
    out = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    rendered = [d for d in yaml.safe_load_all(out) if d]
    expected = [d for p in manifest_files() for d in load_docs(p)]
    assert sorted((d["kind"], d["metadata"]["name"]) for d in rendered) == \
        sorted((d["kind"], d["metadata"]["name"]) for d in expected)
    ds = next(d for d in rendered if d["kind"] == "DaemonSet")
    image = yaml.safe_load((K8S / "kustomization.yaml").read_text())["images"][0]
    assert ds["spec"]["template"]["spec"]["containers"][0]["image"] == \
        f"{image['newName']}:{image['newTag']}"


def test_containerfile_builds_on_debian_12_slim_with_the_dataplane_tools() -> None:
    text = (ROOT / "deploy" / "Containerfile").read_text()
    froms = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert froms and all(f.endswith("debian:12-slim") for f in froms)
    final = text.rsplit("\nFROM ", 1)[1]
    for package in ("wireguard-go", "wireguard-tools", "nftables", "iproute2", "python3"):
        assert re.search(rf"\b{re.escape(package)}\b", final), package
    assert "pip install" in text
    assert re.search(r'^ENTRYPOINT \["tfcrypt"\]', text, re.M)
    for copied in re.findall(r"^COPY (?!--from)(.+) /src", text, re.M):
        for path in copied.split():
            assert (ROOT / path).exists(), path


# -- systemd --------------------------------------------------------------------------------

def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string((SYSTEMD / "tfcrypt-agent.service").read_text())
    return parser


def test_systemd_unit_has_the_restart_capability_and_hardening_settings() -> None:
    service = unit()["Service"]
    assert service["Type"] == "simple" and service["Restart"] == "always"
    assert service["KillMode"] == "process"
    for key in ("CapabilityBoundingSet", "AmbientCapabilities"):
        assert set(service[key].split()) == {"CAP_NET_ADMIN", "CAP_NET_RAW"}, key
    assert service["StateDirectory"] == "tfcrypt"
    assert service["ProtectSystem"] == "strict"
    assert {"/run/wireguard", "/var/lib/tfcrypt"} <= set(service["ReadWritePaths"].split())
    assert service["NoNewPrivileges"] == "yes"
    assert service["DeviceAllow"] == "/dev/net/tun rw"
    assert service["ExecStart"].split()[1] == "agent"
    text = (SYSTEMD / "tfcrypt-agent.service").read_text()
    why = text.split("\nKillMode=process")[0].rsplit("\n\n", 1)[1]
    assert "wireguard-go" in why and "restart" in why


def test_environment_file_sets_only_known_variables() -> None:
    config = pytest.importorskip("tfcrypt.config")
    lines = [ln for ln in (SYSTEMD / "tfcrypt-agent.env").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    env = dict(ln.split("=", 1) for ln in lines)
    assert {"TFCRYPT_NODE_NAME", "TFCRYPT_ADVERTISE_ADDRESS", "TFCRYPT_ETCD",
            "TFCRYPT_SPIFFE_SOCKET"} <= env.keys()
    if hasattr(config, "unknown_env"):
        assert config.unknown_env(env) == []
    if hasattr(config, "agent_config"):
        cfg = config.agent_config({}, env, None)
        assert cfg.state_dir == "/var/lib/tfcrypt"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze not installed")
def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    """verify needs ExecStart to exist: point it at this venv's tfcrypt, nothing else."""
    tfcrypt = Path(sys.executable).parent / "tfcrypt"
    assert tfcrypt.exists()
    text = (SYSTEMD / "tfcrypt-agent.service").read_text()
    text = text.replace("ExecStart=/opt/tfcrypt/bin/tfcrypt", f"ExecStart={tfcrypt}")
    text = text.replace("EnvironmentFile=/etc/default/tfcrypt-agent",
                        f"EnvironmentFile={SYSTEMD / 'tfcrypt-agent.env'}")
    copy_ = tmp_path / "tfcrypt-agent.service"
    copy_.write_text(text)
    result = subprocess.run(["systemd-analyze", "verify", str(copy_)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr


# -- SPIRE configuration ----------------------------------------------------------------------

def hcl_value(text: str, key: str) -> str:
    match = re.search(rf'^\s*{key}\s*=\s*"([^"]*)"', text, re.M)
    assert match, key
    return match.group(1)


def test_spire_server_and_agent_agree_and_use_psat_k8s_and_unix() -> None:
    server = (SPIRE_K8S / "server.conf").read_text()
    agent = (SPIRE_K8S / "agent.conf").read_text()
    assert 'NodeAttestor "k8s_psat"' in server and 'NodeAttestor "k8s_psat"' in agent
    assert 'WorkloadAttestor "k8s"' in agent and 'WorkloadAttestor "unix"' in agent
    manager = yaml.safe_load((SPIRE_K8S / "controller-manager.yaml").read_text())
    values = yaml.safe_load((SPIRE_K8S / "helm-values.yaml").read_text())["global"]["spire"]
    domains = {hcl_value(server, "trust_domain"), hcl_value(agent, "trust_domain"),
               manager["trustDomain"], values["trustDomain"]}
    assert len(domains) == 1
    cluster = hcl_value(agent, "cluster")
    assert f'"{cluster}" = {{' in server
    assert cluster == manager["clusterName"] == values["clusterName"]


def test_spire_agent_socket_is_what_the_csi_driver_publishes_to_tfcrypt() -> None:
    agent = (SPIRE_K8S / "agent.conf").read_text()
    socket = Path(hcl_value(agent, "socket_path"))
    csi = next(d for d in load_docs(SPIRE_K8S / "spiffe-csi-driver.yaml")
               if d["kind"] == "DaemonSet")
    volumes = {v["name"]: v for v in csi["spec"]["template"]["spec"]["volumes"]}
    assert volumes["spire-agent-socket-dir"]["hostPath"]["path"] == str(socket.parent)
    assert Path(env_of(AGENT)["TFCRYPT_SPIFFE_SOCKET"]).name == socket.name
    assert the("CSIDriver")["metadata"]["name"] == VOLUMES["spiffe-workload-api"]["csi"]["driver"]
