"""The registry over mutual TLS against a real etcd on loopback (no lab needed).

A lab CA (spire/lab_workload_api) signs etcd's certificate (IP SAN 127.0.0.1) and the
clients' X509-SVIDs; etcd requires a client certificate from that bundle. Proves:
- a client without a certificate, or with one from another CA, is refused by etcd;
- a registry with an SVID lists, watches and writes;
- a rotated SVID moves the registry to a new connection whose client certificate is the
  new one, and the watch goes on from its revision: no relist, every change seen once,
  including those written while the credentials were being replaced.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aetcd
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from etcd_fixture import ETCD, ETCDCTL, HOST, free_port
from lab_workload_api.ca import LabCA
from test_registry import Consumer, run

from netns_lab.etcd_tls import Issuer, issue
from tfcrypt.registry import (
    Listed,
    Put,
    Registry,
    RegistryUnavailable,
    TlsCredentials,
    credentials_from_svid,
)
from tfcrypt.registry.connection import Connection
from tfcrypt.registry.endpoints import Backoff, Endpoint
from tfcrypt.registry.keys import Keyspace
from tfcrypt.registry.tls import TlsClient
from tfcrypt.registry.watch import WatchStream

TD = "tls.test"


@dataclass
class TlsEtcd:
    endpoint: str
    ca: LabCA
    dir: Path
    proc: subprocess.Popen[bytes]

    def svid(self, name: str, ca: LabCA | None = None) -> TlsCredentials:
        issued = (ca or self.ca).issue(f"spiffe://{TD}/tfcrypt/node/{name}",
                                       dt.timedelta(minutes=10))
        return credentials_from_svid(issued.key, issued.chain, [self.ca.cert])

    def files(self, creds: TlsCredentials) -> list[str]:
        """etcdctl flags for `creds` (written to files)."""
        paths = []
        for part, data in (("ca", creds.root_pem), ("cert", creds.chain_pem),
                           ("key", creds.key_pem)):
            path = self.dir / f"{creds.serial:x}.{part}.pem"
            path.write_bytes(data)
            paths.append(str(path))
        return ["--cacert", paths[0], "--cert", paths[1], "--key", paths[2]]

    def etcdctl(self, *args: str, creds: TlsCredentials | None = None,
                check: bool = True) -> subprocess.CompletedProcess[str]:
        flags = self.files(creds) if creds else ["--cacert", str(self.dir / "bundle.pem")]
        return subprocess.run([ETCDCTL, "--endpoints", self.endpoint, "--dial-timeout", "2s",
                               "--command-timeout", "3s", *flags, *args],
                              capture_output=True, text=True, check=check,
                              env={**os.environ, "ETCDCTL_API": "3"})


@pytest.fixture
def tls_etcd(tmp_path: Path) -> Iterator[TlsEtcd]:
    ca = LabCA.generate(TD)
    cert, key = issue(Issuer(ca.key, ca.cert), f"spiffe://{TD}/tfcrypt/etcd/e1",
                      ips=(HOST,), dns=("e1.etcd.tls.test",))
    (tmp_path / "server.crt").write_bytes(cert)
    (tmp_path / "server.key").write_bytes(key)
    (tmp_path / "bundle.pem").write_bytes(ca.cert.public_bytes(serialization.Encoding.PEM))
    client, peer = free_port(), free_port()
    url = f"https://{HOST}:{client}"
    log = open(tmp_path / "etcd.log", "wb")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen(
        [ETCD, "--name", "e1", "--data-dir", str(tmp_path / "data"),
         "--listen-client-urls", url, "--advertise-client-urls", url,
         "--listen-peer-urls", f"http://{HOST}:{peer}",
         "--initial-advertise-peer-urls", f"http://{HOST}:{peer}",
         "--initial-cluster", f"e1=http://{HOST}:{peer}",
         "--cert-file", str(tmp_path / "server.crt"), "--key-file", str(tmp_path / "server.key"),
         "--client-cert-auth", "--trusted-ca-file", str(tmp_path / "bundle.pem"),
         "--logger", "zap", "--log-outputs", "stderr"],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    server = TlsEtcd(url, ca, tmp_path, proc)
    try:
        admin = server.svid("admin")
        deadline = time.monotonic() + 20
        while server.etcdctl("endpoint", "health", creds=admin, check=False).returncode:
            assert proc.poll() is None, (tmp_path / "etcd.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "TLS etcd not healthy"
            time.sleep(0.2)
        yield server
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()


def test_etcd_refuses_a_client_without_a_certificate_or_from_another_ca(
        tls_etcd: TlsEtcd) -> None:
    no_cert = tls_etcd.etcdctl("get", "x", check=False)
    assert no_cert.returncode != 0
    foreign = tls_etcd.etcdctl("get", "x", creds=tls_etcd.svid("n9", LabCA.generate(TD)),
                               check=False)
    assert foreign.returncode != 0
    log = (tls_etcd.dir / "etcd.log").read_text()
    assert "client didn't provide a certificate" in log
    assert "certificate signed by unknown authority" in log

    async def plaintext_registry() -> None:
        plain = Registry([tls_etcd.endpoint.replace("https://", "")], request_timeout=2.0)
        try:
            with pytest.raises(RegistryUnavailable):
                await plain.get_all()
        finally:
            await plain.aclose()

    run(plaintext_registry())


def test_a_registry_without_credentials_waits_and_one_with_an_svid_works(
        tls_etcd: TlsEtcd) -> None:
    async def scenario() -> None:
        reg = Registry([tls_etcd.endpoint], tls=True, request_timeout=3.0)
        events = reg.events()
        first = asyncio.ensure_future(anext(events))
        await asyncio.sleep(0.5)
        assert not first.done()  # no certificate yet: nothing is attempted
        reg.set_credentials(tls_etcd.svid("n1"))
        assert isinstance(await asyncio.wait_for(first, 10), Listed)
        await reg.put("nodes/n1", b"hello")
        assert (await reg.get_all("nodes/")).items["nodes/n1"].value == b"hello"
        await events.aclose()
        await reg.aclose()

    run(scenario())


def test_a_rotated_svid_replaces_the_connection_and_the_watch_keeps_its_revision(
        tls_etcd: TlsEtcd) -> None:
    async def scenario() -> None:
        reader = Registry([tls_etcd.endpoint], tls=True, request_timeout=3.0)
        writer = Registry([tls_etcd.endpoint], tls=True, request_timeout=3.0)
        writer.set_credentials(tls_etcd.svid("writer"))
        first = tls_etcd.svid("n1")
        reader.set_credentials(first)
        try:
            async with Consumer(reader) as consumer:
                await writer.put("nodes/a", b"1")
                await consumer.sees({"nodes/a": b"1"})
                old_client = reader._conn.client()
                for i in range(3):  # rotations with writes around them
                    await writer.put(f"nodes/during{i}", b"x")
                    last = tls_etcd.svid("n1")
                    reader.set_credentials(last)
                    await writer.put(f"nodes/after{i}", b"y")
                await writer.put("nodes/a", b"2")
                want = {"nodes/a": b"2", **{f"nodes/during{i}": b"x" for i in range(3)},
                        **{f"nodes/after{i}": b"y" for i in range(3)}}
                await consumer.sees(want)
                assert consumer.listed_count() == 1  # no relist
                # a rotation replaces a connection only if one was made since the last
                assert reader.relists == 0 and 1 <= reader.status().credential_rotations <= 3
                puts = [e.rel_key for e in consumer.events if isinstance(e, Put)]
                assert len(puts) == len(set(puts)) + 1  # nodes/a twice, nothing repeated
                current = reader._conn.client()
                assert isinstance(current, TlsClient) and current is not old_client
                assert current.credentials == last and last.serial != first.serial
                leaf = x509.load_pem_x509_certificate(current.credentials.chain_pem)
                assert leaf.serial_number == current.credentials.serial
        finally:
            await reader.aclose()
            await writer.aclose()

    run(scenario())


# -- the resume point, without etcd: one revision holding several events ------------------

def _event(key: str, revision: int) -> aetcd.Event:
    from aetcd import rpc
    return aetcd.Event(rpc.Event.EventType.PUT,
                       rpc.KeyValue(key=f"/tfcrypt/v1/{key}".encode(), value=b"v",
                                    mod_revision=revision))


class _FakeWatch:
    """aetcd's Watch over a fixed history; holds back everything after `pause_after`
    events until `gate` is set, then stays open."""

    def __init__(self, events: list[aetcd.Event], gate: asyncio.Event | None,
                 pause_after: int) -> None:
        self._events, self._gate, self._pause_after = events, gate, pause_after

    async def _gen(self) -> AsyncIterator[aetcd.Event]:
        for i, event in enumerate(self._events):
            if self._gate is not None and i == self._pause_after:
                await self._gate.wait()
            yield event
        await asyncio.Event().wait()

    def __aiter__(self) -> AsyncIterator[aetcd.Event]:
        return self._gen()

    async def cancel(self) -> None:
        return None


class _FakeClient:
    def __init__(self, history: list[aetcd.Event], gate: asyncio.Event | None = None,
                 pause_after: int = 0) -> None:
        self.history, self.gate, self.pause_after = history, gate, pause_after

    async def watch_prefix(self, key: bytes, start_revision: int) -> _FakeWatch:
        return _FakeWatch([e for e in self.history if e.kv.mod_revision >= start_revision],
                          self.gate, self.pause_after)


def test_new_credentials_in_the_middle_of_a_revision_resume_without_loss_or_repeat() -> None:
    """Revision 5 holds a, b, c (one transaction); new credentials arrive after a was
    delivered, and again before the next watch delivered anything: the last watch starts
    at 5 and skips a only."""
    history = [_event("a", 5), _event("b", 5), _event("c", 5), _event("d", 6)]

    async def scenario() -> list[str]:
        conn = Connection((Endpoint("127.0.0.1", 1),), 1.0, tls=True)
        dummy = TlsCredentials(b"r", b"k", b"c", 1)
        conn.set_credentials(dummy)
        conn.client()
        stream = WatchStream(conn, Keyspace("/tfcrypt/v1"), Backoff(), 60.0, set())
        gate = asyncio.Event()
        seen: list[str] = []
        first = stream._watch(_FakeClient(history, gate, pause_after=1), 5)  # type: ignore[arg-type]
        assert await anext(first) is None
        event = await anext(first)
        assert event is not None
        seen.append(event.rel_key)
        conn.set_credentials(TlsCredentials(b"r", b"k", b"c", 2))
        gate.set()
        async for event in first:
            assert event is not None
            seen.append(event.rel_key)
        assert stream._resume == (5, 1)
        # rotated again before the next watch delivered anything: still (5, 1)
        held = stream._watch(_FakeClient(history, asyncio.Event(), 0),  # type: ignore[arg-type]
                             *stream._resume)
        assert await anext(held) is None
        conn.client()
        conn.set_credentials(TlsCredentials(b"r", b"k", b"c", 3))
        async for event in held:
            raise AssertionError(f"held watch delivered {event}")
        assert stream._resume == (5, 1)
        second = stream._watch(_FakeClient(history), *stream._resume)  # type: ignore[arg-type]
        assert await anext(second) is None
        with contextlib.suppress(TimeoutError):  # a lost event shows as a shorter list
            for _ in range(3):
                event = await asyncio.wait_for(anext(second), 2)
                assert event is not None
                seen.append(event.rel_key)
        await second.aclose()
        await conn.aclose()
        return seen

    assert run(scenario()) == ["a", "b", "c", "d"]
