"""etcd members of the lab: Debian's etcd, one namespace per member, on the underlay.

Rules: a member listens only on its underlay IP (client 2379, peer 2380); its data dir
lives in the run dir, so a stop/start keeps its data and cluster membership (on restart
etcd ignores the --initial-* flags). With the lab's `etcd_tls`, members serve mutual TLS
to clients and peers (netns_lab/etcd_tls.py). Health is asked from the controller namespace, never
from the root namespace, which must not talk to lab addresses.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Sequence

from . import etcd_tls
from .errors import LabError
from .layout import Layout, Member

HEALTH_TIMEOUT = 30.0


def member_argv(layout: Layout, member: Member) -> list[str]:
    cluster = ",".join(f"{m.name}={m.peer_url}" for m in layout.all_members())
    return [
        "etcd",
        "--name", member.name,
        "--data-dir", str(member.data_dir),
        "--listen-client-urls", member.client_url,
        "--advertise-client-urls", member.client_url,
        "--listen-peer-urls", member.peer_url,
        "--initial-advertise-peer-urls", member.peer_url,
        "--initial-cluster", cluster,
        "--initial-cluster-state", "new",
        "--initial-cluster-token", f"netns-lab-{layout.name}",
        "--logger", "zap",
        "--log-outputs", "stderr",
        *(etcd_tls.member_flags(layout, member) if layout.etcd_tls else []),
    ]


def healthy(layout: Layout, members: Sequence[Member]) -> bool:
    argv = ["ip", "netns", "exec", layout.controller_netns, "etcdctl",
            "--endpoints", ",".join(m.client_url for m in members),
            *etcd_tls.etcdctl_flags(layout),
            "--dial-timeout", "1s", "--command-timeout", "2s", "endpoint", "health"]
    res = subprocess.run(argv, capture_output=True, text=True, check=False,
                         env={**os.environ, "ETCDCTL_API": "3"})
    return res.returncode == 0


def wait_healthy(layout: Layout, members: Sequence[Member],
                 exited: Callable[[], str | None] = lambda: None,
                 timeout: float = HEALTH_TIMEOUT) -> None:
    """Wait until every member answers; `exited()` names a started member that died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if healthy(layout, members):
            return
        dead = exited()
        if dead is not None:
            raise LabError(f"etcd member {dead} exited while starting: see "
                           f"{layout.logs_dir}/etcd-{dead}.log")
        time.sleep(0.3)
    names = ", ".join(m.name for m in members)
    raise LabError(f"etcd member(s) {names} not healthy after {timeout:.0f} s: "
                   f"see {layout.logs_dir}/etcd-<member>.log")

