"""`tfcrypt policy plan --against-seen`, `tfcrypt policy suggest`, `tfcrypt report`
against a real etcd and the lab Workload API server, with flow reports signed by the
nodes' own SVIDs (issue #19)."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import etcd_fixture
import pytest
from etcd_fixture import EtcdServer
from test_cli_writer import CONTROLLER, PREFIX, tfcrypt  # the CLI as test_cli_writer runs it
from wlapi_server import TD, Server

from tfcrypt.controller.session import fetch_svid
from tfcrypt.identity import sign_envelope
from tfcrypt.model.flow import FlowKey, FlowRecord, FlowReport, Verdict
from tfcrypt.model.node import NodeRecord
from tfcrypt.model.policy import read_policy_file
from tfcrypt.registry import Registry

NODES = ("n1", "n2")
PCI, WEB, DB = "10.200.1.11", "10.200.1.12", "10.200.2.11"
etcd = etcd_fixture.etcd  # the fixture, under the name tests ask for

PCI_DB = """apiVersion: tfcrypt.io/v1alpha1
kind: EncryptionPolicy
metadata: {name: pci-db}
spec:
  mode: MODE
  rules:
  - endpoint1: {tags: [label=pci]}
    endpoint2: {tags: [application=db]}
"""


@pytest.fixture
def wlapi(workdir: Path) -> Iterator[Server]:
    config = workdir / "config.json"
    identities = [{"socket": str(workdir / "ctl.sock"), "spiffe_id": CONTROLLER}]
    identities += [{"socket": str(workdir / f"{n}.sock"),
                    "spiffe_id": f"spiffe://{TD}/tfcrypt/node/{n}"} for n in NODES]
    config.write_text(json.dumps({
        "trust_domain": TD, "state_dir": str(workdir / "state"), "svid_ttl_seconds": 600,
        "identities": identities}))
    server = Server(workdir, config)
    server.start()
    try:
        yield server
    finally:
        server.kill()


def ok(out: subprocess.CompletedProcess[str]) -> str:
    assert out.returncode == 0, out
    return out.stdout


def put(etcd: EtcdServer, key: str, value: bytes, *, seen: bool = False) -> None:
    async def write() -> None:
        async with Registry([etcd.endpoint.removeprefix("http://")], prefix=PREFIX) as reg:
            await (reg.put_seen(key, value) if seen else reg.put(key, value))
    asyncio.run(write())


def signed_by(wlapi: Server, node: str, payload: dict[str, object]) -> bytes:
    svid = fetch_svid(str(wlapi.sock(node)))
    return sign_envelope(payload, svid.private_key, svid.chain)


def publish_node(etcd: EtcdServer, wlapi: Server, node: str, n: int) -> None:
    record = NodeRecord(node, f"spiffe://{TD}/tfcrypt/node/{node}",
                        base64.b64encode(bytes([n]) * 32).decode(), f"192.0.2.{n}:51820",
                        (), 1, int(time.time()))
    put(etcd, record.key, signed_by(wlapi, node, record.to_payload()))


def flow(src: str, dst: str, verdict: Verdict, dport: int = 5432,
         packets: int = 10) -> FlowRecord:
    now = int(time.time())  # canonical JSON has no floats: times are whole seconds here
    return FlowRecord(FlowKey(src, dst, "tcp", dport, verdict), now - 60, now - 5, packets,
                      packets * 100)


def report_payload(node: str, *flows: FlowRecord, age: int = 5) -> dict[str, object]:
    """The report as an agent signs it: FlowReport.to_payload and the envelope's epoch
    and issued_at (which to_payload leaves to the signer)."""
    now = int(time.time())
    peers: dict[str, float | None] = {n: now - 20 for n in NODES if n != node}
    report = FlowReport(node, now - age, now - 3600, flows, peers)
    return {**report.to_payload(), "epoch": int(time.time() * 1000), "issued_at": now}


def publish_report(etcd: EtcdServer, wlapi: Server, node: str, *flows: FlowRecord,
                   signer: str | None = None, age: int = 5) -> None:
    put(etcd, f"flows/{node}", signed_by(wlapi, signer or node,
                                         report_payload(node, *flows, age=age)), seen=True)


@pytest.fixture
def cluster(etcd: EtcdServer, wlapi: Server) -> tuple[EtcdServer, Server]:
    """Two nodes with records, three workloads, and each node's report of pci -> db."""
    for name, node, ip, tags in (("pci", "n1", PCI, ["label=pci"]),
                                 ("web", "n1", WEB, ["application=web"]),
                                 ("db", "n2", DB, ["application=db"])):
        ok(tfcrypt(etcd, wlapi, "workload", "set", name, "--node", node, "--ip", ip,
                   *[a for t in tags for a in ("--tag", t)]))
    for n, node in enumerate(NODES, 1):
        publish_node(etcd, wlapi, node, n)
    publish_report(etcd, wlapi, "n1", flow(PCI, DB, Verdict.PLAINTEXT),
                   flow(WEB, DB, Verdict.PLAINTEXT, dport=80))
    publish_report(etcd, wlapi, "n2", flow(PCI, DB, Verdict.PLAINTEXT))
    return etcd, wlapi


def test_plan_against_seen_is_ready_then_exit_1_naming_the_node_when_its_report_is_forged(
        cluster: tuple[EtcdServer, Server], workdir: Path) -> None:
    etcd, wlapi = cluster
    path = workdir / "pci-db.yaml"
    path.write_text(PCI_DB.replace("MODE", "audit"))
    plain = ok(tfcrypt(etcd, wlapi, "policy", "plan", "-f", str(path)))
    assert "seen" not in plain  # without --against-seen plan is unchanged
    out = ok(tfcrypt(etcd, wlapi, "policy", "plan", "-f", str(path), "--against-seen"))
    assert f"encrypt {PCI} -> {DB} tcp/5432 (nodes n1, n2; seen by n1, n2 as plaintext; " \
           "10 packets" in out
    assert "web" not in out and f"{WEB} ->" not in out
    assert "ready against seen traffic" in out

    # n2 signs a report of n1's flows, and junk sits at flows/n3
    publish_report(etcd, wlapi, "n1", flow(PCI, DB, Verdict.PLAINTEXT), signer="n2")
    put(etcd, "flows/n3", b"not an envelope", seen=True)
    out = tfcrypt(etcd, wlapi, "policy", "plan", "-f", str(path), "--against-seen")
    assert out.returncode == 1, out
    assert "2 report(s) refused (malformed 1, unauthorized 1)" in out.stdout
    assert f"refused flows/n1: unauthorized: spiffe://{TD}/tfcrypt/node/n2 may not write " \
           "flows/n1" in out.stdout
    assert f"encrypt {PCI} -> {DB} tcp/5432 (nodes n1, n2; seen by n2 as plaintext" \
           in out.stdout and "WOULD BE BLACK-HOLED" in out.stdout
    assert "n1: no flow report (is its agent running?)" in out.stdout
    doc = json.loads(tfcrypt(etcd, wlapi, "policy", "plan", "-f", str(path), "--against-seen",
                             "--json").stdout)
    seen = doc["against_seen"]
    assert seen["rejections"] == {"malformed": 1, "unauthorized": 1}
    assert seen["reports"] == ["n2"] and seen["black_holed"] == 1
    (f,) = seen["flows"]
    assert (f["src"], f["dst"], f["change"], f["black_holed"]) == (PCI, DB, "encrypt", True)


def test_plan_against_seen_stale_report_and_since(cluster: tuple[EtcdServer, Server],
                                                  workdir: Path) -> None:
    etcd, wlapi = cluster
    path = workdir / "pci-db.yaml"
    path.write_text(PCI_DB.replace("MODE", "audit"))
    publish_report(etcd, wlapi, "n2", flow(PCI, DB, Verdict.PLAINTEXT), age=300)
    out = tfcrypt(etcd, wlapi, "policy", "plan", "-f", str(path), "--against-seen")
    assert out.returncode == 1, out
    assert re.search(r"n2: its report is 30\d s old \(fresh: within 120 s", out.stdout), out
    # with a longer freshness the same report is fine
    ok(tfcrypt(etcd, wlapi, "policy", "plan", "-f", str(path), "--against-seen",
               "--report-max-age", "10m"))
    # the flows ended 5 s ago: within 1s nothing was seen, so nothing can be black-holed
    out = ok(tfcrypt(etcd, wlapi, "policy", "plan", "-f", str(path), "--against-seen",
                     "--since", "1s"))
    assert "0 seen flow(s) would change" in out


def test_suggest_writes_an_audit_policy_covering_the_seen_flows_that_applies(
        cluster: tuple[EtcdServer, Server], workdir: Path) -> None:
    etcd, wlapi = cluster
    out = ok(tfcrypt(etcd, wlapi, "policy", "suggest", "--touching", "label=pci"))
    assert "mode: audit" in out and "application=db" in out
    assert "policy seen-label-pci (audit mode, 1 rule(s)) covers 1 seen flow(s)" \
        in tfcrypt(etcd, wlapi, "policy", "suggest", "--touching", "label=pci").stderr
    path = workdir / "suggested.yaml"
    res = tfcrypt(etcd, wlapi, "policy", "suggest", "--touching", "label=pci", "--name", "pci",
                  "-o", str(path))
    assert (res.returncode, res.stdout) == (0, "")
    assert f"{PCI} -> {DB} tcp/5432: rule 0" in res.stderr
    assert read_policy_file(str(path)).name == "pci"
    assert "policy pci: created (audit, 1 rule(s))" in ok(
        tfcrypt(etcd, wlapi, "policy", "apply", "-f", str(path)))
    doc = json.loads(ok(tfcrypt(etcd, wlapi, "policy", "suggest", "--touching", "label=pci",
                                "--json")))
    assert [(c["src"], c["dst"]) for c in doc["covered"]] == [(PCI, DB)]
    assert doc["unseen_pairs"] == []
    nothing = tfcrypt(etcd, wlapi, "policy", "suggest", "--touching", "label=none")
    assert (nothing.returncode, nothing.stdout) == (1, "")
    assert "no seen flow touching label=none can be selected" in nothing.stderr


def test_report_proves_encryption_counts_ingress_drops_and_exits_1_on_plaintext(
        cluster: tuple[EtcdServer, Server], workdir: Path) -> None:
    etcd, wlapi = cluster
    path = workdir / "pci-db.yaml"
    path.write_text(PCI_DB.replace("MODE", "enforce"))
    ok(tfcrypt(etcd, wlapi, "policy", "apply", "-f", str(path)))
    publish_report(etcd, wlapi, "n1", flow(PCI, DB, Verdict.WIREGUARD, packets=40))
    publish_report(etcd, wlapi, "n2", flow(PCI, DB, Verdict.WIREGUARD, packets=40),
                   flow(PCI, DB, Verdict.INGRESS_DROP, dport=22, packets=3))
    doc = json.loads(ok(tfcrypt(etcd, wlapi, "report", "--json")))
    (p,) = doc["policies"]
    assert (p["policy"], p["selected_pairs"], p["pairs_with_traffic"]) == ("pci-db", 1, 1)
    assert p["wireguard"]["packets"] == 40 and p["wireguard"]["bytes"] == 4000
    assert p["ingress_drop"]["packets"] == 3 and p["plaintext_flows"] == []
    assert [h["nodes"] for h in p["handshakes"]] == [["n1", "n2"]]
    text = ok(tfcrypt(etcd, wlapi, "report"))
    assert "plaintext dropped by strict ingress: 3 packets" in text
    assert "plaintext of selected pairs: none" in text

    publish_report(etcd, wlapi, "n2", flow(PCI, DB, Verdict.PLAINTEXT, dport=80))
    out = tfcrypt(etcd, wlapi, "report")
    assert out.returncode == 1, out
    assert f"plaintext {PCI} -> {DB} tcp/80: 10 packets" in out.stdout
    put(etcd, "flows/n1", b"junk", seen=True)
    assert "report n1: none believed" in tfcrypt(etcd, wlapi, "report").stdout


@pytest.mark.parametrize(("args", "problem"), [
    (["report", "--since", "10x"], "argument --since: '10x' is not a duration"),
    (["policy", "plan", "-f", "FILE", "--since", "1h"], "--since: only with --against-seen"),
    (["policy", "suggest", "--touching", "pci"], "--touching: 'pci': a tag is type=value"),
])
def test_bad_arguments_exit_2_with_one_clear_line(workdir: Path, args: list[str],
                                                  problem: str) -> None:
    (workdir / "p.yaml").write_text(PCI_DB.replace("MODE", "audit"))
    args = [str(workdir / "p.yaml") if a == "FILE" else a for a in args]
    out = subprocess.run([sys.executable, "-m", "tfcrypt", *args, "--etcd", "127.0.0.1:9",
                          "--spiffe-socket", str(workdir / "none")],
                         capture_output=True, text=True, timeout=60)
    assert (out.returncode, out.stdout) == (2, "")
    assert problem in out.stderr.splitlines()[-1]
