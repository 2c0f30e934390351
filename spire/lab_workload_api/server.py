"""Run one grpc.aio server per configured socket until SIGTERM or SIGINT.

Rules:
- startup order: CA (kept in state_dir so a restart keeps the bundle), first SVID of every
  identity, then the sockets, then `<state_dir>/ready` holding the pid: whoever waits for
  the ready file can connect to every socket at once;
- a leftover socket file from a crashed run is removed before binding, but only if it is
  a socket nobody listens on; a live server or a non-socket file at that path stops startup
  before anything is touched (a second instance must not break the first one's files);
  the ready file of a crashed run is removed once every socket proved stale;
- socket files are mode 0770 (owner and group may call; others may not even connect);
- shutdown: streams end (their followers are closed), servers stop, rotation tasks are
  cancelled, and the socket files and the ready file are removed, also when startup fails
  half-way; the process then exits 0.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import socket
import stat
from pathlib import Path

import grpc
from spiffe._proto import workload_pb2_grpc

from lab_workload_api.ca import LabCA
from lab_workload_api.config import ServerConfig
from lab_workload_api.identities import IdentitySource
from lab_workload_api.service import WorkloadAPIService
from lab_workload_api.versioned import Versioned

log = logging.getLogger("lab_workload_api")

SOCKET_MODE = 0o770
STOP_GRACE_SECONDS = 1.0


class ServeError(Exception):
    """Startup cannot go on (a socket path is taken); the message names the path."""


async def serve(config: ServerConfig) -> None:
    """Serve until a stop signal; always leaves no socket file or ready file behind."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("start pid=%d trust_domain=%s sockets=%d svid_ttl_seconds=%g", os.getpid(),
             config.trust_domain, len(config.identities), config.svid_ttl_seconds)

    for ident in config.identities:
        _clear_stale_socket(ident.socket)
    config.ready_file.unlink(missing_ok=True)
    ca = LabCA.load_or_create(config.state_dir, config.trust_domain)
    bundle = Versioned(ca.bundle_der())
    sources: dict[str, IdentitySource] = {}
    for ident in config.identities:
        if ident.spiffe_id is not None and ident.spiffe_id not in sources:
            sources[ident.spiffe_id] = IdentitySource(ident.spiffe_id, ca,
                                                      config.svid_ttl_seconds)

    servers: list[grpc.aio.Server] = []
    bound: list[Path] = []
    ready_written = False
    try:
        for ident in config.identities:
            source = sources.get(ident.spiffe_id) if ident.spiffe_id else None
            service = WorkloadAPIService(ident.socket, source, bundle, config.trust_domain)
            servers.append(await _start_server(ident.socket, service, bound))
        _write_ready(config.ready_file)
        ready_written = True
        log.info("ready file=%s", config.ready_file)
        async with asyncio.TaskGroup() as tasks:
            rotations = [tasks.create_task(s.run()) for s in sources.values()]
            await stop.wait()
            log.info("stopping")
            for followed in [bundle, *(s.svid for s in sources.values())]:
                await followed.close()
            await asyncio.gather(*(s.stop(STOP_GRACE_SECONDS) for s in servers))
            for rotation in rotations:
                rotation.cancel()
    finally:
        await asyncio.gather(*(s.stop(None) for s in servers))
        for path in bound:
            path.unlink(missing_ok=True)
        if ready_written:
            config.ready_file.unlink(missing_ok=True)
        log.info("stopped")


async def _start_server(path: Path, service: WorkloadAPIService,
                        bound: list[Path]) -> grpc.aio.Server:
    path.parent.mkdir(parents=True, exist_ok=True)
    server = grpc.aio.server()
    workload_pb2_grpc.add_SpiffeWorkloadAPIServicer_to_server(service, server)
    old_umask = os.umask(0o007)
    try:
        server.add_insecure_port(f"unix:{path}")
    finally:
        os.umask(old_umask)
    bound.append(path)
    await server.start()
    os.chmod(path, SOCKET_MODE)
    log.info("socket bound path=%s", path)
    return server


def _clear_stale_socket(path: Path) -> None:
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ServeError(f"{path}: exists and is not a socket; refusing to replace it")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError as e:
            if e.errno not in (errno.ECONNREFUSED, errno.ENOENT):
                raise
        else:
            raise ServeError(f"{path}: another server is listening on this socket")
    path.unlink(missing_ok=True)
    log.info("stale socket removed path=%s", path)


def _write_ready(ready_file: Path) -> None:
    """Write atomically, so a poller never reads an empty ready file."""
    tmp = ready_file.with_name(ready_file.name + ".tmp")
    tmp.write_text(str(os.getpid()))
    os.replace(tmp, ready_file)
