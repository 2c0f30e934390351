"""Deployment files, validated offline: no cluster, no image build, no systemd as PID 1.

Rules:
- Every built-in Kubernetes object in deploy/kubernetes and spire/k8s validates against
  the Kubernetes OpenAPI schemas shipped by kubernetes-validate, in strict mode (an
  unknown field, a typo, fails).
- Custom kinds are validated against their own schema. EncryptionPolicy documents are
  checked by the real API server, not here: tests/test_kube_lab.py applies every case
  of tests/policy_cases.py with `kubectl apply --dry-run=server` and checks tfcrypt's
  parser agrees (the CRD's CEL rules had a Python twin here before). ClusterSPIFFEID: a
  schema of spire-controller-manager's fields written here, plus the rendered SPIFFE ID
  must be the one the agent demands.
- The DaemonSet, the controller Deployment (its args through the real argparse parser,
  its probes against the real HTTP server), RBAC, ConfigMap, kustomization,
  Containerfile and systemd unit are
  checked for the properties docs/deploy.md promises.
"""

from __future__ import annotations

import configparser
import copy
import re
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tfcrypt.model.policy import API_VERSION, KIND, Mode

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "kubernetes"
SPIRE_K8S = ROOT / "spire" / "k8s"
SYSTEMD = ROOT / "deploy" / "systemd"
# The CRD's CEL cidr library needs 1.31; validate against the oldest version we support.
K8S_VERSION = "1.31"
CUSTOM_KINDS = {"ClusterSPIFFEID"}


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


# -- the EncryptionPolicy CRD ----------------------------------------------------------------
# Its schema and CEL rules are proven by the real API server in tests/test_kube_lab.py
# (every case of tests/policy_cases.py, against tfcrypt's parser); here only what needs
# no server: the names and defaults the model relies on.

CRD = the("CustomResourceDefinition", "encryptionpolicies.tfcrypt.io")
CRD_VERSION = CRD["spec"]["versions"][0]
OPENAPI = CRD_VERSION["schema"]["openAPIV3Schema"]


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


# -- the controller Deployment ---------------------------------------------------------------

DEPLOYMENT = the("Deployment", "tfcrypt-controller")
CTL_POD = DEPLOYMENT["spec"]["template"]["spec"]
CTL = CTL_POD["containers"][0]


def controller_args() -> Any:
    """The container's command line through the real `tfcrypt` parser, with the
    kubelet's $(VAR) expansion of the env values it can know here."""
    from tfcrypt.cli import build_parser
    assert CTL["command"] == ["tfcrypt"]
    env = {"POD_NAME": "tfcrypt-controller-abc12"}
    argv = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in CTL["args"]]
    parser = build_parser()
    # argparse also takes unambiguous abbreviations: the manifest must spell each in full
    run = parser._subparsers._group_actions[0].choices["controller"]  # type: ignore[union-attr]
    run = run._subparsers._group_actions[0].choices["run"]
    known = {o for a in run._actions for o in a.option_strings}
    assert {a for a in argv if a.startswith("--")} <= known
    return parser.parse_args(argv)


def test_controller_args_are_flags_tfcrypt_controller_run_accepts() -> None:
    args = controller_args()
    assert (args.command, args.controller_command) == ("controller", "run")
    assert args.no_leader_election is False and DEPLOYMENT["spec"]["replicas"] == 2
    lease_role = the("Role", "tfcrypt-controller-lease")
    assert args.lease_namespace == lease_role["metadata"]["namespace"]
    assert args.identity == "tfcrypt-controller-abc12"
    assert args.kubeconfig is None  # in-cluster: the ServiceAccount token
    assert CTL_POD["serviceAccountName"] == "tfcrypt-controller"
    assert CTL_POD.get("automountServiceAccountToken", True) is True
    ports = {p["name"]: p["containerPort"] for p in CTL["ports"]}
    assert args.metrics_port == ports["http"]
    assert args.metrics_address == "0.0.0.0"  # the kubelet probes the pod's IP


def test_controller_probes_ask_paths_its_http_server_serves() -> None:
    from tfcrypt.controller.health import Health, serve
    ports = {p["name"]: p["containerPort"] for p in CTL["ports"]}
    probes = {n: CTL[n]["httpGet"] for n in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert probes["livenessProbe"]["path"] == "/healthz"
    assert probes["readinessProbe"]["path"] == "/readyz"
    health = Health()
    health.ready = lambda: True
    server = serve("127.0.0.1", 0, health)  # the same server, on a free port here
    try:
        for name, get in probes.items():
            assert ports[get["port"]] == controller_args().metrics_port, name
            url = f"http://127.0.0.1:{server.server_address[1]}{get['path']}"
            with urllib.request.urlopen(url, timeout=10) as resp:
                assert resp.status == 200, name
    finally:
        server.shutdown()
        server.server_close()
    live = CTL["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] >= 30


def test_controller_runs_without_any_privilege() -> None:
    pod_sc, sc = CTL_POD["securityContext"], CTL["securityContext"]
    assert pod_sc["runAsNonRoot"] is True and pod_sc["runAsUser"] != 0
    assert pod_sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert sc["runAsNonRoot"] is True and sc["privileged"] is False
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    for host in ("hostNetwork", "hostPID", "hostIPC"):
        assert not CTL_POD.get(host), host
    assert not [v for v in CTL_POD["volumes"] if "hostPath" in v]
    assert CTL["resources"]["requests"] and CTL["resources"]["limits"]["memory"]


def test_controller_replicas_spread_over_nodes_and_keep_one_in_a_drain() -> None:
    labels = DEPLOYMENT["spec"]["template"]["metadata"]["labels"]
    spread = CTL_POD["topologySpreadConstraints"]
    assert [c["topologyKey"] for c in spread] == ["kubernetes.io/hostname"]
    assert spread[0]["whenUnsatisfiable"] == "DoNotSchedule" and spread[0]["maxSkew"] == 1
    assert spread[0]["labelSelector"]["matchLabels"].items() <= labels.items()
    assert DEPLOYMENT["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    pdb = the("PodDisruptionBudget", "tfcrypt-controller")
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_controller_reads_the_agents_etcd_from_their_configmap(tmp_path: Path) -> None:
    from tfcrypt.config import agent_config
    from tfcrypt.controller.cli_run import etcd_settings
    args = controller_args()
    ctl_mounts = mounts_of(CTL)
    assert Path(args.config).parent == Path(ctl_mounts["config"])
    volumes = {v["name"]: v for v in CTL_POD["volumes"]}
    assert volumes["config"]["configMap"]["name"] == VOLUMES["config"]["configMap"]["name"]
    file = tmp_path / Path(args.config).name
    file.write_text(the("ConfigMap", "tfcrypt-agent-config")["data"][file.name])
    args.config = str(file)
    endpoints, tls, _ = etcd_settings(args, {})
    agent = agent_config({}, {"TFCRYPT_NODE_NAME": "node-a",
                              "TFCRYPT_ADVERTISE_ADDRESS": "192.0.2.7"}, file)
    assert (endpoints, tls, args.prefix, args.etcd_server_name) == (
        agent.etcd_endpoints, agent.etcd_tls, agent.prefix, agent.etcd_server_name)


def test_controller_gets_its_svid_the_way_the_agent_gets_its_own() -> None:
    socket = env_of(CTL)["TFCRYPT_SPIFFE_SOCKET"]
    assert socket == env_of(AGENT)["TFCRYPT_SPIFFE_SOCKET"]
    assert Path(socket).parent == Path(mounts_of(CTL)["spiffe-workload-api"])
    volumes = {v["name"]: v for v in CTL_POD["volumes"]}
    assert volumes["spiffe-workload-api"] == VOLUMES["spiffe-workload-api"]
    ident = the("ClusterSPIFFEID", "tfcrypt-controller")["spec"]
    labels = DEPLOYMENT["spec"]["template"]["metadata"]["labels"]
    assert ident["podSelector"]["matchLabels"].items() <= labels.items()
    assert ident["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": DEPLOYMENT["metadata"]["namespace"]}
    assert set(ident["workloadSelectorTemplates"]) == {
        f"k8s:ns:{DEPLOYMENT['metadata']['namespace']}",
        f"k8s:sa:{CTL_POD['serviceAccountName']}",
        f"k8s:container-name:{CTL['name']}"}
    node = the("ClusterSPIFFEID", "tfcrypt-node")["spec"]
    agent_labels = DS["spec"]["template"]["metadata"]["labels"]
    assert not node["podSelector"]["matchLabels"].items() <= labels.items()
    assert not ident["podSelector"]["matchLabels"].items() <= agent_labels.items()


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
    image = yaml.safe_load((K8S / "kustomization.yaml").read_text())["images"][0]
    for kind in ("DaemonSet", "Deployment"):
        workload = next(d for d in rendered if d["kind"] == kind)
        assert workload["spec"]["template"]["spec"]["containers"][0]["image"] == \
            f"{image['newName']}:{image['newTag']}", kind


def test_containerfile_builds_on_debian_12_slim_with_the_dataplane_tools() -> None:
    text = (ROOT / "deploy" / "Containerfile").read_text()
    froms = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert froms and froms[-1].endswith("debian:12-slim")
    assert all(f.endswith(("debian:12-slim", "-bookworm")) for f in froms), froms
    final = text.rsplit("\nFROM ", 1)[1]
    for package in ("wireguard-tools", "nftables", "iproute2", "python3"):
        assert re.search(rf"\b{re.escape(package)}\b", final), package
    # wireguard-go is the pinned current build, not Debian 12's 2022 package
    assert "apt-get install" in final and not re.search(r"\bwireguard-go\b(?!/)",
                                                        final.split("COPY", 1)[0])
    assert re.search(r"^COPY --from=(\S+) \S+ /usr/local/bin/wireguard-go$", final, re.M)
    stage = re.search(r"^FROM \S+ AS wireguard-go$(.*?)^FROM ", text, re.M | re.S)
    assert stage and "COPY tools/wireguard-go " in stage[1]
    assert "golang.zx2c4.com/wireguard" in stage[1]
    go_mod = (ROOT / "tools" / "wireguard-go" / "go.mod").read_text()
    assert re.search(r"^\s*golang\.zx2c4\.com/wireguard v\S+", go_mod, re.M)
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
