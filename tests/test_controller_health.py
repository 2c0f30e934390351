"""The controller's probe endpoints (/healthz, /readyz) and its --config, without a cluster.

What a user (the kubelet, an operator with curl) would notice:
- /healthz answers 200 while the reconcile loop turns, including a loop whose passes
  fail; 503 naming how long ago once a pass is stuck (the kubelet then restarts it).
- /readyz answers 503 until every kind is listed, then 200, leader or not.
- /metrics still serves the controller's Prometheus metrics on the same port.
- `--config` takes etcd and the prefix from the agents' file; flags and TFCRYPT_*
  variables win; a bad value names the file and key.
The controller loop runs for real here; its reconcile pass is replaced by one that
never returns (the wedge being simulated) or fails (etcd down), because a real pass
needs etcd and SPIRE (tests/test_controller_sync.py and test_controller_lab.py run
those). Time is a fake clock: nothing here waits for the stall limit.
"""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tfcrypt.cli import build_parser
from tfcrypt.controller import run as run_mod
from tfcrypt.controller.cli_run import etcd_settings
from tfcrypt.controller.health import Health, serve
from tfcrypt.errors import ConfigError


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.fixture
def endpoint() -> Iterator[tuple[Health, Clock, int]]:
    clock = Clock()
    health = Health(stall=90, clock=clock)
    server = serve("127.0.0.1", 0, health)
    try:
        yield health, clock, server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


class Cluster:
    """Only `synced`: the loop reads nothing else before calling reconcile."""

    def __init__(self, synced: bool) -> None:
        self.synced = synced


def loop_with(reconcile: Any, health: Health, synced: bool = True) -> run_mod.Controller:
    c = run_mod.Controller(None, Cluster(synced), "/nonexistent",  # type: ignore[arg-type]
                           health=health)
    c.reconcile = reconcile  # type: ignore[method-assign]
    return c


async def until(cond: Any) -> None:
    for _ in range(500):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition never held")


def test_healthz_fails_when_a_pass_is_stuck_and_not_before(
        endpoint: tuple[Health, Clock, int], monkeypatch: pytest.MonkeyPatch) -> None:
    health, clock, port = endpoint
    monkeypatch.setattr(run_mod, "DEBOUNCE", 0.0)

    async def scenario() -> None:
        stuck = asyncio.Event()

        async def never_returns() -> None:
            stuck.set()
            await asyncio.Event().wait()

        c = loop_with(never_returns, health)
        task = asyncio.create_task(c.run())
        c.changed()
        await stuck.wait()
        clock.t += 89
        assert (await asyncio.to_thread(get, port, "/healthz"))[0] == 200
        clock.t += 2
        code, body = await asyncio.to_thread(get, port, "/healthz")
        assert code == 503 and "wedged" in body and "91s ago" in body
        task.cancel()

    asyncio.run(scenario())


def test_healthz_stays_ok_while_passes_fail(
        endpoint: tuple[Health, Clock, int], monkeypatch: pytest.MonkeyPatch) -> None:
    """etcd down: every pass fails and is retried; a restart would not help, so the
    loop still counts as alive."""
    health, clock, port = endpoint
    monkeypatch.setattr(run_mod, "DEBOUNCE", 0.0)
    monkeypatch.setattr(run_mod, "RETRY", 0.0)
    calls = []

    async def fails() -> None:
        calls.append(clock.t)
        clock.t += 60  # each failing pass "takes" 60 s: beats still come between them
        raise ConnectionError("etcd unreachable")

    async def scenario() -> None:
        c = loop_with(fails, health)
        task = asyncio.create_task(c.run())
        c.changed()
        await until(lambda: len(calls) >= 4)
        task.cancel()

    asyncio.run(scenario())
    assert clock.t - 1000 >= 240 > health.stall
    code, body = get(port, "/healthz")
    assert code == 200, body


def test_healthz_fails_a_start_that_never_reaches_the_loop(
        endpoint: tuple[Health, Clock, int]) -> None:
    _health, clock, port = endpoint
    assert get(port, "/healthz")[0] == 200
    clock.t += 91
    code, body = get(port, "/healthz")
    assert code == 503 and "no loop yet" in body


def test_readyz_waits_for_the_listing_and_not_for_the_lease(
        endpoint: tuple[Health, Clock, int]) -> None:
    health, _clock, port = endpoint
    cluster = Cluster(synced=False)
    health.ready = lambda: cluster.synced
    code, body = get(port, "/readyz")
    assert code == 503 and "not listed" in body
    cluster.synced = True  # listed; this replica holds no Lease (there is none here)
    assert get(port, "/readyz")[0] == 200

    def broken() -> bool:
        raise RuntimeError("cache gone")
    health.ready = broken
    code, body = get(port, "/readyz")
    assert code == 503 and "cache gone" in body


def test_metrics_are_served_on_the_same_port_and_other_paths_are_404(
        endpoint: tuple[Health, Clock, int]) -> None:
    _health, _clock, port = endpoint
    code, body = get(port, "/metrics")
    assert code == 200 and "tfcrypt_controller_writes_total" in body
    assert get(port, "/nope")[0] == 404


# -- --config: the agents' file -------------------------------------------------------------

def run_args(*argv: str) -> Any:
    return build_parser().parse_args(["controller", "run", *argv])


def test_config_file_gives_etcd_prefix_and_infrastructure(tmp_path: Path) -> None:
    cfg = tmp_path / "tfcrypt.yaml"
    cfg.write_text("etcd: [http://10.9.0.5:2379]\nprefix: /x/v1\ninterface: tfcrypt0\n"
                   "infrastructure_cidrs: [192.168.0.0/24]\n")
    args = run_args("--config", str(cfg))
    endpoints, tls, infra = etcd_settings(args, {})
    assert endpoints == ("http://10.9.0.5:2379",) and tls is False
    assert args.prefix == "/x/v1"
    assert {"192.168.0.0/24", "10.9.0.5"} <= set(infra)
    args = run_args("--config", str(cfg), "--prefix", "/y/v1")
    endpoints, _, _ = etcd_settings(args, {"TFCRYPT_ETCD": "http://10.9.0.6:2379"})
    assert endpoints == ("http://10.9.0.6:2379",) and args.prefix == "/y/v1"
    args = run_args()
    endpoints, tls, _ = etcd_settings(args, {})
    assert endpoints == ("http://127.0.0.1:2379",) and not tls and args.prefix == "/tfcrypt/v1"


def test_a_bad_config_value_names_the_file_and_key(tmp_path: Path) -> None:
    cfg = tmp_path / "tfcrypt.yaml"
    cfg.write_text("etcd: [ftp://x]\n")
    with pytest.raises(ConfigError, match=r"tfcrypt.yaml: etcd"):
        etcd_settings(run_args("--config", str(cfg)), {})


# -- --watch-timeout ------------------------------------------------------------------------

def test_watch_timeout_reaches_every_watch_and_the_help_names_the_default(
        capsys: pytest.CaptureFixture[str]) -> None:
    """--watch-timeout is how the lab meets a real 410 (test_controller_faults_lab.py);
    its help states the default without importing kube.py, so this keeps them equal."""
    from kubernetes_asyncio import client

    from tfcrypt.controller import kube

    async def timeouts(value: int | None) -> set[int]:
        async with client.ApiClient() as api:
            return {k.watch_timeout for k in
                    kube.Cluster(api, lambda: None, watch_timeout=value).kinds}

    assert run_args().watch_timeout is None
    assert asyncio.run(timeouts(None)) == {kube.WATCH_TIMEOUT}
    assert asyncio.run(timeouts(run_args("--watch-timeout", "3").watch_timeout)) == {3}
    with pytest.raises(SystemExit):
        run_args("--watch-timeout", "0")
    assert "must be at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_args("--help")
    assert f"Default {kube.WATCH_TIMEOUT};" in " ".join(capsys.readouterr().out.split())
