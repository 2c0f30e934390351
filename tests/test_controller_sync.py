# ruff: noqa: F811  (the wlapi fixture is test_cli_writer's, imported; tests name it)
"""The controller's reconcile pass against a real etcd and the lab Workload API server
(real signing and the agents' verification). The cluster side here is a stand-in: plain
dicts of object JSON in place of the watch caches, so that ownership, the restart
guarantee and conflicts are checked in seconds; tests/test_controller_lab.py runs the same
controller against a real kube-apiserver."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import etcd_fixture
from etcd_fixture import EtcdServer
from test_cli_writer import CONTROLLER, PREFIX, tfcrypt, wlapi  # noqa: F401 (fixture)
from test_controller_mapping import POLICY, pod
from wlapi_server import Server

from tfcrypt.controller.run import Controller
from tfcrypt.controller.session import session
from tfcrypt.registry import Registry

etcd = etcd_fixture.etcd


class Kind:
    def __init__(self, objects: dict[str, dict[str, Any]]) -> None:
        self.objects = objects


class DictCluster:
    """The watch caches' interface, filled by the test instead of an API server."""

    synced = True

    def __init__(self) -> None:
        self.pods, self.namespaces, self.policies = Kind({}), Kind({}), Kind({})
        self.statuses: list[tuple[str, dict[str, Any]]] = []

    async def patch_status(self, name: str, old: Any, status: dict[str, Any]) -> None:
        self.statuses.append((name, status))


def revisions(etcd: EtcdServer) -> dict[str, int]:
    async def read() -> dict[str, int]:
        async with Registry([etcd.endpoint.removeprefix("http://")], prefix=PREFIX) as reg:
            return {k: i.mod_revision for k, i in (await reg.get_all("")).items.items()}
    return asyncio.run(read())


def reconcile(etcd: EtcdServer, wlapi: Server, cluster: DictCluster) -> None:
    async def once() -> None:
        async with session((etcd.endpoint.removeprefix("http://"),), PREFIX,
                           str(wlapi.sock("ctl")), ("spiffe://{trust_domain}/tfcrypt/controller",)
                           ) as s:
            await Controller(s, cluster, str(wlapi.sock("ctl"))).reconcile()  # type: ignore[arg-type]
    asyncio.run(once())


def test_the_pass_publishes_restarts_without_writes_and_deletes_only_its_own(
        etcd: EtcdServer, wlapi: Server) -> None:
    # a record the CLI wrote with the same controller identity: never the controller's
    assert tfcrypt(etcd, wlapi, "workload", "set", "n1-w1", "--node", "n1",
                   "--ip", "10.200.1.20").returncode == 0
    cluster = DictCluster()
    cluster.pods.objects = {"shop/a": pod("a", ips=("10.200.1.11",),
                                          labels={"application": "payments"}),
                            "shop/b": pod("b", node="n2", ips=("10.200.2.11",),
                                          labels={"application": "db"}),
                            "shop/h": pod("h", spec__hostNetwork=True)}
    cluster.namespaces.objects = {"shop": {"metadata": {"name": "shop",
                                                        "labels": {"site": "paris"}}}}
    cluster.policies.objects = {"pay": POLICY}
    reconcile(etcd, wlapi, cluster)
    first = revisions(etcd)
    assert set(first) == {"workloads/n1/n1-w1", "workloads/n1/shop.a", "workloads/n2/shop.b",
                          "policies/pay"}
    listed = tfcrypt(etcd, wlapi, "workload", "list", "--json")
    rows = {r["key"]: r for r in json.loads(listed.stdout)}
    assert rows["workloads/n1/shop.a"]["tags"] == ["application=payments", "namespace=shop",
                                                   "site=paris"]
    assert rows["workloads/n1/shop.a"]["state"] == "ok"
    (name, status), = cluster.statuses
    assert name == "pay" and status["pairs"] == 1
    assert status["conditions"][0]["status"] == "True"

    # a restarted controller (a new session, the same objects) rewrites nothing
    cluster.policies.objects["pay"] = {**POLICY, "status": status}
    cluster.statuses.clear()
    reconcile(etcd, wlapi, cluster)
    assert revisions(etcd) == first and cluster.statuses == []

    # the pod goes, a label moves: one delete, one update; the CLI's record stays
    del cluster.pods.objects["shop/b"]
    cluster.pods.objects["shop/a"]["metadata"]["labels"]["application"] = "db"
    reconcile(etcd, wlapi, cluster)
    after = revisions(etcd)
    assert set(after) == {"workloads/n1/n1-w1", "workloads/n1/shop.a", "policies/pay"}
    assert after["workloads/n1/n1-w1"] == first["workloads/n1/n1-w1"]
    assert after["workloads/n1/shop.a"] > first["workloads/n1/shop.a"]
    assert after["policies/pay"] == first["policies/pay"]


def test_a_policy_held_by_the_cli_is_a_conflict_not_overwritten(
        etcd: EtcdServer, wlapi: Server, workdir: Path) -> None:
    doc = workdir / "pay.yaml"
    doc.write_text(json.dumps({**POLICY, "metadata": {"name": "pay"}, "status": None}
                              | {"spec": {"rules": [{"endpoint1": {"any": True},
                                                     "endpoint2": {"any": True}}]}}))
    assert tfcrypt(etcd, wlapi, "policy", "apply", "-f", str(doc)).returncode == 0
    before = revisions(etcd)
    cluster = DictCluster()
    cluster.policies.objects = {"pay": POLICY}
    reconcile(etcd, wlapi, cluster)
    assert revisions(etcd) == before
    (_, status), = cluster.statuses
    accepted = status["conditions"][0]
    assert accepted["status"] == "False" and "held by" in accepted["message"]


def test_with_envelope_version_2_a_chain_lost_from_etcd_is_put_back(
        etcd: EtcdServer, wlapi: Server) -> None:
    cluster = DictCluster()
    cluster.pods.objects = {"shop/a": pod("a", ips=("10.200.1.11",),
                                          labels={"application": "payments"})}
    cluster.policies.objects = {"pay": POLICY}

    async def passes() -> tuple[dict[str, int], dict[str, int]]:
        async with session((etcd.endpoint.removeprefix("http://"),), PREFIX,
                           str(wlapi.sock("ctl")), ("spiffe://{trust_domain}/tfcrypt/controller",),
                           envelope_version=2) as s:
            controller = Controller(s, cluster, str(wlapi.sock("ctl")))  # type: ignore[arg-type]
            await controller.reconcile()
            first = await asyncio.to_thread(revisions, etcd)
            chain, = (k for k in first if k.startswith("chains/"))
            await s.registry.delete(chain)
            await controller.reconcile()
            return first, await asyncio.to_thread(revisions, etcd)

    first, after = asyncio.run(passes())
    assert sorted(first) == sorted(after)  # the chain is back, nothing else is new
    for key in first:
        if key.startswith("chains/"):
            assert after[key] > first[key]
        else:
            assert after[key] == first[key], key  # the records were not rewritten
    rows = json.loads(tfcrypt(etcd, wlapi, "workload", "list", "--json").stdout)
    assert [r["state"] for r in rows] == ["ok"]
