"""A real Kubernetes control plane in the lab (`up --kubernetes`): its own etcd and
kube-apiserver v1.36.3, built from tools/kubernetes by scripts/build-go.sh.

Rules:
- Both run in the controller's namespace. The API server's etcd is Debian's etcd, apart
  from tfcrypt's (its own data dir, `<run_dir>/kube/etcd`), listening on that
  namespace's loopback only (127.0.0.1:2479): nothing but the API server talks to it.
- kube-apiserver listens on the controller's underlay address, port 6443 (only lab
  namespaces reach it, like a control-plane node's address), serves a certificate of
  the lab's Kubernetes CA (netns_lab/kube_pki.py), authenticates client certificates
  only (no anonymous requests) and authorizes with RBAC alone (`--authorization-mode
  RBAC`: there is no kubelet, so no Node authorizer).
- There is no controller-manager, scheduler or kubelet. The ServiceAccount admission
  plugin is off: it refuses every pod of a namespace without a `default` ServiceAccount,
  which only the controller-manager creates, and it would mount a token no kubelet
  ever delivers. The lab plays the kubelet's part itself (netns_lab/kubelet.py).
- `up` applies, from deploy/kubernetes, every object of the kinds in APPLIED_KINDS (the
  Namespace, CRDs, ServiceAccounts and RBAC; never the workloads: a DaemonSet or
  Deployment would never get pods here), with server-side apply, waits until each CRD
  is Established, then registers the lab's nodes and pods.
- Every kubectl of the lab runs in the controller namespace with a kubeconfig of the run
  dir and a discovery cache there (`--cache-dir`), never root's ~/.kube.
- Processes go through Lab.start_process (ledger + state): `down` stops them by PID.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from . import gobin, kube_pki, procs
from .errors import LabError
from .layout import Layout

if TYPE_CHECKING:
    from .lab import Lab

MODULE = "kubernetes"
APISERVER = "kube-apiserver"
KUBECTL = "kubectl"
ETCD = "kube-etcd"
VERSION = "v1.36.3"
APISERVER_PORT = 6443
ETCD_CLIENT = "127.0.0.1:2479"
ETCD_PEER = "127.0.0.1:2480"
SERVICE_CIDR = "10.96.0.0/16"
SERVICE_CIDR6 = "fd00:96::/112"  # an IPv6-only underlay: the Service range's family
SERVICE_IP6 = "fd00:96::1"
SA_ISSUER = "https://kubernetes.default.svc.cluster.local"
CLUSTER = "netns-lab"
FIELD_MANAGER = "netns-lab"
DEPLOY_DIR = Path(__file__).resolve().parent.parent / "deploy" / "kubernetes"
APPLIED_KINDS = ("Namespace", "CustomResourceDefinition", "ServiceAccount", "ClusterRole",
                 "ClusterRoleBinding", "Role", "RoleBinding")
READY_TIMEOUT = 180.0  # a cold API server on a loaded 2-core machine is slow to start


def binary(program: str) -> Path:
    return gobin.go_binary(MODULE, program)


def kube_dir(layout: Layout) -> Path:
    return layout.run_dir / "kube"


def paths(layout: Layout) -> kube_pki.Paths:
    return kube_pki.Paths(kube_dir(layout))


def server_address(layout: Layout) -> str:
    host = layout.controller_ip
    return f"[{host}]:{APISERVER_PORT}" if ":" in host else f"{host}:{APISERVER_PORT}"


def server_url(layout: Layout) -> str:
    return f"https://{server_address(layout)}"


def kubeconfig(layout: Layout, who: str = "admin") -> Path:
    """The kubeconfig of credential `who` ("admin" or "controller")."""
    kube_pki.credential(who)  # KeyError for an unknown one
    return paths(layout).kubeconfig(who)


def kubectl_argv(lab: Lab, who: str = "admin") -> list[str]:
    """argv prefix: the lab's kubectl as `who`, inside the controller namespace."""
    lay = lab.layout
    return [*lab.exec_prefix("controller"), str(binary(KUBECTL)),
            "--kubeconfig", str(kubeconfig(lay, who)),
            "--cache-dir", str(kube_dir(lay) / "cache" / who)]


def kubectl(lab: Lab, *args: str, who: str = "admin", input: str | None = None,
            check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run the lab's kubectl; with `check`, a failure is a LabError with kubectl's message."""
    res = subprocess.run([*kubectl_argv(lab, who), *args], input=input, capture_output=True,
                         text=True, timeout=timeout, check=False)
    if check and res.returncode != 0:
        msg = (res.stderr.strip() or res.stdout.strip()).replace("\n", "; ")
        raise LabError(f"kubectl {' '.join(args[:2])} failed: {msg}")
    return res


# ---------------------------------------------------------------- processes

def etcd_argv(layout: Layout) -> list[str]:
    return [shutil.which("etcd") or "etcd", "--name", "kube",
            "--data-dir", str(kube_dir(layout) / "etcd"),
            "--listen-client-urls", f"http://{ETCD_CLIENT}",
            "--advertise-client-urls", f"http://{ETCD_CLIENT}",
            "--listen-peer-urls", f"http://{ETCD_PEER}",
            "--initial-advertise-peer-urls", f"http://{ETCD_PEER}",
            "--initial-cluster", f"kube=http://{ETCD_PEER}",
            "--initial-cluster-state", "new",
            "--initial-cluster-token", f"netns-lab-{layout.name}-kube",
            "--logger", "zap", "--log-outputs", "stderr"]


def apiserver_argv(layout: Layout) -> list[str]:
    p = paths(layout)
    v6 = ":" in layout.controller_ip
    return [str(binary(APISERVER)),
            f"--etcd-servers=http://{ETCD_CLIENT}",
            f"--bind-address={layout.controller_ip}",
            f"--advertise-address={layout.controller_ip}",
            f"--secure-port={APISERVER_PORT}",
            f"--tls-cert-file={p.serving_cert}", f"--tls-private-key-file={p.serving_key}",
            f"--client-ca-file={p.ca_cert}",
            "--anonymous-auth=false",
            "--authorization-mode=RBAC",
            "--disable-admission-plugins=ServiceAccount",
            f"--service-account-key-file={p.sa_pub}",
            f"--service-account-signing-key-file={p.sa_key}",
            f"--service-account-issuer={SA_ISSUER}",
            f"--service-cluster-ip-range={SERVICE_CIDR6 if v6 else SERVICE_CIDR}",
            "--profiling=false"]


def _running(lab: Lab, what: str) -> procs.ProcessRecord | None:
    return next((p for p in reversed(lab.find_processes(what)) if procs.is_running(p)), None)


def _wait(what: str, probe: Callable[[], bool], rec: procs.ProcessRecord,
          timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if probe():
            return
        if not procs.is_running(rec):
            raise LabError(f"{what} exited while starting: see {rec.log}")
        time.sleep(0.5)
    raise LabError(f"{what} not ready after {timeout:.0f} s: see {rec.log}")


def etcd_healthy(lab: Lab) -> bool:
    res = subprocess.run([*lab.exec_prefix("controller"), "etcdctl", "--endpoints",
                          ETCD_CLIENT, "--dial-timeout", "1s", "--command-timeout", "2s",
                          "endpoint", "health"], capture_output=True, text=True, check=False,
                         env={"ETCDCTL_API": "3", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
    return res.returncode == 0


def etcd_start(lab: Lab) -> procs.ProcessRecord:
    if (rec := _running(lab, ETCD)) is not None:
        return rec
    for stale in lab.find_processes(ETCD):
        lab.stop_process(stale)
    rec = lab.start_process(ETCD, etcd_argv(lab.layout), target="controller",
                            log_name="kube-etcd.log")
    _wait("the API server's etcd", lambda: etcd_healthy(lab), rec, 30.0)
    return rec


def apiserver_ready(lab: Lab) -> bool:
    res = kubectl(lab, "get", "--raw=/readyz", check=False, timeout=30)
    return res.returncode == 0 and res.stdout.strip() == "ok"


def apiserver_start(lab: Lab, *, wait: bool = True) -> procs.ProcessRecord:
    """Start kube-apiserver (and its etcd) if not running; wait for /readyz."""
    etcd_start(lab)
    if (rec := _running(lab, APISERVER)) is not None:
        return rec
    for stale in lab.find_processes(APISERVER):
        lab.stop_process(stale)
    rec = lab.start_process(APISERVER, apiserver_argv(lab.layout), target="controller",
                            log_name="kube-apiserver.log")
    if wait:
        _wait("kube-apiserver", lambda: apiserver_ready(lab), rec, READY_TIMEOUT)
    return rec


def apiserver_stop(lab: Lab, *, kill: bool = False) -> None:
    for rec in lab.find_processes(APISERVER):
        lab.stop_process(rec, sig=signal.SIGKILL if kill else signal.SIGTERM, timeout=30.0)


# ---------------------------------------------------------------- bring-up

def deploy_objects(deploy_dir: Path = DEPLOY_DIR) -> list[dict[str, Any]]:
    """The objects of deploy/kubernetes the lab applies, in APPLIED_KINDS order."""
    docs = [d for f in sorted(deploy_dir.glob("*.yaml")) if f.name != "kustomization.yaml"
            for d in yaml.safe_load_all(f.read_text()) if isinstance(d, dict)]
    return sorted((d for d in docs if d.get("kind") in APPLIED_KINDS),
                  key=lambda d: APPLIED_KINDS.index(d["kind"]))


def apply_deploy(lab: Lab) -> list[str]:
    """Server-side apply of deploy_objects(); waits for the CRDs. Returns `kind/name`s."""
    objs = deploy_objects()
    kubectl(lab, "apply", "--server-side", f"--field-manager={FIELD_MANAGER}", "-f", "-",
            input=yaml.safe_dump_all(objs, sort_keys=False))
    crds = [f"crd/{d['metadata']['name']}" for d in objs
            if d["kind"] == "CustomResourceDefinition"]
    if crds:
        kubectl(lab, "wait", "--for=condition=Established", "--timeout=60s", *crds,
                timeout=90)
    return [f"{d['kind']}/{d['metadata']['name']}" for d in objs]


def start(lab: Lab) -> None:
    """`up --kubernetes`: PKI and kubeconfigs, etcd, kube-apiserver, deploy/, the lab's
    nodes and pods (netns_lab/kubelet.py)."""
    from . import kubelet

    lay = lab.layout
    p = paths(lay)
    if not p.ca_cert.exists():
        ips = [lay.controller_ip, *([lay.controller_ip6] if lay.controller_ip6 else [])]
        kube_pki.write_pki(p, sorted(set(ips)))
        for c in kube_pki.CREDENTIALS:
            kube_pki.write_kubeconfig(p, c.name, server_url(lay), CLUSTER)
    apiserver_start(lab)
    apply_deploy(lab)
    kubelet.register(lab)


def check_built() -> None:
    """A clear error before anything is created if tools/kubernetes is not built."""
    binary(APISERVER), binary(KUBECTL)


# ---------------------------------------------------------------- status

def status(lab: Lab) -> dict[str, Any] | None:
    """The `kubernetes` member of `status --json` (docs/lab.md); None without it."""
    lay = lab.layout
    if not lay.kubernetes:
        return None
    api, etcd = _running(lab, APISERVER), _running(lab, ETCD)
    p = paths(lay)
    from . import kubelet

    return {
        "version": VERSION,
        "apiserver": {"pid": api.pid if api else None, "running": api is not None,
                      "address": server_address(lay), "url": server_url(lay),
                      "log": str(lay.logs_dir / "kube-apiserver.log"),
                      "exec": lab.exec_prefix("controller")},
        "etcd": {"pid": etcd.pid if etcd else None, "running": etcd is not None,
                 "endpoint": f"http://{ETCD_CLIENT}", "data_dir": str(kube_dir(lay) / "etcd"),
                 "log": str(lay.logs_dir / "kube-etcd.log")},
        "ca": str(p.ca_cert),
        "kubeconfigs": {c.name: str(p.kubeconfig(c.name)) for c in kube_pki.CREDENTIALS},
        "users": {c.name: {"user": c.user, "groups": list(c.groups)}
                  for c in kube_pki.CREDENTIALS},
        "kubectl": {c.name: kubectl_argv(lab, c.name) for c in kube_pki.CREDENTIALS},
        "pod_namespace": kubelet.POD_NAMESPACE,
    }
