"""Real etcd on loopback for tests: one member, a three-member cluster, and a cuttable proxy.

Rules:
- Only 127.0.0.1, on ports the kernel handed out free just before start.
- Every process started here is stopped by its own PID, every data dir created here is
  removed, also when the test fails: use the `etcd`/`etcd_cluster`/`make_proxy` fixtures
  (or `with`), which clean up in `finally`.
- A member keeps its data dir across stop()/start(), like a restarted daemon.
- `TcpProxy` is a separate process that forwards one port to another; killing it cuts
  every connection through it, which is how a test breaks one client's link to etcd while
  other clients keep writing.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

ETCD = "/usr/bin/etcd"
ETCDCTL = "/usr/bin/etcdctl"
HOST = "127.0.0.1"
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {HOST}:{port} after {timeout}s")


class EtcdServer:
    """One etcd member: start/stop (SIGTERM)/kill (SIGKILL)/pause (SIGSTOP)/resume."""

    def __init__(
        self,
        tmp_path: Path,
        name: str | None = None,
        *,
        client_port: int | None = None,
        peer_port: int | None = None,
        initial_cluster: str | None = None,
        cluster_token: str | None = None,
    ) -> None:
        self.name = name or f"e{uuid.uuid4().hex[:8]}"
        self.client_port = client_port or free_port()
        self.peer_port = peer_port or free_port()
        self.dir = tmp_path / f"etcd-{self.name}"
        self.data_dir = self.dir / "data"
        self.log_path = self.dir / "etcd.log"
        self.initial_cluster = initial_cluster or f"{self.name}={self.peer_url}"
        self.cluster_token = cluster_token or f"tok-{self.name}"
        self.proc: subprocess.Popen[bytes] | None = None
        self._started_once = False

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{HOST}:{self.peer_port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def launch(self) -> EtcdServer:
        """Start the process without waiting for health (cluster members need each other)."""
        if self.running:
            return self
        self.dir.mkdir(parents=True, exist_ok=True)
        state = "existing" if self._started_once else "new"
        args = [
            ETCD,
            "--name", self.name,
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", self.endpoint,
            "--advertise-client-urls", self.endpoint,
            "--listen-peer-urls", self.peer_url,
            "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", self.initial_cluster,
            "--initial-cluster-state", state,
            "--initial-cluster-token", self.cluster_token,
            "--logger", "zap",
            "--log-outputs", "stderr",
        ]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        self._started_once = True
        return self

    def wait_healthy(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running:
                raise RuntimeError(f"etcd {self.name} exited; log:\n{self.log_tail()}")
            with contextlib.suppress(OSError), _DIRECT.open(
                f"{self.endpoint}/health", timeout=1
            ) as resp:
                if b'"true"' in resp.read():
                    return
            time.sleep(0.1)
        raise TimeoutError(f"etcd {self.name} not healthy after {timeout}s:\n{self.log_tail()}")

    def start(self) -> EtcdServer:
        self.launch()
        self.wait_healthy()
        return self

    def _signal_and_wait(self, sig: signal.Signals) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            os.kill(self.proc.pid, sig)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None

    def stop(self) -> None:
        self._signal_and_wait(signal.SIGTERM)

    def kill(self) -> None:
        self._signal_and_wait(signal.SIGKILL)

    def pause(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def cleanup(self) -> None:
        """Kill the process if any and remove this member's directory."""
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def etcdctl(self, *args: str, endpoints: str | None = None) -> str:
        """Run etcdctl against this member (or `endpoints`) and return its stdout."""
        out = subprocess.run(
            [ETCDCTL, "--endpoints", endpoints or self.endpoint, *args],
            env={**os.environ, "ETCDCTL_API": "3"},
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        )
        return out.stdout

    def __enter__(self) -> EtcdServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


class EtcdCluster:
    """Three (or `size`) members on distinct loopback ports, one cluster token."""

    def __init__(self, tmp_path: Path, size: int = 3) -> None:
        run = uuid.uuid4().hex[:6]
        names = [f"m{run}{i}" for i in range(size)]
        peers = {n: free_port() for n in names}
        initial = ",".join(f"{n}=http://{HOST}:{p}" for n, p in peers.items())
        self.members = [
            EtcdServer(
                tmp_path, n, peer_port=peers[n], initial_cluster=initial,
                cluster_token=f"tok-{run}",
            )
            for n in names
        ]

    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members]

    def start(self) -> EtcdCluster:
        for m in self.members:
            m.launch()
        for m in self.members:
            m.wait_healthy()
        return self

    def etcdctl(self, *args: str) -> str:
        live = [m.endpoint for m in self.members if m.running]
        return self.members[0].etcdctl(*args, endpoints=",".join(live))

    def cleanup(self) -> None:
        for m in self.members:
            m.cleanup()

    def __enter__(self) -> EtcdCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


_PROXY_SCRIPT = r"""
import asyncio, sys

async def pipe(r, w):
    try:
        while data := await r.read(65536):
            w.write(data)
            await w.drain()
    except OSError:
        pass
    finally:
        w.close()

async def handle(cr, cw):
    try:
        ur, uw = await asyncio.open_connection("127.0.0.1", int(sys.argv[2]))
    except OSError:
        cw.close()
        return
    await asyncio.gather(pipe(cr, uw), pipe(ur, cw))

async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", int(sys.argv[1]))
    async with server:
        await server.serve_forever()

asyncio.run(main())
"""


class TcpProxy:
    """127.0.0.1:port -> 127.0.0.1:target in its own process; stop() cuts all connections."""

    def __init__(self, target_port: int) -> None:
        self.port = free_port()
        self.target_port = target_port
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self) -> TcpProxy:
        if self.proc is None:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _PROXY_SCRIPT, str(self.port), str(self.target_port)],
                stdin=subprocess.DEVNULL,
            )
            _wait_port(self.port, 10)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            self.proc = None


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[EtcdServer]:
    server = EtcdServer(tmp_path)
    try:
        yield server.start()
    finally:
        server.cleanup()


@pytest.fixture
def etcd_cluster(tmp_path: Path) -> Iterator[EtcdCluster]:
    cluster = EtcdCluster(tmp_path)
    try:
        yield cluster.start()
    finally:
        cluster.cleanup()


@pytest.fixture
def make_proxy() -> Iterator[object]:
    proxies: list[TcpProxy] = []

    def make(target_port: int) -> TcpProxy:
        proxy = TcpProxy(target_port)
        proxies.append(proxy)
        return proxy.start()

    try:
        yield make
    finally:
        for p in proxies:
            p.stop()
