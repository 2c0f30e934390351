"""tfcrypt agents in lab nodes: how one is started, stopped and found.

Rules:
- An agent runs inside its node's network and mount namespaces (so its wireguard-go
  socket is the node's own /run/wireguard/tfcrypt0.sock) with the lab's etcd, the node's
  Workload API socket, a state directory and a status socket under the node's run dir,
  given by their host paths; inside the node the same files are at tfcrypt's default
  paths (netns_lab/mountns.py), so `tfcrypt status` there needs no flags.
- The WireGuard backend is the agent's default (userspace: wireguard-go) unless
  NETNS_LAB_BACKEND says `kernel`: the kernel tier runs the same lab tests inside a
  guest kernel that has the module (netns_lab/guest.py, scripts/test.sh --kernel).
- The userspace backend runs the current wireguard-go built from tools/wireguard-go
  (`wireguard_go()`), not Debian's 2022 build (docs/wireguard.md "Which wireguard-go");
  NETNS_LAB_WIREGUARD_GO names another (`wireguard-go`: Debian's, on PATH).
- The agent leaves wireguard-go running when it exits, as it must in production; the
  lab's `down` stops whatever still runs inside lab namespaces.
- Lab agents publish their flow report every 5 s (the default is 30 s): the demo waits
  for every node's report of its traffic, seconds rather than half a minute.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from . import gobin
from .errors import LabError
from .lab import Lab
from .layout import Node
from .procs import ProcessRecord, is_running

AGENT = "agent"
ACTIONS = ("start", "stop", "kill", "restart")
METRICS_ADDRESS = "127.0.0.1:9477"  # the node's own loopback: each node is a namespace
BACKENDS = ("userspace", "kernel")


def backend() -> str:
    """The WireGuard backend lab agents use: NETNS_LAB_BACKEND, default userspace."""
    value = os.environ.get("NETNS_LAB_BACKEND") or "userspace"
    if value not in BACKENDS:
        raise LabError(f"NETNS_LAB_BACKEND={value!r}: use one of {', '.join(BACKENDS)}")
    return value


def wireguard_go() -> str:
    """The wireguard-go program lab agents, hand-made lab devices and the benches start:
    NETNS_LAB_WIREGUARD_GO, default the build of tools/wireguard-go (a clear error naming
    the build command when it is missing)."""
    return os.environ.get("NETNS_LAB_WIREGUARD_GO") or str(
        gobin.go_binary("wireguard-go", "wireguard-go"))


def _node(lab: Lab, name: str) -> Node:
    for node in lab.layout.all_nodes():
        if node.name == name:
            return node
    raise LabError(f"unknown node {name!r} in lab {lab.name}: use n1..n{lab.layout.nodes}")


def state_dir(lab: Lab, node: str) -> Path:
    """The agent's state dir as the host sees it; /var/lib/tfcrypt inside the node."""
    return _node(lab, node).state_dir


def status_socket(lab: Lab, node: str) -> Path:
    """The agent's status API socket as the host sees it; inside the node it is tfcrypt's
    default, /run/tfcrypt/agent.sock (netns_lab/mountns.py)."""
    return _node(lab, node).status_socket


def agent_argv(lab: Lab, node: Node) -> list[str]:
    return [
        sys.executable, "-m", "tfcrypt", "agent",
        "--node", node.name,
        "--etcd", ",".join(lab.layout.etcd_endpoints()),
        "--spiffe-socket", str(node.spiffe_socket),
        "--state-dir", str(state_dir(lab, node.name)),
        "--advertise-address", node.underlay_ip,
        "--resync-interval", "5",
        "--flows-publish-interval", "5",  # the demo waits for reports: 5 s, not 30 s
        "--status-socket", str(status_socket(lab, node.name)),
        "--metrics-address", METRICS_ADDRESS,
        "--backend", backend(),
        *(["--wireguard-go", wireguard_go()] if backend() == "userspace" else []),
        *(["--etcd-tls"] if lab.layout.etcd_tls else []),
    ]


def running_agent(lab: Lab, node: str) -> ProcessRecord | None:
    for rec in reversed(lab.find_processes(AGENT, node)):
        if is_running(rec):
            return rec
    return None


def start_agent(lab: Lab, node: str) -> ProcessRecord:
    if (rec := running_agent(lab, node)) is not None:
        return rec
    spec = _node(lab, node)
    state_dir(lab, node).mkdir(parents=True, exist_ok=True, mode=0o700)
    return lab.start_process(AGENT, agent_argv(lab, spec), node=node,
                             extra_prefix=lab.identity_prefix())


def start_agent_argv(lab: Lab, node: str, argv: list[str], *,
                     log_name: str | None = None) -> ProcessRecord:
    """An agent started with a test's own argv (agent_argv edited), as the node's tfcrypt
    identity like start_agent: with SPIRE an agent run as root gets no SVID at all."""
    _node(lab, node)
    return lab.start_process(AGENT, argv, node=node, log_name=log_name,
                             extra_prefix=lab.identity_prefix())


def stop_agent(lab: Lab, node: str, *, kill: bool = False) -> bool:
    """SIGTERM (and wait) or SIGKILL the node's agent; True if one was running."""
    _node(lab, node)
    stopped = False
    for rec in lab.find_processes(AGENT, node):
        stopped |= lab.stop_process(rec, sig=signal.SIGKILL if kill else signal.SIGTERM)
    return stopped


def control(lab: Lab, node: str, action: str) -> str:
    if action not in ACTIONS:
        raise LabError(f"agent action {action!r}: use one of {', '.join(ACTIONS)}")
    if action in ("stop", "kill", "restart"):
        was = stop_agent(lab, node, kill=action == "kill")
        if action != "restart":
            return f"agent {node}: {'stopped' if was else 'was not running'}"
    rec = start_agent(lab, node)
    return f"agent {node} running, pid {rec.pid}, log {rec.log}"


def start_all(lab: Lab) -> list[ProcessRecord]:
    return [start_agent(lab, n.name) for n in lab.layout.all_nodes()]
