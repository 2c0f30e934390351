"""Operating a real agent: `tfcrypt status`, metrics, restart, config file, uninstall.

One 2-node lab (one workload per node, encrypt-all); everything the tests run inside a
node goes through `lab.exec_prefix`, as an operator's `kubectl exec` would. Tests run
in file order on the same lab: the kernel state of n1 before any agent ran is recorded
first, and the last test proves uninstall restores it.
"""

from __future__ import annotations

import difflib
import itertools
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import running_lab
from labtools import Pinger, agent_status, nft_table, wait_for, workload_ip
from prometheus_client.parser import text_string_to_metric_families

from netns_lab import Lab, agents, inventory
from netns_lab.wire import capture, count_packets, ping

pytestmark = pytest.mark.lab

EXAMPLES = Path(__file__).parent.parent / "examples"
METRICS_URL = f"http://{agents.METRICS_ADDRESS}/metrics"


def run(lab: Lab, node: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*lab.exec_prefix(node), *argv], capture_output=True, text=True,
                          check=check, timeout=60)


def tfcrypt(lab: Lab, node: str, *args: str) -> subprocess.CompletedProcess[str]:
    return run(lab, node, sys.executable, "-m", "tfcrypt", *args, check=False)


def status(lab: Lab, node: str, *args: str) -> subprocess.CompletedProcess[str]:
    return tfcrypt(lab, node, "status", "--status-socket",
                   str(agents.status_socket(lab, node)), *args)


def kernel_baseline(lab: Lab, node: str) -> dict[str, str]:
    """What a node's kernel holds that tfcrypt could have touched."""
    return {"ruleset": run(lab, node, "nft", "list", "ruleset").stdout,
            "rules": run(lab, node, "ip", "rule").stdout,
            "routes": run(lab, node, "ip", "route", "show", "table", "all").stdout,
            "links": run(lab, node, "ip", "-br", "link").stdout}


def dataplane(lab: Lab, node: str) -> list[str]:
    """tfcrypt's kernel objects without counters and handshake times."""
    wg = [" ".join(line.split("\t")[:4])
          for line in run(lab, node, "wg", "show", "tfcrypt0", "dump").stdout.splitlines()]
    return [nft_table(lab, node),
            run(lab, node, "ip", "rule").stdout,
            run(lab, node, "ip", "route", "show", "table", "29798").stdout,
            run(lab, node, "ip", "route", "show", "table", "29799").stdout, *wg]


def assert_same_dataplane(lab: Lab, node: str, before: list[str]) -> None:
    """The node's kernel objects equal `before`; on failure, a unified diff of each one
    that differs (pytest's own repr cuts a ruleset off before its first difference)."""
    now = dataplane(lab, node)
    if now != before:
        diffs = ["\n".join(difflib.unified_diff(b.splitlines(), n.splitlines(), "before",
                                                 "now", lineterm=""))
                 for b, n in itertools.zip_longest(before, now, fillvalue="") if b != n]
        raise AssertionError("the dataplane changed:\n" + "\n".join(diffs))


def healthy(lab: Lab, node: str) -> dict[str, Any] | None:
    out = status(lab, node, "--json")
    return json.loads(out.stdout) if out.returncode == 0 else None


def scrape(lab: Lab, node: str) -> dict[str, Any]:
    """The node's metrics over HTTP from inside its namespace, parsed: {sample name: {labels
    as a sorted tuple: value}}, plus the family types under "_types"."""
    body = run(lab, node, sys.executable, "-c",
               "import urllib.request, sys; sys.stdout.write(urllib.request.urlopen("
               f"{METRICS_URL!r}, timeout=5).read().decode())").stdout
    out: dict[str, Any] = {"_types": {}}
    for family in text_string_to_metric_families(body):
        out["_types"][family.name] = family.type
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with running_lab(nodes=2, workloads_per_node=1) as lab:
        wait_for("IPv6 duplicate address detection to finish in n1 (it adds local routes)",
                 lambda: not run(lab, "n1", "ip", "-6", "addr", "show", "tentative").stdout)
        lab.before = kernel_baseline(lab, "n1")  # type: ignore[attr-defined]
        inventory.publish_workloads(lab)
        inventory.apply_policy(lab, EXAMPLES / "encrypt-all.yaml")
        agents.start_all(lab)
        for node in ("n1", "n2"):
            wait_for(f"{node} to report healthy with a selected pair",
                     lambda n=node: (st := healthy(lab, n)) and st["selected_pairs"] == 1)
        # The first packet of a tunnel waits for the WireGuard handshake; an initiation
        # lost on a loaded machine is retried only after wireguard-go's 5 s rekey timeout,
        # longer than one ping waits. The tunnel must carry traffic, then carry all of it.
        wait_for("the n1-n2 tunnel to carry a ping",
                 lambda: ping(lab, "n1-w1", workload_ip(lab, "n2-w1"), count=1) == 1)
        assert ping(lab, "n1-w1", workload_ip(lab, "n2-w1"), count=3, interval=0.1) == 3
        yield lab


def test_status_prints_a_table_and_json_and_exits_0_when_healthy(lab: Lab) -> None:
    table = status(lab, "n1")
    assert table.returncode == 0, table.stderr
    text = table.stdout
    assert "tfcrypt agent on n1: HEALTHY" in text
    assert "spiffe://" in text and "/tfcrypt/node/n1" in text
    assert "encrypt-all" in text and "connected, revision" in text
    header = next(line for line in text.splitlines() if line.startswith("NODE"))
    assert header.split() == ["NODE", "SPIFFE", "ID", "ENDPOINT", "HANDSHAKE", "RX", "TX",
                              "ALLOWED", "IPS"]
    row = next(line for line in text.splitlines() if line.startswith("n2 "))
    assert "/tfcrypt/node/n2" in row and ":51820" in row and "ago" in row

    doc = json.loads(status(lab, "n1", "--json").stdout)
    assert doc["health"] == {"healthy": True, "reasons": []}
    (peer,) = doc["peers"]
    assert peer["node"] == "n2" and peer["configured"] and peer["handshake"] == "recent"
    assert peer["spiffe_id"].endswith("/tfcrypt/node/n2")
    assert peer["allowed_ip_count"] == 1 and peer["rx_bytes"] > 0 and peer["tx_bytes"] > 0
    assert doc["selected_pairs"] == 1 and doc["policies"]["enforce"] == ["encrypt-all"]
    assert set(doc["drops"]) >= {"guard", "strict_ingress", "spoof"}
    assert doc["etcd"]["connected"] and doc["etcd"]["last_revision"] > 0
    assert len(doc["public_key_fingerprint"].split(":")) == 8
    assert doc["public_key"] == agent_status(lab, "n1")["public_key"]  # status.json kept

    probe = status(lab, "n1", "--probe")
    assert (probe.returncode, probe.stdout.strip()) == (0, "healthy")


def test_tfcrypt_inside_a_lab_node_finds_that_nodes_agent_without_flags(lab: Lab) -> None:
    """The lab node feels like a node (issue #13): `netns_lab exec ... n1 -- tfcrypt
    status` reaches n1's agent at the default socket, and `tfcrypt keys show` reads n1's
    key from the default state dir, as they would on a real node."""
    tfcrypt_bin = str(Path(sys.executable).parent / "tfcrypt")

    def in_node(node: str, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "netns_lab", "exec", "--name", lab.name,
                               node, "--", tfcrypt_bin, *args],
                              capture_output=True, text=True, check=False, timeout=60)

    for node, peer in (("n1", "n2"), ("n2", "n1")):
        table = in_node(node, "status")
        assert table.returncode == 0, table.stderr
        assert f"tfcrypt agent on {node}: HEALTHY" in table.stdout
        doc = json.loads(in_node(node, "status", "--json").stdout)
        assert (doc["node"], [p["node"] for p in doc["peers"]]) == (node, [peer])
        assert doc["public_key"] == agent_status(lab, node)["public_key"]
        shown = in_node(node, "keys", "show")
        assert shown.returncode == 0, shown.stderr
        assert json.loads(shown.stdout)["public_key"] == doc["public_key"]
        assert run(lab, node, "test", "-S", "/run/spire/sockets/agent.sock",
                   check=False).returncode == 0  # the node's Workload API, at the default


def test_status_exits_2_and_says_how_to_fix_when_no_agent_answers(lab: Lab) -> None:
    out = tfcrypt(lab, "n1", "status", "--status-socket", "/run/tfcrypt-none/agent.sock")
    assert out.returncode == 2
    assert "cannot reach the agent" in out.stderr and "--status-socket" in out.stderr


def test_metrics_are_served_and_parse(lab: Lab) -> None:
    m = scrape(lab, "n1")
    types = m["_types"]
    assert types["tfcrypt_reconciles"] == "counter"
    assert types["tfcrypt_reconcile_duration_seconds"] == "histogram"
    assert sum(m["tfcrypt_reconciles_total"].values()) >= 1
    assert m["tfcrypt_reconcile_duration_seconds_count"][()] >= 1
    assert m["tfcrypt_peers_by_handshake"][(("state", "recent"),)] == 1
    assert m["tfcrypt_peers_by_handshake"][(("state", "never"),)] == 0
    assert m["tfcrypt_peer_handshake_age_seconds"][(("peer", "n2"),)] < 180
    assert m["tfcrypt_peer_received_bytes_total"][(("peer", "n2"),)] > 0
    assert m["tfcrypt_peer_sent_bytes_total"][(("peer", "n2"),)] > 0
    assert m["tfcrypt_selected_pairs"][()] == 1
    assert set(m["tfcrypt_dropped_packets_total"]) == {(("reason", "guard"),),
                                                        (("reason", "strict_ingress"),),
                                                        (("reason", "spoof"),)}
    assert 0 < m["tfcrypt_svid_expiry_seconds"][()] <= 600
    assert m["tfcrypt_healthy"][()] == 1


@pytest.mark.kernel
def test_sigkill_under_traffic_loses_no_packet_and_leaks_none(lab: Lab,
                                                              tmp_path: Path) -> None:
    src, dst = workload_ip(lab, "n1-w1"), workload_ip(lab, "n2-w1")
    before = dataplane(lab, "n1")
    pcap = tmp_path / "sigkill.pcap"
    with capture(lab, pcap):
        pinger = Pinger(lab, "n1-w1", dst, count=60, interval=0.05)
        try:
            time.sleep(0.5)
            assert agents.stop_agent(lab, "n1", kill=True)
            assert agents.status_socket(lab, "n1").exists()  # left behind by SIGKILL
            agents.start_agent(lab, "n1")
            wait_for("the restarted agent to be healthy", lambda: healthy(lab, "n1"))
            sent, received = pinger.result()
        finally:
            pinger.kill()
    assert (sent, received) == (60, 60)
    assert count_packets(pcap, f"icmp and host {src} and host {dst}") == 0
    assert count_packets(pcap, "udp port 51820") > 0
    assert_same_dataplane(lab, "n1", before)


@pytest.mark.kernel
def test_sigterm_leaves_the_dataplane_and_a_new_agent_adopts_it_without_changes(
        lab: Lab, tmp_path: Path) -> None:
    before = dataplane(lab, "n1")
    log = Path(agents.running_agent(lab, "n1").log)  # type: ignore[union-attr]
    assert agents.stop_agent(lab, "n1")
    assert_same_dataplane(lab, "n1", before)
    assert not agents.status_socket(lab, "n1").exists()
    assert ping(lab, "n1-w1", workload_ip(lab, "n2-w1"), count=2, interval=0.1) == 2

    config = agents.state_dir(lab, "n1") / "tfcrypt.yaml"
    config.write_text("etcd_grace: 3\nlog_format: json\n")
    spec = next(n for n in lab.layout.all_nodes() if n.name == "n1")
    rec = agents.start_agent_argv(lab, "n1", [*agents.agent_argv(lab, spec), "--config",
                                              str(config)], log_name="agent-n1-restarted.log")
    wait_for("the new agent to be healthy", lambda: healthy(lab, "n1"))
    wait_for("a reconcile of the new agent",
             lambda: json.loads(status(lab, "n1", "--json").stdout)["last_reconcile"])
    assert_same_dataplane(lab, "n1", before)
    events = [json.loads(line) for line in Path(rec.log).read_text().splitlines()
              if line.startswith("{")]
    assert events and all({"ts", "level", "logger", "msg"} <= e.keys() for e in events)
    assert not [e for e in events if e.get("event") == "dataplane_changed"], events
    assert "reconciled event=dataplane_changed peers=+n2" in log.read_text()  # first agent


def test_unhealthy_with_the_reason_while_etcd_is_down(lab: Lab) -> None:
    lab.etcd_stop(["e1"])
    try:
        out = wait_for("status to exit 1 naming etcd", lambda: (
            o if (o := status(lab, "n1", "--probe")).returncode == 1
            and "etcd unreachable" in o.stdout else None), timeout=30)
        assert out.stdout.startswith("unhealthy: ")
        table = status(lab, "n1")
        assert table.returncode == 1
        assert "UNHEALTHY" in table.stdout and "Unhealthy because:" in table.stdout
        assert "DISCONNECTED" in table.stdout
    finally:
        lab.etcd_start(["e1"])
    wait_for("n1 to be healthy again", lambda: healthy(lab, "n1"), timeout=60)


def wg_mtu(lab: Lab, node: str) -> int:
    words = run(lab, node, "ip", "link", "show", "tfcrypt0").stdout.split()
    return int(words[words.index("mtu") + 1])


@pytest.mark.kernel
def test_the_wireguard_mtu_follows_the_underlay_and_a_full_segment_still_crosses(
        lab: Lab) -> None:
    """No MTU configured: the agent takes the underlay's minus 80 and follows a change."""
    assert (wg_mtu(lab, "n2"), healthy(lab, "n2")["mtu_source"]) == (1420,
                                                                     "underlay MTU 1500 - 80")
    run(lab, "n2", "ip", "link", "set", "eth0", "mtu", "1400")
    try:
        wait_for("n2's WireGuard MTU to follow its underlay", lambda: wg_mtu(lab, "n2") == 1320,
                 timeout=30)
        assert healthy(lab, "n2")["mtu"] == 1320
        # the largest packet the tunnel takes now crosses, unfragmented: DF set
        src, dst = "n2-w1", workload_ip(lab, "n1-w1")
        df = run(lab, src, "ping", "-c", "3", "-i", "0.2", "-W", "2", "-M", "do",
                 "-s", str(1320 - 28), dst, check=False)
        assert df.returncode == 0, df.stdout + df.stderr
    finally:
        run(lab, "n2", "ip", "link", "set", "eth0", "mtu", "1500")
    wait_for("n2's WireGuard MTU back at 1420", lambda: wg_mtu(lab, "n2") == 1420, timeout=30)


@pytest.mark.kernel
def test_uninstall_restores_the_kernel_as_it_was_before_the_agent(lab: Lab) -> None:
    state = agents.state_dir(lab, "n1")
    args = ("uninstall", "--state-dir", str(state), "--status-socket",
            str(agents.status_socket(lab, "n1")), "--backend", agents.backend())
    refused = tfcrypt(lab, "n1", *args)
    assert refused.returncode == 1 and "an agent is running" in refused.stderr
    for rec in lab.find_processes(agents.AGENT, "n1"):
        lab.stop_process(rec)
    assert (state / "flows.json").exists()  # the agent saved its flow records

    first = tfcrypt(lab, "n1", *args)
    assert first.returncode == 0, first.stderr
    said = first.stdout
    assert "deleted nftables table inet tfcrypt" in said
    assert "ip rules at priority 1820" in said and "ip rules at priority 1821" in said
    assert "from table 29799" in said
    assert ("stopped wireguard-go pid" if agents.backend() == "userspace"
            else "deleted interface tfcrypt0") in said
    assert not (state / "wireguard.key").exists()
    assert not (state / "flows.json").exists()
    after = kernel_baseline(lab, "n1")
    before = lab.before  # type: ignore[attr-defined]
    assert after == before, {k: (sorted(set(before[k].splitlines()) - set(after[k].splitlines())),
                                 sorted(set(after[k].splitlines()) - set(before[k].splitlines())))
                             for k in before if before[k] != after[k]}

    second = tfcrypt(lab, "n1", *args)
    assert (second.returncode, second.stdout.strip()) == (0, "nothing to remove")
