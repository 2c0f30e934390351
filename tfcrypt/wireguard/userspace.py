"""The userspace backend: wireguard-go, configured over its UAPI socket.

Rules:
- Adopt before start: a device whose socket answers, served by a process in our network
  namespace, with a link of our name there, is a previous agent's and is kept as is.
- wireguard-go outlives the agent (a restart must not drop traffic): it runs in its own
  session, with stdin closed and stdout/stderr to a log file or /dev/null, never to a
  pipe of ours. `close()` leaves it running; only `destroy()` stops it.
- Supervision is by observation: `ensure_device()` (called by every apply, and by
  `supervise()` on an interval) restarts a vanished device and reports `RESTARTED`;
  `restarts` counts them and `restarted` is set so the agent re-applies everything.
  A device whose process lives and whose link exists but whose socket does not answer
  (busy, stopped) is reported unavailable, never replaced: it has not vanished.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import IO

from tfcrypt.wireguard import link
from tfcrypt.wireguard.backend import DeviceOrigin
from tfcrypt.wireguard.errors import DeviceUnavailable, WireGuardError
from tfcrypt.wireguard.model import DeviceState, PeerConfig
from tfcrypt.wireguard.uapi import (
    UapiClient,
    device_set,
    peer_remove,
    peer_upsert,
    peers_upsert,
)

log = logging.getLogger(__name__)

NETNS_DIR = Path("/run/netns")
IFNAME_MAX = 15


class UserspaceBackend:
    """One wireguard-go device, started or adopted, and kept alive.

    Pitfalls this class exists to handle:
    - wireguard-go daemonises (forks and exits) unless run with `-f` or
      WG_PROCESS_FOREGROUND=1; a daemonised child cannot be supervised by PID.
    - The UAPI directory /run/wireguard is one directory for every network namespace
      that shares the mount namespace: a socket named like ours may serve a device in
      another namespace. Interface names must be unique per host (or run in a private
      mount namespace), and adoption checks the serving process's network namespace.
    - A device that vanishes (wireguard-go killed, OOM) takes its routes and addresses
      with it, and its peers: the restarted device is empty, so the manager re-applies,
      and the agent must re-apply the route reconciler too (`restarted`).
    - A killed wireguard-go leaves its socket file behind; connecting gets ECONNREFUSED.
      wireguard-go itself removes such a stale socket when it starts.
    - Writing wireguard-go's output to a pipe of the agent would kill it with SIGPIPE
      once the agent exits, which is why output goes to a file.
    - A new wireguard-go device starts down with MTU 1420: the manager sets both.
    """

    def __init__(
        self,
        ifname: str,
        socket_dir: Path | str = "/run/wireguard",
        *,
        netns: str | None = None,
        binary: str = "wireguard-go",
        log_path: Path | str | None = None,
        log_level: str = "error",
        start_timeout: float = 10.0,
        uapi_timeout: float = 5.0,
    ) -> None:
        if not ifname or len(ifname) > IFNAME_MAX or "/" in ifname:
            raise ValueError(f"interface name {ifname!r} must be 1..{IFNAME_MAX} chars")
        self.ifname = ifname
        self.socket_path = Path(socket_dir) / f"{ifname}.sock"
        self.netns = netns
        self.binary = binary
        self.log_path = Path(log_path) if log_path else None
        self.log_level = log_level
        self.start_timeout = start_timeout
        self.pid: int | None = None
        self.restarts = 0
        self.restarted = asyncio.Event()
        self._uapi = UapiClient(self.socket_path, timeout=uapi_timeout)
        self._proc: subprocess.Popen[bytes] | None = None
        self._known = False
        self._ensure_lock = asyncio.Lock()

    def __repr__(self) -> str:
        where = f", netns={self.netns!r}" if self.netns else ""
        return f"UserspaceBackend({self.ifname!r}{where}, pid={self.pid})"

    async def ensure_device(self) -> DeviceOrigin:
        # apply and the supervisor both call this: one at a time, or both would see a
        # vanished device and start two wireguard-go for one interface
        async with self._ensure_lock:
            return await self._ensure_device()

    async def _ensure_device(self) -> DeviceOrigin:
        self._reap()
        pid = await self._uapi.server_pid()
        if pid is None and self.pid is not None and _running(self.pid) and (
                await link.link_state(self.ifname, self.netns) is not None):
            # alive, link present, socket silent: busy or stopped, not gone. Starting a
            # second one would not replace it (the TUN is taken) and would stall applies.
            raise DeviceUnavailable(
                f"{self.ifname}: wireguard-go pid {self.pid} runs but its UAPI socket did "
                f"not answer within {self._uapi.timeout:g}s")
        if pid is not None:
            await self._check_ours(pid)
            origin = DeviceOrigin.PRESENT if self._known else DeviceOrigin.ADOPTED
            if origin is DeviceOrigin.ADOPTED:
                log.info("wireguard %s: adopted running wireguard-go pid %d", self.ifname, pid)
            self.pid = pid
        else:
            if self._known:
                log.warning("wireguard %s: device vanished (pid %s)", self.ifname, self.pid)
            if self.pid is not None:
                await self._wait_gone(self.pid, self.start_timeout)
            await self._start()
            origin = DeviceOrigin.RESTARTED if self._known else DeviceOrigin.STARTED
            if origin is DeviceOrigin.RESTARTED:
                self.restarts += 1
                self.restarted.set()
        self._known = True
        return origin

    async def supervise(self, interval: float = 1.0) -> None:
        """Run forever (in the agent's TaskGroup): restart the device when it vanishes."""
        while True:
            try:
                await self.ensure_device()
            except WireGuardError as exc:
                log.warning("wireguard %s: supervision: %s", self.ifname, exc)
            await asyncio.sleep(interval)

    async def get_state(self) -> DeviceState:
        state = await self._uapi.get()
        current = await link.link_state(self.ifname, self.netns)
        if current is None:
            raise DeviceUnavailable(f"{self.ifname}: link vanished")
        return replace(state, mtu=current.mtu, up=current.up)

    async def read_private_key(self) -> bytes | None:
        return await self._uapi.get_private_key()

    async def configure_device(self, private_key: bytes | None, listen_port: int | None) -> None:
        await self._uapi.set(device_set(private_key, listen_port), "set device")

    async def set_link(self, mtu: int | None, up: bool) -> None:
        await link.set_link(self.ifname, mtu, up, self.netns)

    async def upsert_peer(self, peer: PeerConfig) -> None:
        await self._uapi.set(peer_upsert(peer), f"set peer {peer.public_key}")

    async def upsert_peers(self, peers: list[PeerConfig]) -> None:
        """Several peers in one UAPI set (each still replaces its own allowed IPs)."""
        await self._uapi.set(peers_upsert(peers), f"set {len(peers)} peers")

    async def remove_peer(self, public_key: str) -> None:
        await self._uapi.set(peer_remove(public_key), f"remove peer {public_key}")

    async def close(self) -> None:
        """Forget the process without stopping it: the dataplane survives the agent."""
        self._proc = None

    async def destroy(self, timeout: float = 5.0) -> None:
        """Stop wireguard-go (uninstall, tests); the device and its routes go with it."""
        self._reap()
        pid = self.pid if self.pid is not None else await self._uapi.server_pid()
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        if not await self._wait_gone(pid, timeout):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            await self._wait_gone(pid, timeout)
        self.pid = None
        self._known = False

    def _reap(self) -> None:
        if self._proc is not None and self._proc.poll() is not None:
            log.warning(
                "wireguard %s: wireguard-go pid %d exited with %s",
                self.ifname, self._proc.pid, self._proc.returncode,
            )
            self._proc = None

    async def _wait_gone(self, pid: int, timeout: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            self._reap()
            if not _running(pid) and await link.link_state(self.ifname, self.netns) is None:
                return True
            await asyncio.sleep(0.05)
        return False

    async def _check_ours(self, pid: int) -> None:
        if not _same_netns(pid, self.netns):
            raise DeviceUnavailable(
                f"{self.socket_path} is served by pid {pid} in another network namespace; "
                "interface names must be unique across namespaces sharing /run/wireguard"
            )
        if await link.link_state(self.ifname, self.netns) is None:
            raise DeviceUnavailable(f"{self.ifname}: UAPI answers but the link is missing")

    async def _start(self) -> None:
        command = [self.binary, "-f", self.ifname]
        if self.netns:
            command = ["nsenter", f"--net={_netns_path(self.netns)}", "--", *command]
        env = {**os.environ, "WG_PROCESS_FOREGROUND": "1", "LOG_LEVEL": self.log_level}
        with _output(self.log_path) as output:
            try:
                proc = subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=output,
                    stderr=output,
                    env=env,
                    start_new_session=True,
                    close_fds=True,
                )
            except OSError as exc:
                raise DeviceUnavailable(f"{self.ifname}: cannot run {self.binary}: {exc}") from exc
        self._proc = proc
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.start_timeout
        while loop.time() < deadline:
            if proc.poll() is not None:
                self._proc = None
                raise DeviceUnavailable(
                    f"{self.ifname}: wireguard-go exited with {proc.returncode}{self._log_tail()}"
                )
            if await self._uapi.server_pid() == proc.pid and await link.link_state(
                self.ifname, self.netns
            ):
                self.pid = proc.pid
                log.info("wireguard %s: started wireguard-go pid %d", self.ifname, proc.pid)
                return
            await asyncio.sleep(0.05)
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        self._proc = None
        raise DeviceUnavailable(f"{self.ifname}: wireguard-go not ready in {self.start_timeout}s")

    def _log_tail(self) -> str:
        if self.log_path is None:
            return ""
        try:
            tail = self.log_path.read_bytes()[-400:].decode(errors="replace").strip()
        except OSError:
            return ""
        return f": {tail}" if tail else ""


def _netns_path(netns: str) -> Path:
    return Path(netns) if netns.startswith("/") else NETNS_DIR / netns


def _same_netns(pid: int, netns: str | None) -> bool:
    ours = _netns_path(netns) if netns else Path("/proc/self/ns/net")
    try:
        theirs = os.stat(f"/proc/{pid}/ns/net")
        mine = os.stat(ours)
    except OSError:
        return False
    return (theirs.st_dev, theirs.st_ino) == (mine.st_dev, mine.st_ino)


def _running(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return False
    return fields[0] != b"Z"


@contextlib.contextmanager
def _output(log_path: Path | None) -> Iterator[int | IO[bytes]]:
    if log_path is None:
        yield subprocess.DEVNULL
        return
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as handle:
        yield handle
