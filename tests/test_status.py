"""Status without root: the health verdict and the table from a status dict, the status
API over a Unix socket in a temp dir, the metrics collector, and the log lines."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import datetime as dt
import json
import logging
import os
import socket
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tfcrypt.agent.logs import JsonFormatter, TextFormatter, change_summary
from tfcrypt.agent.status_api import StatusApiError, StatusServer, fetch_status
from tfcrypt.cli import main as cli_main
from tfcrypt.core.compute import AuditReport, Desired, PeerDesired
from tfcrypt.metrics import DataplaneCollector, PeerSample
from tfcrypt.status_view import fingerprint, handshake_state, health, render

NOW = dt.datetime(2026, 5, 1, 12, 0, 0, tzinfo=dt.UTC)
KEY = "E2PqmpNWBHDS66mRQ99zuMeZIyGujk7B4QrOwhGBog8="


def at(seconds: float) -> str:
    return (NOW + dt.timedelta(seconds=seconds)).isoformat()


def healthy_status() -> dict[str, Any]:
    return {
        "node": "n1", "spiffe_id": "spiffe://td/tfcrypt/node/n1", "svid_expires": at(600),
        "public_key": KEY, "public_key_fingerprint": fingerprint(KEY), "epoch": 7,
        "key_problem": None, "interface": "tfcrypt0", "listen_port": 51820, "in_sync": True,
        "etcd": {"connected": True, "last_revision": 42, "relists": 1, "reconnects": 0,
                 "last_error": None, "disconnected_since": None},
        "etcd_grace_s": 60.0,
        "workload_api": {"connected": True, "waiting_for_socket": False, "errors": {},
                         "last_error": None, "last_refusal": None},
        "peers": [{"node": "n2", "spiffe_id": "spiffe://td/tfcrypt/node/n2",
                   "public_key": KEY, "endpoint": "10.77.0.12:51820",
                   "allowed_ips": ["10.200.2.11/32"], "allowed_ip_count": 1,
                   "configured": True, "latest_handshake": at(-12), "handshake_age_s": 12.0,
                   "handshake": "recent", "rx_bytes": 2048, "tx_bytes": 100}],
        "policies": {"enforce": ["encrypt-all"], "audit": ["pci-audit"]},
        "selected_pairs": 1, "audit_pairs": 3, "missing_peers": [], "conflicts": [],
        "drops": {"guard": {"packets": 0, "bytes": 0},
                  "strict_ingress": {"packets": 4, "bytes": 336}},
        "rejected": {}, "last_reconcile": {"at": at(-2), "duration_s": 0.0123, "ops": 0,
                                           "errors": [], "changed": {}},
    }


def changed(**edits: Any) -> dict[str, Any]:
    st: Any = copy.deepcopy(healthy_status())
    for path, value in edits.items():
        target = st
        *parents, leaf = path.split("__")
        for p in parents:
            target = target[int(p)] if p.isdigit() else target[p]
        target[leaf] = value
    return st


def test_a_healthy_status_has_no_reasons() -> None:
    assert health(healthy_status(), NOW).to_json() == {"healthy": True, "reasons": []}


@pytest.mark.parametrize(("edits", "reason"), [
    ({"svid_expires": None}, "no SVID from the SPIFFE Workload API yet"),
    ({"svid_expires": at(-1)}, "the SVID expired at 2026-05-01T11:59:59+00:00"),
    ({"in_sync": False}, "not in sync: waiting for an SVID and a first etcd listing"),
    ({"last_reconcile": {}}, "no reconcile has run yet"),
    ({"last_reconcile__errors": ["wireguard: peer X: timeout", "nftables: refused", "c"]},
     "the last reconcile left items pending: wireguard: peer X: timeout; nftables: refused "
     "(and 1 more)"),
    ({"etcd__connected": False, "etcd__disconnected_since": at(-61),
      "etcd__last_error": "connection refused"},
     "etcd unreachable for 61s (allowed 60s): connection refused"),
    ({"etcd__connected": False, "etcd__disconnected_since": None},
     "etcd unreachable (allowed 60s)"),
    ({"missing_peers": ["n3"]}, "no verified key for n3: selected traffic to it is dropped"),
    ({"peers__0__configured": False}, "1 peer not configured on tfcrypt0: n2"),
])
def test_each_failed_condition_is_one_reason(edits: dict[str, Any], reason: str) -> None:
    verdict = health(changed(**edits), NOW)
    assert not verdict.healthy
    assert len(verdict.reasons) == 1 and verdict.reasons[0].startswith(reason), verdict


REFUSAL = {"reason": "unexpected_spiffe_id", "at": at(-30),
           "message": "served spiffe://td/tfcrypt/node/n2, but this node is "
                      "spiffe://td/tfcrypt/node/n1"}


def test_without_an_svid_the_reason_is_the_last_refusal_not_none_yet() -> None:
    """Issue #14 item 9: handed another node's SVID, status said "no SVID yet"."""
    st = changed(svid_expires=None, spiffe_id=None, workload_api__last_refusal=REFUSAL)
    (reason,) = health(st, NOW).reasons
    assert "no SVID accepted" in reason and "yet" not in reason
    assert "unexpected_spiffe_id: served spiffe://td/tfcrypt/node/n2, but this node is " \
           "spiffe://td/tfcrypt/node/n1" in reason
    text = render(st, NOW)
    assert ("Workload API:        connected; last refused SVID 2026-05-01 11:59:30 UTC (30s "
            "ago): unexpected_spiffe_id: served spiffe://td/tfcrypt/node/n2") in text
    assert f"  - {reason}" in text


def test_a_refusal_after_a_good_svid_is_shown_but_the_good_one_keeps_it_healthy() -> None:
    st = changed(workload_api__last_refusal=REFUSAL)
    assert health(st, NOW).healthy
    assert "last refused SVID" in render(st, NOW)


def test_a_refused_spiffe_id_is_escaped_and_cut_short_before_status_sees_it() -> None:
    from tfcrypt.identity.svid_source import SvidSource, SvidUpdate
    source = SvidSource("/nonexistent/agent.sock")
    served = "spiffe://td/tfcrypt/node/n2\u202e" + "x" * 5000
    source.refuse(SvidUpdate(served, None, (), {}), "spiffe://td/tfcrypt/node/n1")
    refusal = source.state.last_refusal
    assert refusal is not None and refusal.reason == "unexpected_spiffe_id"
    assert "\u202e" not in refusal.message and "\\u202e" in refusal.message
    assert len(refusal.message) < 400 and "more characters" in refusal.message
    assert source.state.errors["unexpected_spiffe_id"] == 1


def test_status_json_is_written_0600_atomically_whatever_was_there(tmp_path: Path) -> None:
    from tfcrypt.privatefile import write_private
    path = tmp_path / "status.json"
    path.write_text("{}")
    path.chmod(0o644)  # what main left behind
    write_private(path, b'{"node": "n1"}' * 10000)
    assert (path.stat().st_mode & 0o777) == 0o600
    assert path.read_bytes() == b'{"node": "n1"}' * 10000
    assert [p.name for p in tmp_path.iterdir()] == ["status.json"]  # no temporary left


def test_etcd_down_for_less_than_the_grace_is_still_healthy() -> None:
    st = changed(etcd__connected=False, etcd__disconnected_since=at(-59))
    assert health(st, NOW).healthy
    assert not health(st, NOW + dt.timedelta(seconds=1)).healthy


def test_handshakes_inform_but_do_not_decide_health() -> None:
    assert [handshake_state(a) for a in (None, 0, 180, 181)] == [
        "never", "recent", "recent", "stale"]
    st = healthy_status()
    st["peers"][0].update(latest_handshake=None, handshake_age_s=None, handshake="never")
    assert health(st, NOW).healthy


def test_the_table_has_a_header_block_and_one_row_per_peer() -> None:
    text = render(healthy_status(), NOW)
    lines = text.splitlines()
    assert lines[0] == "tfcrypt agent on n1: HEALTHY"
    assert "SVID expires:        2026-05-01 12:10:00 UTC (in 10m00s)" in lines
    assert f"WireGuard:           tfcrypt0 port 51820, key {fingerprint(KEY)}, epoch 7" in lines
    assert "etcd:                connected, revision 42; 0 reconnects, 1 relists" in lines
    assert "Policies enforced:   encrypt-all" in lines
    assert "Policies audited:    pci-audit" in lines
    assert "Selected pairs:      1 (audit policies would add 3)" in lines
    assert "Drops:               guard 0 pkts, strict ingress 4 pkts" in lines
    assert ("Last reconcile:      2026-05-01 11:59:58 UTC (2s ago), 12.3 ms, 0 changes, "
            "no errors") in lines
    assert "Rejected records:    none" in lines
    i = lines.index("Peers (1):")
    assert lines[i + 1].split() == ["NODE", "SPIFFE", "ID", "ENDPOINT", "HANDSHAKE", "RX",
                                    "TX", "ALLOWED", "IPS"]
    assert lines[i + 2].split() == ["n2", "spiffe://td/tfcrypt/node/n2", "10.77.0.12:51820",
                                    "12s", "ago", "2.0", "KiB", "100", "B", "1"]
    assert lines[i + 1].index("ENDPOINT") == lines[i + 2].index("10.77.0.12")
    assert "Unhealthy because:" not in text


def test_an_unhealthy_table_ends_with_its_reasons() -> None:
    st = changed(etcd__connected=False, etcd__disconnected_since=at(-125),
                 rejected={"unauthorized": 2, "malformed": 1}, peers=[])
    st["health"] = health(st, NOW).to_json()
    lines = render(st, NOW).splitlines()
    assert lines[0] == "tfcrypt agent on n1: UNHEALTHY"
    assert "etcd:                DISCONNECTED for 2m05s; 0 reconnects, 1 relists" in lines
    assert "Rejected records:    malformed 1, unauthorized 2" in lines
    assert "  none (no selected flow leaves this node)" in lines
    assert lines[-2:] == ["Unhealthy because:", "  - etcd unreachable for 125s (allowed 60s)"]


def test_local_workloads_carry_every_address_and_the_table_names_them() -> None:
    """Dual-stack: the status lists this node's workloads with both families (`ips`)."""
    from tfcrypt.agent.status_report import local_workloads
    from tfcrypt.model.workload import Workload
    wls = [Workload("b", "n1", ("fd00:200:1::0:12", "10.200.1.12"), frozenset()),
           Workload("a", "n1", ("10.200.1.11",), frozenset()),
           Workload("c", "n2", ("10.200.2.11", "fd00:200:2::11"), frozenset())]
    local = local_workloads(wls, "n1")
    assert local == [{"name": "a", "ips": ["10.200.1.11"]},
                     {"name": "b", "ips": ["10.200.1.12", "fd00:200:1::12"]}]
    lines = render(healthy_status() | {"local_workloads": local}, NOW).splitlines()
    assert "Local workloads:     a 10.200.1.11; b 10.200.1.12 fd00:200:1::12" in lines


def test_the_fingerprint_is_short_stable_and_not_the_key() -> None:
    fp = fingerprint(KEY)
    assert fp == fingerprint(KEY) and len(fp.split(":")) == 8 and KEY[:8] not in fp
    assert fingerprint("not base64!") == "invalid"


# -- the status API ----------------------------------------------------------------------

def raw_request(path: Path, request: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(path))
        s.sendall(request)
        return b"".join(iter(lambda: s.recv(65536), b""))


async def serving(path: Path, doc: dict[str, Any]) -> tuple[StatusServer, asyncio.Task[None]]:
    async def provider() -> dict[str, Any]:
        return doc
    server = StatusServer(path, provider)
    await server.start()
    return server, asyncio.create_task(server.serve())


def test_the_api_serves_status_and_healthz_over_http_1_0(tmp_path: Path) -> None:
    path = tmp_path / "run" / "agent.sock"
    doc = healthy_status() | {"health": {"healthy": False, "reasons": ["x"]}}

    async def main() -> None:
        _, task = await serving(path, doc)
        loop = asyncio.get_running_loop()
        assert (path.stat().st_mode & 0o777) == 0o600  # was 0660 (issue #14 "Exposure")
        assert (path.parent.stat().st_mode & 0o777) == 0o700  # the agent made it
        assert path.stat().st_uid == os.geteuid()
        got = await loop.run_in_executor(None, fetch_status, path)
        assert got == json.loads(json.dumps(doc))
        health_answer = await loop.run_in_executor(
            None, raw_request, path, b"GET /healthz HTTP/1.0\r\n\r\n")
        assert health_answer.startswith(b"HTTP/1.0 503 Service Unavailable\r\n")
        other = await loop.run_in_executor(None, raw_request, path,
                                           b"GET /metrics HTTP/1.0\r\n\r\n")
        assert other.startswith(b"HTTP/1.0 404 ")
        post = await loop.run_in_executor(None, raw_request, path,
                                          b"POST /status HTTP/1.0\r\n\r\n")
        assert post.startswith(b"HTTP/1.0 405 ")
        garbage = await loop.run_in_executor(None, raw_request, path, b"hello\r\n\r\n")
        assert garbage.startswith(b"HTTP/1.0 400 ")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not path.exists()

    asyncio.run(main())


def test_the_api_serves_the_flow_records_only_when_the_agent_keeps_them(tmp_path: Path) -> None:
    async def status() -> dict[str, Any]:
        return {"node": "n1"}

    async def flows() -> dict[str, Any]:
        return {"flows": [{"src": "10.0.0.1"}], "records": 1}

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for path, provider, want in ((tmp_path / "on.sock", flows, b"HTTP/1.0 200 "),
                                     (tmp_path / "off.sock", None, b"HTTP/1.0 404 ")):
            server = StatusServer(path, status, flows=provider)
            await server.start()
            task = asyncio.create_task(server.serve())
            answer = await loop.run_in_executor(None, raw_request, path,
                                                b"GET /flows HTTP/1.0\r\n\r\n")
            assert answer.startswith(want), answer[:40]
            if provider is not None:
                got = await loop.run_in_executor(None, lambda p=path: fetch_status(
                    p, target="/flows"))
                assert got == {"flows": [{"src": "10.0.0.1"}], "records": 1}
            code = await loop.run_in_executor(None, lambda p=path: cli_main(
                ["flows", "--status-socket", str(p), "--json"]))
            assert code == (0 if provider is not None else 1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(main())


def test_a_dead_agents_socket_is_replaced_and_a_live_one_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "agent.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens: what a SIGKILLed agent leaves

    async def main() -> None:
        _, task = await serving(path, {"node": "n1"})
        with pytest.raises(StatusApiError, match="another agent is serving status here"):
            await serving(path, {"node": "n1"})
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())


def test_fetch_status_says_why_it_cannot_reach_the_agent(tmp_path: Path) -> None:
    with pytest.raises(StatusApiError, match="no agent status socket at"):
        fetch_status(tmp_path / "absent.sock")
    path = tmp_path / "dead.sock"
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(path))
    dead.close()
    with pytest.raises(StatusApiError, match="nothing answers"):
        fetch_status(path)


# -- metrics and logs --------------------------------------------------------------------

def test_the_dataplane_collector_exposes_peers_drops_and_svid_expiry() -> None:
    collector = DataplaneCollector()
    registry = CollectorRegistry()
    registry.register(collector)
    now = dt.datetime.now(dt.UTC).timestamp()
    collector.update([PeerSample("n2", now - 10, 500, 700), PeerSample("n3", None, 0, 0),
                      PeerSample("n4", now - 1000, 1, 2)],
                     {"guard_drops": (3, 252), "ingress_drops": (1, 84), "spoof_drops": (7, 588),
                      "ingress_audit": (5, 420), "out:c1": (9, 9)})
    collector.set_svid_expiry(now + 300)
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(generate_latest(registry).decode())
               for s in f.samples}
    assert samples[("tfcrypt_peers_by_handshake", (("state", "recent"),))] == 1
    assert samples[("tfcrypt_peers_by_handshake", (("state", "stale"),))] == 1
    assert samples[("tfcrypt_peers_by_handshake", (("state", "never"),))] == 1
    assert 10 <= samples[("tfcrypt_peer_handshake_age_seconds", (("peer", "n2"),))] < 60
    assert ("tfcrypt_peer_handshake_age_seconds", (("peer", "n3"),)) not in samples
    assert samples[("tfcrypt_peer_received_bytes_total", (("peer", "n2"),))] == 500
    assert samples[("tfcrypt_peer_sent_bytes_total", (("peer", "n2"),))] == 700
    assert samples[("tfcrypt_dropped_packets_total", (("reason", "guard"),))] == 3
    assert samples[("tfcrypt_dropped_bytes_total", (("reason", "strict_ingress"),))] == 84
    assert samples[("tfcrypt_strict_ingress_audit_packets_total", ())] == 5
    assert samples[("tfcrypt_dropped_packets_total", (("reason", "spoof"),))] == 7
    assert 250 < samples[("tfcrypt_svid_expiry_seconds", ())] <= 300

    collector.update([PeerSample("n2", now, 1, 1)], None)  # n3, n4 left; counters kept
    names = generate_latest(registry).decode()
    assert 'peer="n3"' not in names and 'reason="guard"} 3.0' in names


def desired(peers: dict[str, set[str]], local: dict[str, str],
            classes: dict[str, set[str]]) -> Desired:
    return Desired(local_class=local,
                   class_selectors={c: frozenset({"s" + c}) for c in classes},
                   selector_ips={"s" + c: frozenset(v) for c, v in classes.items()},
                   peers={f"key-{n}": PeerDesired(n, f"key-{n}", "10.77.0.1:51820",
                                                  frozenset(ips))
                          for n, ips in peers.items()},
                   selected_pair_count=sum(map(len, peers.values())),
                   missing_peers=frozenset(), audit=AuditReport(), conflicts=())


def test_change_summary_says_what_changed_in_one_set_of_fields() -> None:
    a = desired({"n2": {"10.0.2.1/32"}, "n3": {"10.0.3.1/32"}}, {"10.0.1.1": "c1"},
                {"c1": {"10.0.2.1", "10.0.3.1"}})
    b = desired({"n2": {"10.0.2.1/32", "10.0.2.2/32"}, "n4": {"10.0.4.1/32"}},
                {"10.0.1.1": "c1", "10.0.1.2": "c2"},
                {"c1": {"10.0.2.1", "10.0.2.2"}, "c2": {"10.0.4.1"}})
    assert change_summary(a, b) == {
        "peers": ["+n4", "-n3", "~n2"], "allowed_ips": "+2 -1", "classes": "+1 -0",
        "elements": "+3 -1", "selected_pairs": 3}
    assert change_summary(b, b) == {}
    assert change_summary(None, a)["peers"] == ["+n2", "+n3"]


def record(msg: str, **fields: Any) -> logging.LogRecord:
    rec = logging.LogRecord("tfcrypt.agent.loop", logging.INFO, __file__, 1, msg, None, None)
    if fields:
        rec.fields = fields
    return rec


def test_log_lines_are_one_event_each_in_text_and_json() -> None:
    rec = record("reconciled", event="dataplane_changed", peers=["+n2"],
                 ops={"wireguard": 1}, why="put workloads/n2/w1")
    text = TextFormatter().format(rec)
    assert text.endswith(" INFO tfcrypt.agent.loop: reconciled event=dataplane_changed "
                         'peers=+n2 ops=wireguard:1 why="put workloads/n2/w1"')
    doc = json.loads(JsonFormatter().format(rec))
    assert doc | {"ts": "-"} == {"ts": "-", "level": "info", "logger": "tfcrypt.agent.loop",
                                 "msg": "reconciled", "event": "dataplane_changed",
                                 "peers": ["+n2"], "ops": {"wireguard": 1},
                                 "why": "put workloads/n2/w1"}
    multi = record("first\nsecond")
    assert "\n" not in TextFormatter().format(multi)
    assert "\n" not in JsonFormatter().format(multi)


def test_the_table_lists_lingering_workloads_only_when_there_are_some() -> None:
    doc = {**healthy_status(),
           "lingering_workloads": {"count": 0, "grace_s": 30.0, "entries": []}}
    assert "Lingering" not in render(doc, NOW)
    doc["lingering_workloads"] = {"count": 1, "grace_s": 30.0, "entries": [
        {"key": "workloads/n1/w3", "node": "n1", "ips": ["10.0.0.3"], "ends_in_s": 12.5}]}
    assert ("Lingering workloads: 1: n1/w3 (12.5s left) (deleted, kept selected for 30s "
            "unless reused)") in render(doc, NOW).splitlines()



def test_refused_infrastructure_addresses_are_counted_shown_and_gauged() -> None:
    from prometheus_client import REGISTRY

    from tfcrypt.agent.reconcile import note_refused
    from tfcrypt.agent.status_report import refused_status

    doc = {**healthy_status(), "refused": refused_status({})}
    assert "Refused" not in render(doc, NOW)
    refused = {"10.77.0.2": "etcd endpoint", "10.77.0.11": "node address"}
    doc["refused"] = refused_status(refused)
    assert doc["refused"] == {"count": 2, "by_reason": {"etcd endpoint": 1, "node address": 1},
                              "entries": [{"ip": "10.77.0.2", "reason": "etcd endpoint"},
                                          {"ip": "10.77.0.11", "reason": "node address"}]}
    assert ("Refused addresses:   2: 10.77.0.2 (etcd endpoint), 10.77.0.11 (node address) "
            "(workload records claiming infrastructure: never selected)"
            ) in render(doc, NOW).splitlines()
    many = refused_status({f"10.77.1.{i}": "configured" for i in range(30)})
    assert "entries" not in many and many["by_reason"] == {"configured": 30}
    assert "Refused addresses:   30 configured 30" in render({**doc, "refused": many}, NOW)

    note_refused(dataclasses.replace(desired({}, {}, {}), refused=refused))
    sample = REGISTRY.get_sample_value
    assert sample("tfcrypt_refused_addresses", {"reason": "etcd endpoint"}) == 1
    assert sample("tfcrypt_refused_addresses", {"reason": "node address"}) == 1
    assert sample("tfcrypt_refused_addresses", {"reason": "configured"}) == 0
    note_refused(desired({}, {}, {}))
    assert sample("tfcrypt_refused_addresses", {"reason": "etcd endpoint"}) == 0


def test_the_table_names_the_trust_authorities_and_who_signed_the_records() -> None:
    """What an operator checks before revoking an old CA (docs/operations.md): both roots
    in the bundle, ours marked, and the records still signed under the old one."""
    trust = {"bundle_authorities": ["aa11", "bb22"], "svid_authority": "bb22",
             "records_by_authority": {"aa11": {"nodes": 1},
                                      "bb22": {"nodes": 1, "policies": 1}}}
    lines = render(healthy_status() | {"trust": trust}, NOW).splitlines()
    assert "Trust authorities:   aa11, bb22 (our SVID)" in lines
    assert "Records signed by:   aa11: 1 nodes; bb22: 1 nodes, 1 policies" in lines
