"""Publishing the lab's workloads and policies through the real controller CLI.

The lab knows where its workloads run and what addresses they have; their tags are the
caller's choice. Everything goes through `tfcrypt workload set` / `tfcrypt policy apply`
run in the controller namespace with the controller's Workload API socket, exactly as an
operator would.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

from .errors import LabError
from .lab import Lab


def controller_argv(lab: Lab, *args: str) -> list[str]:
    """`tfcrypt ARGS` in the controller namespace with the lab's etcd and controller SVID."""
    st = lab.status()
    return [*lab.exec_prefix("controller"), *lab.identity_prefix(), sys.executable, "-m",
            "tfcrypt", *args,
            "--etcd", ",".join(st["etcd"]["endpoints"]),
            "--spiffe-socket", st["controller"]["spiffe_socket"],
            *(["--etcd-tls"] if st["etcd"].get("tls") else [])]


def tfcrypt(lab: Lab, *args: str, timeout: float = 60) -> str:
    out = subprocess.run(controller_argv(lab, *args), capture_output=True, text=True,
                         timeout=timeout)
    if out.returncode != 0:
        raise LabError(f"tfcrypt {' '.join(args[:2])} failed: "
                       f"{(out.stderr or out.stdout).strip()}")
    return out.stdout


def set_workload(lab: Lab, name: str, tags: Iterable[str], node: str | None = None,
                 ips: Iterable[str] | None = None) -> str:
    """Publish one lab workload with `tags` (its node and every address it has, IPv4 and
    IPv6 in a dual-stack lab, from the layout by default)."""
    wl = next((w for w in lab.status()["workloads"] if w["name"] == name), None)
    if wl is None and (node is None or ips is None):
        raise LabError(f"unknown workload {name!r}: give its node and ips")
    args = ["workload", "set", name, "--node", node or wl["node"]]  # type: ignore[index]
    for ip in ips or wl.get("ips") or [wl["ip"]]:  # type: ignore[index,union-attr]
        args += ["--ip", ip]
    for tag in tags:
        args += ["--tag", tag]
    return tfcrypt(lab, *args)


def publish_workloads(lab: Lab, tags_of: Mapping[str, Iterable[str]] | None = None) -> None:
    """Publish every lab workload, with the tags `tags_of[name]` (none if absent)."""
    for wl in lab.status()["workloads"]:
        set_workload(lab, wl["name"], (tags_of or {}).get(wl["name"], ()))


def apply_policy(lab: Lab, path: Path | str) -> str:
    return tfcrypt(lab, "policy", "apply", "-f", str(path))


def delete_policy(lab: Lab, name: str) -> str:
    return tfcrypt(lab, "policy", "delete", name)
