"""The registry against real etcd on loopback: what a consumer and a publisher notice.

Every test starts its own etcd (random ports, temp data dir) and, where a link must break,
a TCP proxy process; fixtures stop them by PID. "Another client" is etcdctl, so what the
registry reports is checked against an independent reader and writer.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, TypeVar

import pytest
from etcd_fixture import ETCDCTL, EtcdCluster, EtcdServer, etcd, etcd_cluster, make_proxy

from tfcrypt.errors import ConfigError
from tfcrypt.registry import (
    Backoff,
    Deleted,
    Endpoint,
    Listed,
    Put,
    Registry,
    RegistryEvent,
    RegistryUnavailable,
    parse_endpoint,
)
from tfcrypt.registry import watch as watch_module

__all__ = ["etcd", "etcd_cluster", "make_proxy"]

T = TypeVar("T")
PREFIX = "/tfcrypt/v1"
FAST = Backoff(0.1, 2.0, 1.0)
WAIT = 30.0


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 90))


def etcd_view(server: EtcdServer | EtcdCluster, prefix: str = PREFIX) -> dict[str, bytes]:
    """What etcdctl (another client) reads under the prefix, keys made relative."""
    out = json.loads(server.etcdctl("get", "--prefix", prefix + "/", "-w", "json"))
    root = len(prefix) + 1
    return {
        base64.b64decode(kv["key"]).decode()[root:]: base64.b64decode(kv.get("value", ""))
        for kv in out.get("kvs", [])
    }


def etcd_lease_of(server: EtcdServer | EtcdCluster, rel_key: str) -> int | None:
    out = json.loads(server.etcdctl("get", f"{PREFIX}/{rel_key}", "-w", "json"))
    kvs = out.get("kvs", [])
    return int(kvs[0].get("lease", 0)) if kvs else None


def ctl(server: EtcdServer | EtcdCluster, *args: str) -> Coroutine[Any, Any, str]:
    return asyncio.to_thread(server.etcdctl, *args)


async def eventually(
    check: Callable[[], bool], what: Callable[[], object], timeout: float = WAIT
) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {timeout}s: {what()}")
        await asyncio.sleep(0.05)


async def put_until_accepted(writer: Registry, key: str, value: bytes) -> None:
    """Like an operator re-running the CLI: a write can fail while a new leader is elected."""
    deadline = time.monotonic() + WAIT
    while True:
        try:
            await writer.put(key, value)
            return
        except RegistryUnavailable:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


class Consumer:
    """Consumes `events()` like the agent does: replace on Listed, apply Put/Deleted."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.view: dict[str, bytes] = {}
        self.events: list[RegistryEvent] = []
        self.task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        async for event in self.registry.events():
            self.events.append(event)
            if isinstance(event, Listed):
                self.view = {k: item.value for k, item in event.items.items()}
            elif isinstance(event, Put):
                self.view[event.rel_key] = event.value
            elif isinstance(event, Deleted):
                self.view.pop(event.rel_key, None)

    async def __aenter__(self) -> Consumer:
        self.task = asyncio.create_task(self._run())
        await eventually(lambda: bool(self.events), lambda: "no Listed yet")
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.task is not None
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        if self.task.done() and not self.task.cancelled() and self.task.exception():
            raise self.task.exception()  # type: ignore[misc]

    def listed_count(self) -> int:
        return sum(isinstance(e, Listed) for e in self.events)

    async def sees(self, expected: Mapping[str, bytes], timeout: float = WAIT) -> None:
        await eventually(lambda: self.view == dict(expected), lambda: self.view, timeout)


async def sees_truth(consumer: Consumer, server: EtcdServer | EtcdCluster) -> None:
    truth = await asyncio.to_thread(etcd_view, server)
    await consumer.sees(truth)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("http://127.0.0.1:2379", Endpoint("127.0.0.1", 2379)),
        ("10.77.0.2:2379", Endpoint("10.77.0.2", 2379)),
        ("http://[::1]:2379/", Endpoint("[::1]", 2379)),
        ("https://10.0.0.1:2379", Endpoint("10.0.0.1", 2379)),
        ("ftp://10.0.0.1:2379", None),
        ("10.0.0.1", None),
        ("::1:2379", None),
        ("host:99999", None),
    ],
)
def test_endpoint_forms(text: str, expected: Endpoint | None) -> None:
    if expected is None:
        with pytest.raises(ConfigError):
            parse_endpoint(text)
    else:
        assert parse_endpoint(text) == expected


def test_backoff_grows_to_its_cap_and_jitter_only_shortens() -> None:
    delays = Backoff(0.2, 2.0, 5.0).delays()
    schedule = [next(delays) for _ in range(8)]
    ceilings = [0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0]
    assert all(0.8 * c <= d <= c for d, c in zip(schedule, ceilings, strict=True))
    with pytest.raises(ConfigError):
        Registry(["127.0.0.1:2379"], backoff=(1.0, 2.0, 0.5))
    with pytest.raises(ValueError):
        Registry(["127.0.0.1:2379"], prefix="tfcrypt")


def test_listed_then_put_and_deleted_from_another_client(etcd: EtcdServer) -> None:
    etcd.etcdctl("put", f"{PREFIX}/nodes/a", "A1")
    etcd.etcdctl("put", f"{PREFIX}0/not-ours", "x")
    etcd.etcdctl("put", "/tfcrypt/v10/not-ours-either", "x")

    async def scenario() -> None:
        async with Registry([etcd.endpoint], backoff=FAST) as reg, Consumer(reg) as consumer:
            first = consumer.events[0]
            assert isinstance(first, Listed)
            assert {k: i.value for k, i in first.items.items()} == {"nodes/a": b"A1"}
            assert reg.connected and reg.last_revision == first.revision

            await ctl(etcd, "put", f"{PREFIX}/nodes/b", "B1")
            await ctl(etcd, "put", f"{PREFIX}/nodes/a", "A2")
            await ctl(etcd, "del", f"{PREFIX}/nodes/b")
            await ctl(etcd, "put", "/tfcrypt/v10/x", "ignored")
            await consumer.sees({"nodes/a": b"A2"})

            changes = consumer.events[1:]
            assert [(type(e).__name__, e.rel_key) for e in changes] == [
                ("Put", "nodes/b"), ("Put", "nodes/a"), ("Deleted", "nodes/b"),
            ]
            revisions = [e.mod_revision for e in changes]
            assert revisions == sorted(revisions) and revisions[0] > first.revision
            assert reg.last_revision == revisions[-1]
            assert reg.relists == 0 and reg.reconnects == 0

    run(scenario())


def test_a_watch_that_goes_silent_is_noticed_by_the_probe_and_relisted(
        etcd: EtcdServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """The failure seen once in CI after a cluster member was killed: a watch stayed open
    and delivered nothing while probes of the member succeeded. Injected here at our own
    boundary (the real etcd and aetcd watch run; the first stream's events are dropped
    before the consumer sees them); the probe must find the undelivered put and relist."""
    real_pump = watch_module._pump
    streams = []

    async def silent_first(watch: Any, queue: asyncio.Queue[object]) -> None:
        streams.append(watch)
        if len(streams) > 1:
            return await real_pump(watch, queue)
        async for _ in watch:
            pass  # events vanish: a stalled stream
        await asyncio.Event().wait()

    monkeypatch.setattr(watch_module, "_pump", silent_first)
    etcd.etcdctl("put", f"{PREFIX}/nodes/a", "A1")

    async def scenario() -> None:
        async with Registry([etcd.endpoint], backoff=FAST, probe_interval=0.5) as reg, \
                Consumer(reg) as consumer:
            await ctl(etcd, "put", f"{PREFIX}/nodes/b", "B1")
            await consumer.sees({"nodes/a": b"A1", "nodes/b": b"B1"}, timeout=10)
            assert consumer.listed_count() == 2 and reg.relists == 1
            await ctl(etcd, "put", f"{PREFIX}/nodes/c", "C1")  # the new watch delivers
            await consumer.sees({"nodes/a": b"A1", "nodes/b": b"B1", "nodes/c": b"C1"})
            assert consumer.listed_count() == 2

    run(scenario())


def test_a_quiet_watch_is_not_relisted(etcd: EtcdServer) -> None:
    """Probes of a healthy watch with nothing to deliver (and writes outside the prefix)
    never relist."""
    etcd.etcdctl("put", f"{PREFIX}/nodes/a", "A1")

    async def scenario() -> None:
        async with Registry([etcd.endpoint], backoff=FAST, probe_interval=0.3) as reg, \
                Consumer(reg) as consumer:
            for i in range(8):
                await ctl(etcd, "put", f"{PREFIX}0/elsewhere", str(i))
                await asyncio.sleep(0.3)
            await ctl(etcd, "put", f"{PREFIX}/nodes/b", "B1")
            await consumer.sees({"nodes/a": b"A1", "nodes/b": b"B1"})
            await asyncio.sleep(1.0)
            assert reg.relists == 0 and consumer.listed_count() == 1

    run(scenario())


def test_closing_the_registry_ends_the_event_stream(etcd: EtcdServer) -> None:
    async def scenario() -> None:
        reg = Registry([etcd.endpoint], backoff=FAST)
        stream = reg.events()
        assert isinstance(await anext(stream), Listed)
        pending = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(0.2)
        await reg.aclose()
        with pytest.raises(StopAsyncIteration):
            await pending
        assert not reg.connected

    run(scenario())


def test_cli_operations_put_get_all_delete(etcd: EtcdServer) -> None:
    async def scenario() -> None:
        async with Registry([etcd.endpoint.removeprefix("http://")]) as reg:
            rev = await reg.put("policies/p1", b"\x00policy")
            await reg.put("nodes/n1", b"n1")
            assert etcd_view(etcd) == {"policies/p1": b"\x00policy", "nodes/n1": b"n1"}
            policies = await reg.get_all("policies/")
            assert dict(policies.items).keys() == {"policies/p1"}
            assert policies.items["policies/p1"].mod_revision == rev
            assert await reg.delete("policies/p1") is True
            assert await reg.delete("policies/p1") is False
            assert etcd_view(etcd) == {"nodes/n1": b"n1"}

    run(scenario())


PUBLISHER = """
import asyncio, sys
from tfcrypt.registry import Registry

async def main():
    reg = Registry([sys.argv[1]])
    await reg.publish(sys.argv[2], b"alive", ttl=2)
    print("published", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


def test_publish_keeps_record_past_3_ttl_and_killed_publisher_expires(etcd: EtcdServer) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", PUBLISHER, etcd.endpoint, "nodes/doomed"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        async def scenario() -> None:
            async with Registry([etcd.endpoint], backoff=FAST) as reg, Consumer(reg) as view:
                await reg.publish("nodes/me", b"v1", ttl=2)
                lease = reg.lease_id
                assert lease is not None and etcd_lease_of(etcd, "nodes/me") == lease
                assert proc.stdout is not None
                assert (await asyncio.to_thread(proc.stdout.readline)).strip() == "published"
                await view.sees({"nodes/me": b"v1", "nodes/doomed": b"alive"})

                await asyncio.sleep(3 * 2 + 1.5)
                assert etcd_view(etcd) == {"nodes/me": b"v1", "nodes/doomed": b"alive"}

                os.kill(proc.pid, signal.SIGKILL)
                await asyncio.to_thread(proc.wait)
                await view.sees({"nodes/me": b"v1"})
                assert any(
                    isinstance(e, Deleted) and e.rel_key == "nodes/doomed" for e in view.events
                )

                await reg.publish("nodes/me", b"v2", ttl=2)
                assert reg.lease_id == lease
                assert etcd_view(etcd) == {"nodes/me": b"v2"}
                assert etcd_lease_of(etcd, "nodes/me") == lease

                await reg.unpublish()
                assert etcd_view(etcd) == {}
                await view.sees({})
                assert reg.lease_id is None

        run(scenario())
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def test_publish_moves_record_to_new_key_and_new_ttl(etcd: EtcdServer) -> None:
    async def scenario() -> None:
        async with Registry([etcd.endpoint], backoff=FAST) as reg:
            await reg.publish("nodes/old-name", b"v", ttl=5)
            first = reg.lease_id
            await reg.publish("nodes/new-name", b"v", ttl=5)
            assert etcd_view(etcd) == {"nodes/new-name": b"v"}
            assert reg.lease_id == first
            await reg.publish("nodes/new-name", b"v", ttl=3)
            assert reg.lease_id != first
            assert etcd_lease_of(etcd, "nodes/new-name") == reg.lease_id
            assert etcd_view(etcd) == {"nodes/new-name": b"v"}

    run(scenario())


def test_etcd_restart_gives_fresh_listed_and_keeps_publishing(etcd: EtcdServer) -> None:
    etcd.etcdctl("put", f"{PREFIX}/workloads/n1/w1", "w1")
    etcd.etcdctl("put", f"{PREFIX}/workloads/n1/w2", "w2")

    async def scenario() -> None:
        slow_retry = Backoff(1.0, 2.0, 2.0)
        async with (
            Registry([etcd.endpoint], backoff=slow_retry) as reg,
            Registry([etcd.endpoint], backoff=FAST) as publisher,
            Consumer(reg) as consumer,
        ):
            await publisher.publish("nodes/me", b"me", ttl=2)
            await sees_truth(consumer, etcd)

            await asyncio.to_thread(etcd.stop)
            await asyncio.sleep(3)
            assert not reg.connected and reg.last_error
            with pytest.raises(RegistryUnavailable):
                await reg.put("policies/p", b"x")

            await asyncio.to_thread(etcd.start)
            await ctl(etcd, "del", f"{PREFIX}/workloads/n1/w1")
            await ctl(etcd, "put", f"{PREFIX}/workloads/n1/w3", "w3")
            await consumer.sees({"workloads/n1/w2": b"w2", "workloads/n1/w3": b"w3",
                                 "nodes/me": b"me"})
            assert consumer.listed_count() >= 2 and reg.relists >= 1
            assert reg.connected and reg.reconnects >= 1
            assert etcd_lease_of(etcd, "nodes/me") == publisher.lease_id

    run(scenario())


def test_publisher_cut_off_longer_than_ttl_regrants_lease(etcd: EtcdServer, make_proxy) -> None:
    proxy = make_proxy(etcd.client_port)

    async def scenario() -> None:
        async with (
            Registry([proxy.endpoint], backoff=FAST, request_timeout=1.0) as publisher,
            Registry([etcd.endpoint], backoff=FAST) as reg,
            Consumer(reg) as consumer,
        ):
            await publisher.publish("nodes/me", b"me", ttl=2)
            first_lease = publisher.lease_id
            await consumer.sees({"nodes/me": b"me"})

            proxy.stop()
            await consumer.sees({})
            assert etcd_view(etcd) == {}

            proxy.start()
            await consumer.sees({"nodes/me": b"me"})
            assert publisher.lease_id not in (None, first_lease)
            assert etcd_lease_of(etcd, "nodes/me") == publisher.lease_id

    run(scenario())


def test_compaction_while_disconnected_relists_to_the_right_view(
    etcd: EtcdServer, make_proxy
) -> None:
    proxy = make_proxy(etcd.client_port)
    for i in range(3):
        etcd.etcdctl("put", f"{PREFIX}/workloads/n1/w{i}", f"v{i}")

    async def scenario() -> None:
        async with Registry([proxy.endpoint], backoff=FAST) as reg, Consumer(reg) as consumer:
            await sees_truth(consumer, etcd)
            proxy.stop()
            await eventually(lambda: not reg.connected, lambda: "still connected")

            await ctl(etcd, "del", f"{PREFIX}/workloads/n1/w0")
            await ctl(etcd, "put", f"{PREFIX}/workloads/n1/w1", "changed")
            await ctl(etcd, "put", f"{PREFIX}/workloads/n2/new", "new")
            status = json.loads(await ctl(etcd, "endpoint", "status", "-w", "json"))
            await ctl(etcd, "compact", str(status[0]["Status"]["header"]["revision"]))

            relists = reg.relists
            proxy.start()
            await consumer.sees(
                {"workloads/n1/w1": b"changed", "workloads/n1/w2": b"v2",
                 "workloads/n2/new": b"new"}
            )
            assert reg.relists > relists
            assert not any(
                isinstance(e, Deleted) and e.rel_key == "workloads/n1/w0" for e in consumer.events
            ), "the deletion is seen through the relist, not replayed from compacted history"

            await ctl(etcd, "put", f"{PREFIX}/workloads/n2/after", "after")
            await sees_truth(consumer, etcd)

    run(scenario())


def test_cluster_keeps_working_with_one_member_killed(etcd_cluster: EtcdCluster) -> None:
    etcd_cluster.etcdctl("put", f"{PREFIX}/nodes/a", "a")

    async def scenario() -> None:
        endpoints = etcd_cluster.endpoints
        async with (
            Registry(endpoints, backoff=FAST, request_timeout=2.0) as reg,
            Registry(endpoints, backoff=FAST, request_timeout=2.0) as writer,
            Consumer(reg) as consumer,
        ):
            await reg.publish("nodes/me", b"me", ttl=3)
            await consumer.sees({"nodes/a": b"a", "nodes/me": b"me"})

            await asyncio.to_thread(etcd_cluster.members[0].kill)
            await put_until_accepted(writer, "nodes/b", b"b")
            await writer.delete("nodes/a")
            await consumer.sees({"nodes/b": b"b", "nodes/me": b"me"})
            listed = await writer.get_all("nodes/")
            assert {k: i.value for k, i in listed.items.items()} == consumer.view

            await asyncio.sleep(3 + 1)
            await reg.publish("nodes/me", b"me2", ttl=3)
            await consumer.sees({"nodes/b": b"b", "nodes/me": b"me2"})
            assert etcd_view(etcd_cluster)["nodes/me"] == b"me2"

    run(scenario())


def test_cluster_member_that_hangs_is_left_for_another(etcd_cluster: EtcdCluster) -> None:
    """SIGSTOP keeps the TCP connection open but answers nothing: the probe notices."""

    async def scenario() -> None:
        endpoints = etcd_cluster.endpoints
        async with (
            Registry(endpoints, backoff=FAST, request_timeout=1.0, probe_interval=1.0) as reg,
            Registry(endpoints, backoff=FAST, request_timeout=1.0) as writer,
            Consumer(reg) as consumer,
        ):
            await writer.put("nodes/a", b"a")
            await consumer.sees({"nodes/a": b"a"})

            etcd_cluster.members[0].pause()
            await put_until_accepted(writer, "nodes/b", b"b")
            await consumer.sees({"nodes/a": b"a", "nodes/b": b"b"})
            assert reg.relists >= 1 and reg.reconnects >= 1
            assert reg.status().endpoint != endpoints[0].removeprefix("http://")

    run(scenario())


def test_a_list_in_pages_sees_one_revision_and_every_key(etcd: EtcdServer) -> None:
    """100,000 records do not fit one gRPC answer, so the list reads pages; every page is
    read at the first page's revision: a write landing between pages is not in the list
    (the watch from revision+1 delivers it), and no key is lost at a page boundary."""
    import aetcd

    from tfcrypt.registry.keys import Keyspace
    from tfcrypt.registry.watch import list_prefix

    for i in range(25):
        etcd.etcdctl("put", f"{PREFIX}/workloads/w{i:02d}", f"v{i}")
    etcd.etcdctl("put", f"{PREFIX}0/not-ours", "x")

    async def scenario() -> None:
        host, port = etcd.endpoint.removeprefix("http://").split(":")
        async with aetcd.Client(host=host, port=int(port)) as client:
            await client.connect()
            pages = 0
            real_range = client.kvstub.Range

            async def range_then_write(request, **kw):  # type: ignore[no-untyped-def]
                nonlocal pages
                pages += 1
                if pages == 2:
                    await client.put(f"{PREFIX}/workloads/late".encode(), b"late")
                return await real_range(request, **kw)

            client.kvstub.Range = range_then_write
            listed = await list_prefix(client, Keyspace(PREFIX), f"{PREFIX}/".encode(), page=4)
        assert pages == 7  # 25 keys in pages of 4
        assert {k: i.value for k, i in listed.items.items()} == {
            f"workloads/w{i:02d}": f"v{i}".encode() for i in range(25)}
        assert "workloads/late" not in listed.items

    run(scenario())


def test_a_key_of_any_bytes_is_delivered_printable_and_deletable_by_that_name(
        etcd: EtcdServer) -> None:
    """Another client writes keys that are not UTF-8 or hold a bidi override: the list
    and the watch hand them out escaped (strictly encodable, printable), and the escaped
    name deletes exactly that key."""
    def raw_put(key: bytes, value: bytes) -> None:
        subprocess.run([ETCDCTL, "--endpoints", etcd.endpoint, "put", key, value],
                       env={**os.environ, "ETCDCTL_API": "3"}, check=True,
                       capture_output=True, timeout=20)

    listed_key, watched_key = b"nodes/\xff\xfe", "nodes/\u202eevil".encode()
    raw_put(f"{PREFIX}/".encode() + listed_key, b"junk")

    async def scenario() -> None:
        async with Registry([etcd.endpoint], backoff=FAST) as reg, Consumer(reg) as consumer:
            await consumer.sees({"nodes/\\xff\\xfe": b"junk"})
            await asyncio.to_thread(raw_put, f"{PREFIX}/".encode() + watched_key, b"x")
            await consumer.sees({"nodes/\\xff\\xfe": b"junk", "nodes/\\u202eevil": b"x"})
            assert all(k.isprintable() for k in consumer.view)
            assert await reg.delete("nodes/\\xff\\xfe") is True
            await consumer.sees({"nodes/\\u202eevil": b"x"})
            assert (await reg.get_all("nodes/")).items.keys() == {"nodes/\\u202eevil"}

    run(scenario())
    out = json.loads(etcd.etcdctl("get", "--prefix", PREFIX + "/", "-w", "json"))
    assert [base64.b64decode(kv["key"]) for kv in out["kvs"]] == [
        f"{PREFIX}/".encode() + watched_key]


def test_an_overwrite_with_bytes_we_once_wrote_is_put_back_and_our_echo_is_not(
        etcd: EtcdServer) -> None:
    """Echoes are told by revision, not by value (issue 14 item 3): another client writing
    back a value this publisher itself published earlier is an overwrite, and the keeper
    puts the current record back on its lease; our own put's revision is no overwrite."""
    async def scenario() -> None:
        async with Registry([etcd.endpoint], backoff=FAST) as reg:
            await reg.publish("nodes/n2", b"old", ttl=30)
            await reg.publish("nodes/n2", b"new", ttl=30)
            ours = reg.own_revision
            assert ours is not None and not reg.recheck_published(ours)
            await ctl(etcd, "put", f"{PREFIX}/nodes/n2", "old")   # no lease
            out = json.loads(await ctl(etcd, "get", f"{PREFIX}/nodes/n2", "-w", "json"))
            assert reg.recheck_published(int(out["kvs"][0]["mod_revision"]))
            await eventually(lambda: etcd_view(etcd) == {"nodes/n2": b"new"},
                             lambda: etcd_view(etcd))
            assert etcd_lease_of(etcd, "nodes/n2") == reg.lease_id
            assert reg.reasserted == 1 and reg.own_revision != ours

    run(scenario())
