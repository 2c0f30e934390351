"""The lab, proven on the real thing: namespaces, veths, etcd, wireguard-go, tcpdump.

Every lab here has a random name and is taken down in a finally (conftest.running_lab).
Traffic only flows inside lab namespaces: the etcd client runs in the controller
namespace, pings in workload namespaces, tcpdump in the underlay namespace.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import new_lab_name, running_lab

from netns_lab import Lab
from netns_lab.agents import wireguard_go

pytestmark = pytest.mark.lab

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = Path(__file__).resolve().parent / "lab_scripts"
WG_PORT = 51820


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "netns_lab", *args], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=120, check=False)


def status(name: str) -> dict[str, Any]:
    res = cli("status", "--name", name, "--json")
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def run(argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False, **kw)


def ping(s: dict[str, Any], src: str, dst: str) -> bool:
    """Ping from workload `src` to workload `dst`, using nothing but the status document."""
    wl = {w["name"]: w for w in s["workloads"]}
    res = run(["ip", "netns", "exec", wl[src]["netns"], "ping", "-c", "1", "-W", "2",
               wl[dst]["ip"]])
    return res.returncode == 0


def lab_netns(name: str) -> set[str]:
    out = run(["ip", "netns", "list"]).stdout
    return {line.split()[0] for line in out.splitlines() if line.startswith(f"{name}-")}


def lab_mounts(name: str) -> list[str]:
    marks = (f"/run/netns_lab/{name}", f"/run/netns/{name}-")
    return [line for line in Path("/proc/mounts").read_text().splitlines()
            if any(m in line for m in marks)]


def root_links() -> set[str]:
    return {line.split(":")[1].strip() for line in run(["ip", "-o", "link"]).stdout.splitlines()}


def pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def assert_gone(name: str, pids: list[int]) -> None:
    assert lab_netns(name) == set()
    assert lab_mounts(name) == []
    assert not Path(f"/run/netns_lab/{name}").exists()
    assert [p for p in pids if pid_alive(p)] == []


@pytest.fixture(scope="module")
def lab3() -> Iterator[Lab]:
    """3 nodes x 2 workloads, shared by the tests that do not change the lab."""
    with running_lab(nodes=3, workloads_per_node=2) as lab:
        yield lab


# ---------------------------------------------------------------- lifecycle


def test_two_labs_coexist_and_down_leaves_nothing() -> None:
    names = [new_lab_name(), new_lab_name()]
    links_before = root_links()
    pids: list[int] = []
    try:
        for name in names:
            res = cli("up", "--name", name, "--nodes", "3", "--workloads-per-node", "2")
            assert res.returncode == 0, res.stderr
        for name in names:
            s = status(name)
            assert len(lab_netns(name)) == 1 + 1 + 1 + 3 + 6
            assert all(Path(n["spiffe_socket"]).is_socket() for n in s["nodes"])
            assert ping(s, "n1-w1", "n2-w1")
            pids += [p["pid"] for p in s["processes"]]
        # per lab: etcd, spire-server, a spire-agent per node and the controller's
        assert len(pids) == 2 * (1 + 1 + 3 + 1) and all(pid_alive(p) for p in pids)
    finally:
        for name in names:
            res = cli("down", "--name", name)
            assert res.returncode == 0, res.stderr
    for name in names:
        assert_gone(name, pids)
    assert root_links() == links_before


def test_down_of_absent_lab_is_a_clear_noop() -> None:
    name = new_lab_name()
    res = cli("down", "--name", name)
    assert res.returncode == 0
    assert f"lab {name} is not up" in res.stdout + res.stderr


def test_down_after_a_killed_up_removes_what_the_ledger_lists() -> None:
    """`up` SIGKILLed once namespaces exist (no cleanup ran): `down` still removes all."""
    name = new_lab_name()
    ledger = Path(f"/run/netns_lab/{name}/ledger.jsonl")
    up = subprocess.Popen([sys.executable, "-m", "netns_lab", "up", "--name", name,
                           "--nodes", "3", "--workloads-per-node", "3"], cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and '"kind": "link"' not in (
                ledger.read_text() if ledger.exists() else ""):
            time.sleep(0.01)
        up.kill()
        up.wait(10)
        assert lab_netns(name), "up was killed before it created anything"
    finally:
        res = cli("down", "--name", name)
    assert res.returncode == 0, res.stderr
    assert_gone(name, [])


# ---------------------------------------------------------------- status and routing


def test_status_json_has_every_documented_field(lab3: Lab) -> None:
    s = status(lab3.name)
    assert {"name", "run_dir", "trust_domain", "underlay_cidr", "nodes", "workloads",
            "controller", "etcd", "processes"} <= s.keys()
    assert s["name"] == lab3.name and s["trust_domain"] == "lab.tfcrypt"
    assert s["underlay_cidr"] == "10.77.0.0/24"
    node_keys = {"name", "netns", "underlay_if", "underlay_ip", "workload_subnet",
                 "spiffe_socket", "spiffe_id", "exec", "wireguard_dir"}
    assert [n["name"] for n in s["nodes"]] == ["n1", "n2", "n3"]
    assert all(node_keys <= n.keys() for n in s["nodes"])
    assert s["nodes"][1]["underlay_ip"] == "10.77.0.12"
    assert s["nodes"][1]["spiffe_id"] == "spiffe://lab.tfcrypt/tfcrypt/node/n2"
    assert {(w["name"], w["ip"], w["node"]) for w in s["workloads"]} >= {
        ("n1-w1", "10.200.1.11", "n1"), ("n3-w2", "10.200.3.12", "n3")}
    assert all({"name", "netns", "ip", "node"} <= w.keys() for w in s["workloads"])
    assert s["controller"]["underlay_ip"] == "10.77.0.9"
    assert s["controller"]["spiffe_id"] == "spiffe://lab.tfcrypt/tfcrypt/controller"
    assert s["etcd"]["endpoints"] == ["http://10.77.0.2:2379"]
    member = s["etcd"]["members"][0]
    assert {"name", "netns", "pid", "data_dir", "running"} <= member.keys()
    assert member["running"] and Path(member["data_dir"]).is_dir()
    assert {p["what"] for p in s["processes"]} == {"etcd", "spire-server", "spire-agent"}
    assert all({"pid", "what", "node", "log"} <= p.keys() for p in s["processes"])
    exec_n2 = s["nodes"][1]["exec"]
    out = run([*exec_n2, "ip", "-o", "-4", "addr", "show", "dev", "eth0"]).stdout
    assert "10.77.0.12/24" in out


def test_cross_node_and_same_node_ping(lab3: Lab) -> None:
    s = status(lab3.name)
    assert ping(s, "n1-w1", "n2-w1")
    assert ping(s, "n3-w2", "n1-w2")
    assert ping(s, "n1-w1", "n1-w2")


@pytest.mark.parametrize("underlay", ["v4", "v6"])
def test_ipv6_labs_from_the_cli_route_both_families_with_nothing_tentative(
        underlay: str) -> None:
    """`up --ipv6` (dual-stack underlay) and `up --underlay v6` (IPv6-only underlay)."""
    name = new_lab_name()
    extra = ["--ipv6"] if underlay == "v4" else ["--underlay", "v6"]
    res = cli("up", "--name", name, "--nodes", "2", "--workloads-per-node", "2", *extra)
    try:
        assert res.returncode == 0, res.stderr
        s = status(name)
        assert s["ipv6"] and s["underlay_family"] == underlay
        wl = {w["name"]: w for w in s["workloads"]}
        assert wl["n2-w1"]["ips"] == ["10.200.2.11", "fd00:200:2::11"]
        n1 = s["nodes"][0]
        assert n1["underlay_ip6"] == "fd00:77::11"
        assert n1["workload_subnet6"] == "fd00:200:1::/64"
        v4 = run([*n1["exec"], "ip", "-o", "-4", "addr", "show", "dev", "eth0"]).stdout
        if underlay == "v6":
            assert n1["underlay_ip"] == "fd00:77::11" and v4 == ""
            assert s["etcd"]["endpoints"] == ["http://[fd00:77::2]:2379"]
        else:
            assert "10.77.0.11/24" in v4
        for ns in lab_netns(name):
            out = run(["ip", "-n", ns, "-6", "addr", "show", "tentative"]).stdout
            assert out == "", f"{ns}: {out}"
        for src, dst in (("n1-w1", "n2-w2"), ("n2-w2", "n1-w1"), ("n1-w1", "n1-w2")):
            for ip in wl[dst]["ips"]:
                got = run(["ip", "netns", "exec", wl[src]["netns"], "ping", "-c", "1", "-W",
                           "2", ip])
                assert got.returncode == 0, f"{src} -> {ip}: {got.stdout}"
    finally:
        assert cli("down", "--name", name).returncode == 0
    assert_gone(name, [])


def test_cli_exec_runs_in_the_target(lab3: Lab) -> None:
    res = cli("exec", "--name", lab3.name, "n2-w1", "--", "ip", "-o", "-4", "addr")
    assert res.returncode == 0 and "10.200.2.11/32" in res.stdout
    res = cli("exec", "--name", lab3.name, "n1", "--", "ls", "/sys/class/net")
    assert res.stdout.split() == ["eth0", "lo", "w1", "w2"]


# ---------------------------------------------------------------- etcd


def etcd_kv(lab: Lab, key: str, value: str) -> dict[str, str]:
    endpoints = ",".join(lab.layout.etcd_endpoints())
    res = run([*lab.exec_prefix("controller"), sys.executable, str(SCRIPTS / "etcd_kv.py"),
               endpoints, key, value], cwd=ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    return json.loads(res.stdout)


def test_etcd_put_get_watch_one_member(lab3: Lab) -> None:
    assert etcd_kv(lab3, "/t/a", "one") == {"endpoint": "10.77.0.2:2379", "get": "one",
                                             "watched": "one"}


def test_etcd_three_members_survive_a_killed_member() -> None:
    with running_lab(nodes=1, workloads_per_node=0, etcd_members=3) as lab:
        assert etcd_kv(lab, "/t/b", "before")["get"] == "before"
        res = cli("etcd", "--name", lab.name, "e1", "kill")
        assert res.returncode == 0, res.stderr
        members = {m["name"]: m for m in status(lab.name)["etcd"]["members"]}
        assert not members["e1"]["running"] and members["e2"]["running"]
        result = etcd_kv(lab, "/t/b", "after")
        assert result["endpoint"] != "10.77.0.2:2379"
        assert result["get"] == result["watched"] == "after"
        res = cli("etcd", "--name", lab.name, "e1", "start")
        assert res.returncode == 0, res.stderr
        assert status(lab.name)["etcd"]["members"][0]["running"]


def test_etcd_stop_and_start_keeps_data(lab3: Lab) -> None:
    etcd_kv(lab3, "/t/keep", "kept")
    assert cli("etcd", "--name", lab3.name, "all", "stop").returncode == 0
    assert not status(lab3.name)["etcd"]["members"][0]["running"]
    assert cli("etcd", "--name", lab3.name, "all", "start").returncode == 0
    assert etcd_kv(lab3, "/t/keep2", "x")["get"] == "x"
    res = run([*lab3.exec_prefix("controller"), "etcdctl", "--endpoints",
               lab3.layout.etcd_endpoints()[0], "get", "--print-value-only", "/t/keep"])
    assert res.stdout.strip() == "kept"


# ---------------------------------------------------------------- wireguard-go by hand


def _wg_key(private: Path) -> str:
    private.write_text(run(["wg", "genkey"]).stdout)
    private.chmod(0o600)
    return run(["wg", "pubkey"], input=private.read_text()).stdout.strip()


def _read_capture(capture: Path) -> list[str]:
    return run(["tcpdump", "-n", "-r", str(capture)]).stdout.splitlines()


def _wait_for_capture(capture: Path) -> None:
    """tcpdump writes asynchronously: wait until the tunnel's packets reach the file."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if any(f".{WG_PORT}: UDP" in ln for ln in _read_capture(capture)):
            return
        time.sleep(0.1)


def test_hand_made_wireguard_tunnel_carries_workload_traffic(lab3: Lab, tmp_path: Path
                                                             ) -> None:
    s = status(lab3.name)
    nodes = {n["name"]: n for n in s["nodes"]}
    ifname = f"{lab3.name}wg"
    a, b = nodes["n1"], nodes["n2"]
    keys = {n: tmp_path / f"{n}.key" for n in ("n1", "n2")}
    pubs = {n: _wg_key(k) for n, k in keys.items()}
    wg_procs: list[subprocess.Popen[bytes]] = []
    capture = tmp_path / "underlay.pcap"
    dump: subprocess.Popen[str] | None = None
    try:
        for node in (a, b):
            wg_procs.append(subprocess.Popen([*node["exec"], wireguard_go(), "-f", ifname],
                                             stdout=subprocess.DEVNULL,
                                             stderr=subprocess.DEVNULL,
                                             start_new_session=True))
        for node in (a, b):
            sock = Path(node["wireguard_dir"]) / f"{ifname}.sock"
            deadline = time.monotonic() + 10
            while not sock.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert sock.exists(), f"wireguard-go did not create {sock}"
        for me, peer in ((a, b), (b, a)):
            ex = me["exec"]
            assert run([*ex, "wg", "set", ifname, "private-key", str(keys[me["name"]]),
                        "listen-port", str(WG_PORT), "peer", pubs[peer["name"]],
                        "endpoint", f"{peer['underlay_ip']}:{WG_PORT}",
                        "allowed-ips", peer["workload_subnet"]]).returncode == 0
            assert run([*ex, "ip", "link", "set", ifname, "up"]).returncode == 0
            assert run([*ex, "ip", "route", "replace", peer["workload_subnet"],
                        "dev", ifname]).returncode == 0
        dump = subprocess.Popen([*s["underlay"]["exec"], "tcpdump", "-i", "any", "-n", "-U",
                                 "--immediate-mode", "-Z", "root",
                                 "-w", str(capture)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        assert dump.stderr is not None
        assert any("listening on" in dump.stderr.readline() for _ in range(3))
        assert ping(s, "n1-w1", "n2-w1")
        _wait_for_capture(capture)
        shown = run([*a["exec"], "wg", "show", ifname]).stdout
        assert pubs["n2"] in shown and "latest handshake" in shown and "transfer" in shown
        assert run([*b["exec"], "wg", "show", "interfaces"]).stdout.split() == [ifname]
    finally:
        if dump is not None:
            os.kill(dump.pid, signal.SIGTERM)
            dump.wait(10)
        for proc in wg_procs:
            os.kill(proc.pid, signal.SIGTERM)
            proc.wait(10)
        for me, peer in ((a, b), (b, a)):
            run([*me["exec"], "ip", "route", "replace", peer["workload_subnet"],
                 "via", peer["underlay_ip"]])
    lines = _read_capture(capture)
    assert any(f".{WG_PORT}: UDP" in ln for ln in lines), lines
    assert not [ln for ln in lines if "ICMP" in ln and "10.200." in ln]
    assert ping(s, "n1-w1", "n2-w1"), "plain routing restored after the tunnel is gone"


# ---------------------------------------------------------------- bad input


def _tool_dir_without(tmp_path: Path, missing: str) -> str:
    """A PATH holding every tool the lab needs except `missing` (simulates the package)."""
    from netns_lab.preflight import REQUIRED_TOOLS

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in (*REQUIRED_TOOLS, "sh"):
        found = run(["sh", "-c", f"command -v {tool}"]).stdout.strip()
        if tool != missing and found:
            (bin_dir / tool).symlink_to(found)
    return str(bin_dir)


BAD_INPUT = [
    (["--nodes", "0", "--workloads-per-node", "1"], "--nodes must be 1..50"),
    (["--nodes", "51", "--workloads-per-node", "1"], "--nodes must be 1..50"),
    (["--nodes", "1", "--workloads-per-node", "51"], "--workloads-per-node must be 0..50"),
    (["--nodes", "1", "--workloads-per-node", "1", "--etcd-members", "2"], "invalid choice"),
    (["--nodes", "x", "--workloads-per-node", "1"], "invalid int value"),
]


@pytest.mark.parametrize(("args", "message"), BAD_INPUT)
def test_bad_input_is_one_line_and_leaves_nothing(args: list[str], message: str) -> None:
    name = new_lab_name()
    res = cli("up", "--name", name, *args)
    assert res.returncode != 0
    assert len(res.stderr.strip().splitlines()) == 1 and message in res.stderr
    assert_gone(name, [])


def test_bad_name_is_rejected() -> None:
    res = cli("up", "--name", "Bad-Name", "--nodes", "1", "--workloads-per-node", "0")
    assert res.returncode != 0 and len(res.stderr.strip().splitlines()) == 1
    assert "invalid lab name" in res.stderr


def test_name_in_use_is_refused_and_the_lab_survives(lab3: Lab) -> None:
    res = cli("up", "--name", lab3.name, "--nodes", "1", "--workloads-per-node", "0")
    assert res.returncode != 0 and len(res.stderr.strip().splitlines()) == 1
    assert "already up" in res.stderr
    assert ping(status(lab3.name), "n1-w1", "n2-w1")


def test_missing_package_is_named_with_its_fix(tmp_path: Path) -> None:
    """PATH narrowed to a directory of symlinks to every tool except etcd."""
    name = new_lab_name()
    env = {**os.environ, "PATH": _tool_dir_without(tmp_path, "etcd")}
    res = cli("up", "--name", name, "--nodes", "1", "--workloads-per-node", "1", env=env)
    assert res.returncode != 0
    assert res.stderr.strip() == "netns_lab: etcd not found: apt-get install etcd-server"
    assert_gone(name, [])


def test_failure_half_way_through_up_removes_what_was_made(tmp_path: Path) -> None:
    """An `etcd` that exits at once: up fails after namespaces and mounts exist."""
    name = new_lab_name()
    bin_dir = tmp_path / "fake"
    bin_dir.mkdir()
    (bin_dir / "etcd").write_text("#!/bin/sh\necho fake etcd refuses >&2\nexit 1\n")
    (bin_dir / "etcd").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    res = cli("up", "--name", name, "--nodes", "2", "--workloads-per-node", "1", env=env)
    assert res.returncode != 0
    assert len(res.stderr.strip().splitlines()) == 1 and "etcd member e1 exited" in res.stderr
    assert_gone(name, [])


def test_every_lab_socket_serves_its_own_identity_with_a_valid_chain(lab3: Lab) -> None:
    """Each node's and the controller's socket, asked as the tfcrypt identity from inside
    that namespace (SPIRE's unix attestor), serves its own SPIFFE ID, with a chain that
    verifies under the bundle spire-server shows."""
    from cryptography import x509
    from cryptography.x509.verification import ExtensionPolicy, PolicyBuilder, Store
    from labtools import fetch_svid

    from netns_lab import spire

    s = status(lab3.name)
    want = {n["name"]: n["spiffe_id"] for n in s["nodes"]}
    want["controller"] = s["controller"]["spiffe_id"]
    roots = x509.load_pem_x509_certificates(spire.bundle_path(lab3.layout).read_bytes())
    verifier = (PolicyBuilder().store(Store(roots))
                .extension_policies(ca_policy=ExtensionPolicy.webpki_defaults_ca(),
                                    ee_policy=ExtensionPolicy.permit_all())
                .build_client_verifier())
    for who, spiffe_id in want.items():
        _, chain = fetch_svid(lab3, who)
        san = chain[0].extensions.get_extension_for_class(x509.SubjectAlternativeName)
        assert san.value.get_values_for_type(x509.UniformResourceIdentifier) == [spiffe_id]
        verifier.verify(chain[0], chain[1:])


