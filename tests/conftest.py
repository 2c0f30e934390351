"""Shared fixtures: labs with random names that are always taken down.

Rules: every lab a test brings up gets a fresh random name ("t" + 6 hex) and is removed
by `netns_lab.down` in a finally, also when the test fails. Lab tests are skipped when
not running as root.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from netns_lab import Lab, Layout, down

# The suite's identity provider: real SPIRE. The kernel tier sets "lab" (scripts/test.sh):
# under TCG, SPIRE's processes slowed its nine tests from ~7.5 to 16.7 minutes, and what
# the tier proves is the kernel WireGuard backend, which the SVID's issuer does not touch.
DEFAULT_WORKLOAD_API = os.environ.get("NETNS_LAB_WORKLOAD_API") or "spire"


def new_lab_name() -> str:
    return "t" + secrets.token_hex(3)


@contextlib.contextmanager
def running_lab(nodes: int = 2, workloads_per_node: int = 1, etcd_members: int = 1,
                svid_ttl: int = 600, ipv6: bool = False, underlay: str = "v4",
                workload_api: str | None = None, etcd_tls: bool = False,
                kubernetes: bool = False) -> Iterator[Lab]:
    """A lab that exists for the `with` block only (`ipv6`, `underlay`, `etcd_tls`,
    `kubernetes`: netns_lab.layout; `workload_api`: "spire", real SPIRE, or "lab", the
    lab's own server, only for a test that needs it to misbehave, and that says why;
    default: $NETNS_LAB_WORKLOAD_API, else "spire")."""
    if workload_api is None:
        workload_api = DEFAULT_WORKLOAD_API
    lab = Lab(Layout(new_lab_name(), nodes, workloads_per_node, etcd_members, ipv6=ipv6,
                     underlay=underlay, etcd_tls=etcd_tls, kubernetes=kubernetes),
              svid_ttl, workload_api)
    try:
        lab.up()
        yield lab
    finally:
        down(lab.name)


@pytest.fixture
def lab_factory() -> Iterator[Callable[..., Lab]]:
    """`lab_factory(nodes=2, workloads_per_node=1, etcd_members=1, svid_ttl=600,
    workload_api="spire")` -> Lab."""
    with contextlib.ExitStack() as stack:
        yield lambda **kw: stack.enter_context(running_lab(**kw))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="lab tests need root")
    for item in items:
        if "lab" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A fresh temp dir with a short path: Unix socket addresses are limited to 107 bytes."""
    d = Path(tempfile.mkdtemp(prefix="tfc-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)
