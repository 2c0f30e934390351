"""Check that every outside tool the lab runs is installed, before anything is created.

Rules: tools are found on PATH (so a test can hide one by narrowing PATH); the first
missing tool is reported in one line with the Debian package that provides it.
"""

from __future__ import annotations

import shutil

from .errors import LabError

REQUIRED_TOOLS: dict[str, str] = {
    "etcd": "etcd-server",
    "etcdctl": "etcd-client",
    "wireguard-go": "wireguard-go",
    "wg": "wireguard-tools",
    "nft": "nftables",
    "ip": "iproute2",
    "nsenter": "util-linux",
    "unshare": "util-linux",
    "mount": "mount",
    "umount": "mount",
    "sysctl": "procps",
    "tcpdump": "tcpdump",
    "ping": "iputils-ping",
}


def check_tools() -> None:
    for tool, package in REQUIRED_TOOLS.items():
        if shutil.which(tool) is None:
            raise LabError(f"{tool} not found: apt-get install {package}")
