"""The kernel monitors: recorded `nft -j monitor` and `ip -o monitor` lines, the child
process lifecycle, and a real agent repairing a hand flush because of the events.

The recorded lines were printed by nftables 1.0.6 and iproute2 6.1 in a scratch
namespace; the lab test proves the repair on a running agent.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import running_lab
from labtools import agent_status, nft_table, run_in, wait_for

from netns_lab import Lab, agents, inventory
from tfcrypt.agent.monitor import KernelScope, follow, ip_event, nft_event

SCOPE = KernelScope.of("tfcrypt0", 29798, 1820)

NFT_LINES = [
    ('{"add": {"table": {"family": "inet", "name": "tfcrypt", "handle": 1}}}',
     "nft add table"),
    ('{"delete": {"table": {"family": "inet", "name": "tfcrypt", "handle": 1}}}',
     "nft delete table"),
    ('{"add": {"chain": {"family": "inet", "table": "tfcrypt", "name": "prerouting", '
     '"handle": 2, "type": "filter", "hook": "prerouting", "prio": -150, '
     '"policy": "accept"}}}', "nft add chain prerouting"),
    ('{"delete": {"chain": {"family": "inet", "table": "tfcrypt", "name": "out_c1", '
     '"handle": 1}}}', "nft delete chain out_c1"),
    ('{"delete": {"rule": {"family": "inet", "table": "tfcrypt", "chain": "out_c1", '
     '"handle": 5, "comment": "tfcrypt:abc", "expr": [{"counter": {"packets": 0, '
     '"bytes": 0}}]}}}', "nft delete rule in out_c1"),
    ('{"delete": {"set": {"family": "inet", "name": "c1_v4", "table": "tfcrypt", '
     '"type": "invalid", "handle": 4}}}', "nft delete set c1_v4"),
    ('{"delete": {"counter": {"family": "inet", "name": "guard_drops", "table": "tfcrypt", '
     '"handle": 3, "packets": 0, "bytes": 0}}}', "nft delete counter guard_drops"),
    ('{"add": {"element": {"family": "inet", "table": "tfcrypt", "name": "c1_v4", '
     '"elem": {"set": ["10.0.0.1"]}}}}', "nft add element"),
    ('{"delete": {"element": {"family": "inet", "table": "tfcrypt", "name": "c1_v4", '
     '"elem": {"set": ["10.0.0.1"]}}}}', "nft delete element"),
]

NFT_IGNORED = [
    '{"add": {"table": {"family": "inet", "name": "other", "handle": 2}}}',
    '{"add": {"chain": {"family": "inet", "table": "other", "name": "x", "handle": 1}}}',
    '{"delete": {"table": {"family": "ip", "name": "tfcrypt", "handle": 7}}}',
    '{"add": {"chain": {"family": "ip", "table": "tfcrypt", "name": "x", "handle": 1}}}',
    "# new generation 12 by process 42 (nft)",
    "",
    "not json {",
    "[1, 2]",
    '{"add": {"table": "tfcrypt"}}',
    '{"add": {"table": {"family": "inet", "name": "tfcrypt"}}, "delete": {}}',
]

IP_LINES = [
    ("1820:\tfrom all fwmark 0x100000/0x100000 lookup 29798", "ip rule added at 1820"),
    ("Deleted 1820:\tfrom all fwmark 0x100000/0x100000 lookup 29798",
     "ip rule deleted at 1820"),
    ("Deleted 1821:\tfrom all fwmark 0x100000/0x100000 lookup 29799 proto 92",
     "ip rule deleted at 1821"),
    ("default dev tfcrypt0 table 29798 proto 92 scope link linkdown ",
     "route added in table 29798"),
    ("Deleted default dev tfcrypt0 table 29798 proto 92 scope link linkdown ",
     "route deleted in table 29798"),
    ("prohibit default table 29799 proto 92 metric 4000 ", "route added in table 29799"),
    ("Deleted prohibit default table 29799 proto 92 metric 4000 pref medium",
     "route deleted in table 29799"),
    ("7: tfcrypt0: <NO-CARRIER,POINTOPOINT,MULTICAST,NOARP,UP> mtu 1300 qdisc pfifo_fast "
     "state DOWN group default \\    link/none ", "link tfcrypt0 changed"),
    ("Deleted 7: tfcrypt0: <POINTOPOINT,MULTICAST,NOARP> mtu 1420 qdisc noop state DOWN "
     "group default \\    link/none ", "link tfcrypt0 deleted"),
]

IP_IGNORED = [
    "1: lo: <LOOPBACK,UP,LOWER_UP> mtu 65536 qdisc noqueue state UNKNOWN group default "
    "\\    link/loopback 00:00:00:00:00:00 brd 00:00:00:00:00:00",
    "3: eth0@if12: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1500 qdisc noqueue state UP",
    "local 127.0.0.1 dev lo table local proto kernel scope host src 127.0.0.1 ",
    "10.200.1.0/24 dev veth1 proto kernel scope link src 10.200.1.1 ",
    "Deleted 10.0.0.0/8 dev tfcrypt0 scope link ",   # main table: not ours
    "32766:\tfrom all lookup main",
    "Deleted 1819:\tfrom all lookup 100",
    "default via 10.0.0.1 dev eth0 table 100 ",
    "",
    "garbage",
]


@pytest.mark.parametrize(("line", "why"), NFT_LINES)
def test_nft_events_touching_our_table_are_drift(line: str, why: str) -> None:
    assert nft_event(line) == why
    assert nft_event(line + "\n") == why


@pytest.mark.parametrize("line", NFT_IGNORED)
def test_nft_lines_outside_our_table_or_not_events_are_ignored(line: str) -> None:
    assert nft_event(line) is None


@pytest.mark.parametrize(("line", "why"), IP_LINES)
def test_ip_events_on_our_rules_routes_and_link_are_drift(line: str, why: str) -> None:
    assert ip_event(line, SCOPE) == why


@pytest.mark.parametrize("line", IP_IGNORED)
def test_ip_lines_outside_our_scope_are_ignored(line: str) -> None:
    assert ip_event(line, SCOPE) is None


def test_scope_follows_the_configured_table_priority_and_interface() -> None:
    scope = KernelScope.of("wg7", 100, 500)
    assert ip_event("Deleted 501:\tfrom all fwmark 0x1 lookup 101", scope) == \
        "ip rule deleted at 501"
    assert ip_event("Deleted 1820:\tfrom all fwmark 0x1 lookup 29798", scope) is None
    assert ip_event("default dev wg7 table 100 proto 92 scope link", scope) == \
        "route added in table 100"
    assert ip_event("default dev tfcrypt0 table 29798 proto 92", scope) is None
    assert ip_event("9: wg7: <POINTOPOINT,NOARP,UP> mtu 1420", scope) == "link wg7 changed"
    assert ip_event("9: tfcrypt0: <POINTOPOINT,NOARP,UP> mtu 1420", scope) is None


def _script(body: str) -> tuple[str, ...]:
    return (sys.executable, "-c", body)


def test_follow_reports_each_event_restarts_a_dead_child_and_kills_it_on_cancel(
        tmp_path: Path) -> None:
    pidfile = tmp_path / "pids"
    body = (f"import os, sys, time\nopen({str(pidfile)!r}, 'a').write(f'{{os.getpid()}}\\n')\n"
            "print('drift', flush=True)\nprint('noise', flush=True)\n"
            "time.sleep(0.3 if len(open(" + repr(str(pidfile)) + ").read().split()) == 1 "
            "else 60)\n")
    seen: list[str] = []

    async def scenario() -> None:
        task = asyncio.create_task(follow(_script(body), lambda line: (
            "saw drift" if line.strip() == "drift" else None), seen.append, backoff=0.05))
        deadline = time.monotonic() + 20
        while seen.count("saw drift") < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert seen.count("saw drift") == 2 and seen.count(f"{sys.executable} monitor started") == 2
    assert "noise" not in seen
    pids = [int(p) for p in pidfile.read_text().split()]
    assert len(pids) == 2
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or \
            "zombie" in Path(f"/proc/{pid}/status").read_text().lower(), \
            f"monitor child {pid} outlived the cancelled watch"


def test_a_missing_binary_is_retried_not_fatal() -> None:
    seen: list[str] = []

    async def scenario() -> None:
        task = asyncio.create_task(follow(("/nonexistent/nft",), lambda _: "x", seen.append,
                                          backoff=0.01))
        await asyncio.sleep(0.2)
        assert not task.done()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert set(seen) <= {"/nonexistent/nft monitor started"}


# -- lab: a running agent repairs a hand flush because of the events ---------------------

ENCRYPT_ALL = Path(__file__).parent.parent / "examples" / "encrypt-all.yaml"


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with running_lab(nodes=2, workloads_per_node=1) as lab:
        inventory.publish_workloads(lab)
        inventory.apply_policy(lab, ENCRYPT_ALL)
        agents.start_all(lab)
        wait_for("both agents to select traffic", lambda: all(
            agent_status(lab, n)["selected_pairs"] and
            agent_status(lab, n)["last_reconcile"].get("ops") == 0 for n in ("n1", "n2")))
        yield lab


def _table(lab: Lab, node: str) -> str:
    return nft_table(lab, node)


def _changes_since(lab: Lab, node: str, since: int) -> str:
    """The agent's `dataplane_changed` log lines written after byte `since`."""
    log = Path(agents.running_agent(lab, node).log).read_bytes()[since:]  # type: ignore[union-attr]
    return "\n".join(line for line in log.decode(errors="replace").splitlines()
                     if "dataplane_changed" in line)


def _log_size(lab: Lab, node: str) -> int:
    return Path(agents.running_agent(lab, node).log).stat().st_size  # type: ignore[union-attr]


def _until(probe: object, timeout: float = 5.0) -> float:
    """Seconds until `probe()` is truthy (polled every 10 ms), or the timeout."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if probe():  # type: ignore[operator]
            break
        time.sleep(0.01)
    return time.monotonic() - start


OWN_CHANGES_S = 1.5  # the agent takes events within 1 s of its own change as its own


@pytest.mark.lab
def test_a_hand_flush_of_the_table_is_repaired_because_of_the_nft_event(lab: Lab) -> None:
    before = _table(lab, "n1")
    mark = _log_size(lab, "n1")
    time.sleep(OWN_CHANGES_S)
    run_in(lab, "n1", ["nft", "flush", "table", "inet", "tfcrypt"])
    try:
        took = _until(lambda: _table(lab, "n1") == before)
    finally:
        if _table(lab, "n1") != before:   # leave the next tests a classifying node
            agents.stop_agent(lab, "n1")
            agents.start_agent(lab, "n1")
            wait_for("n1's table back", lambda: _table(lab, "n1") == before, timeout=30)
    assert _table(lab, "n1") == before
    assert took < 1.0, f"repaired after {took:.2f} s"
    whys = wait_for("the repair's log line", lambda: _changes_since(lab, "n1", mark))
    assert "nft delete" in whys, whys
    assert "periodic resync" not in whys, whys


@pytest.mark.lab
def test_a_hand_deleted_rule_and_table_are_repaired_because_of_the_netlink_events(
        lab: Lab) -> None:
    def rules() -> str:
        return run_in(lab, "n1", ["ip", "rule"]).stdout

    def tunnel() -> str:
        return run_in(lab, "n1", ["ip", "route", "show", "table", "29798"]).stdout

    rules_before, tunnel_before = rules(), tunnel()
    assert "1820:" in rules_before and "1821:" in rules_before
    mark = _log_size(lab, "n1")
    time.sleep(OWN_CHANGES_S)
    run_in(lab, "n1", ["ip", "rule", "del", "priority", "1820"])
    run_in(lab, "n1", ["ip", "route", "flush", "table", "29798"])
    took = _until(lambda: rules() == rules_before and tunnel() == tunnel_before)
    assert (rules(), tunnel()) == (rules_before, tunnel_before)
    assert took < 1.0, f"repaired after {took:.2f} s"
    whys = wait_for("the repair's log line", lambda: _changes_since(lab, "n1", mark))
    assert "ip rule deleted at 1820" in whys or "route deleted in table 29798" in whys, whys


def _reconciles(lab: Lab, node: str) -> float:
    body = run_in(lab, node, [sys.executable, "-c",
                              "import urllib.request, sys; sys.stdout.write(urllib.request."
                              f"urlopen('http://{agents.METRICS_ADDRESS}/metrics', timeout=5)"
                              ".read().decode())"]).stdout
    return sum(float(line.split()[-1]) for line in body.splitlines()
               if line.startswith("tfcrypt_reconciles_total{"))


@pytest.mark.lab
def test_own_changes_settle_and_the_monitor_children_go_with_the_agent(lab: Lab) -> None:
    run_in(lab, "n2", ["nft", "flush", "table", "inet", "tfcrypt"])
    time.sleep(1.0)
    before = _reconciles(lab, "n2")
    time.sleep(3.0)
    assert _reconciles(lab, "n2") - before <= 1, "the agent keeps reacting to its own events"
    agent = agents.running_agent(lab, "n2")
    assert agent is not None
    monitors = [c for c in _descendants(agent.pid) if c[1] in ("nft", "ip")]
    assert {c[1] for c in monitors} == {"nft", "ip"}, monitors
    assert agents.stop_agent(lab, "n2", kill=True)
    wait_for("the monitor children to die with the SIGKILLed agent", lambda: not [
        pid for pid, _ in monitors if _alive(pid)], timeout=5)
    agents.start_agent(lab, "n2")
    wait_for("the restarted agent", lambda: agent_status(lab, "n2")["in_sync"])


def _alive(pid: int) -> bool:
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()
    except FileNotFoundError:
        return False


def _descendants(pid: int) -> list[tuple[int, str]]:
    """(pid, comm) of every process below `pid` (setpriv execs into the monitor)."""
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid=,comm="], capture_output=True,
                         text=True, check=True).stdout
    rows = [line.split(None, 2) for line in out.splitlines()]
    found, frontier = [], {pid}
    while frontier:
        kids = [(int(p), c.strip()) for p, pp, c in rows if int(pp) in frontier]
        found += kids
        frontier = {p for p, _ in kids}
    return found
