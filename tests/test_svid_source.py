"""The agent's SVID source against the real lab Workload API server (a subprocess) and
against a server that serves garbage: it waits, reconnects, counts, and never crashes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from spiffe._proto import workload_pb2, workload_pb2_grpc
from wlapi_server import N1, Server, server_config

from tfcrypt.identity.svid_source import SvidSource, SvidUpdate

STEP = 20.0


def make_server(d: Path, ttl: float = 300) -> Server:
    config = d / "config.json"
    config.write_text(json.dumps(server_config(d, ttl)))
    return Server(d, config)


async def next_update(updates: AsyncIterator[SvidUpdate]) -> SvidUpdate:
    return await asyncio.wait_for(anext(updates), timeout=STEP)


def test_waits_for_a_missing_socket_then_follows_rotations(workdir: Path) -> None:
    server = make_server(workdir, ttl=4)

    async def scenario() -> None:
        source = SvidSource(str(workdir / "n1.sock"), poll_interval=0.2)
        updates = source.updates()
        first_task = asyncio.ensure_future(next_update(updates))
        await asyncio.sleep(1.0)
        assert source.state.waiting_for_socket
        await asyncio.to_thread(server.start)
        first = await first_task
        assert first.spiffe_id == N1
        assert "lab.tfcrypt" in first.bundles
        second = await next_update(updates)
        assert second.serial != first.serial
        await updates.aclose()

    try:
        asyncio.run(scenario())
    finally:
        server.kill()


def test_survives_a_server_restart(workdir: Path) -> None:
    server = make_server(workdir)
    server.start()

    async def scenario() -> None:
        source = SvidSource(str(workdir / "n1.sock"), poll_interval=0.2)
        updates = source.updates()
        first = await next_update(updates)
        await asyncio.to_thread(server.stop, signal.SIGKILL)
        await asyncio.to_thread(server.start)
        second = await next_update(updates)
        assert second.serial != first.serial
        assert second.bundles == first.bundles  # same CA: the state dir was kept
        await updates.aclose()

    try:
        asyncio.run(scenario())
    finally:
        server.kill()


class GarbageService(workload_pb2_grpc.SpiffeWorkloadAPIServicer):
    """Serves an SVID response whose certificates and key are not DER."""

    async def FetchX509SVID(self, request, context):  # type: ignore[no-untyped-def]
        yield workload_pb2.X509SVIDResponse(svids=[workload_pb2.X509SVID(
            spiffe_id=N1, x509_svid=b"not a certificate", x509_svid_key=b"not a key",
            bundle=b"not a bundle")])
        await asyncio.sleep(3600)


@contextlib.asynccontextmanager
async def garbage_server(path: Path) -> AsyncIterator[None]:
    server = grpc.aio.server()
    workload_pb2_grpc.add_SpiffeWorkloadAPIServicer_to_server(GarbageService(), server)
    server.add_insecure_port(f"unix:{path}")
    await server.start()
    try:
        yield
    finally:
        await server.stop(grace=None)
        path.unlink(missing_ok=True)


def test_garbage_is_counted_and_a_good_server_is_picked_up_after(workdir: Path) -> None:
    server = make_server(workdir)

    async def scenario() -> None:
        source = SvidSource(str(workdir / "n1.sock"), poll_interval=0.2, max_backoff=0.5)
        updates = source.updates()
        pending = asyncio.ensure_future(next_update(updates))
        async with garbage_server(workdir / "n1.sock"):
            for _ in range(100):
                if sum(source.state.errors.values()) >= 2:
                    break
                await asyncio.sleep(0.1)
            assert sum(source.state.errors.values()) >= 2, source.state
            assert not pending.done()
            assert source.state.current is None
        await asyncio.to_thread(server.start)
        update = await pending
        assert update.spiffe_id == N1
        await updates.aclose()

    try:
        asyncio.run(scenario())
    finally:
        server.kill()


def test_an_identity_other_than_expected_is_refused(workdir: Path) -> None:
    server = make_server(workdir)
    server.start()

    async def scenario() -> None:
        source = SvidSource(str(workdir / "n1.sock"),
                            expected_spiffe_id="spiffe://lab.tfcrypt/tfcrypt/node/n2")
        updates = source.updates()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(anext(updates), timeout=2)
        assert source.state.errors["unexpected_spiffe_id"] >= 1
        await updates.aclose()

    try:
        asyncio.run(scenario())
    finally:
        server.kill()
