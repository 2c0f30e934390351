"""`tfcrypt controller run` as a lab process: one way to start it, for the demo's
Kubernetes act, the controller tests and bench/controller.py.

It runs in the lab's controller namespace as the tfcrypt identity (identity_prefix),
against the lab's API server (the controller's kubeconfig) and tfcrypt's etcd. Several
replicas share that namespace, so each one that serves metrics needs its own port.
"""

from __future__ import annotations

import sys

from . import kube
from .lab import Lab
from .procs import ProcessRecord

WHAT = "tfcrypt-controller"


def log_name(identity: str) -> str:
    return f"{WHAT}-{identity}.log"


def start_controller(lab: Lab, identity: str, *, metrics_port: int | None = None,
                     watch_timeout: int | None = None) -> ProcessRecord:
    """Start one replica named `identity` (its Lease holder name and its log's name),
    leader election on (the default: one replica takes the Lease). `watch_timeout`:
    `--watch-timeout` (default the controller's own, 240 s): a fault test shortens it so
    watches end and resume from their last resourceVersion while it watches."""
    st = lab.status()
    argv = [sys.executable, "-m", "tfcrypt", "controller", "run",
            "--kubeconfig", str(kube.kubeconfig(lab.layout, "controller")),
            "--etcd", ",".join(st["etcd"]["endpoints"]),
            "--spiffe-socket", st["controller"]["spiffe_socket"],
            *(["--etcd-tls"] if st["etcd"].get("tls") else []),
            "--identity", identity, "--log-level", "info",
            *(["--metrics-port", str(metrics_port)] if metrics_port is not None else []),
            *(["--watch-timeout", str(watch_timeout)] if watch_timeout is not None else [])]
    return lab.start_process(WHAT, argv, target="controller",
                             extra_prefix=lab.identity_prefix(),
                             log_name=log_name(identity))


def controller_log(lab: Lab, identity: str) -> str:
    """The replica's log so far ("" before it wrote one)."""
    path = lab.layout.logs_dir / log_name(identity)
    return path.read_text() if path.exists() else ""


def stop_controllers(lab: Lab) -> None:
    """Stop every controller replica the lab started (by PID, from its state)."""
    for rec in lab.find_processes(WHAT):
        lab.stop_process(rec)
