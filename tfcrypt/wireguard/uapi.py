"""Client of the WireGuard cross-platform userspace API (wireguard.com/xplatform).

Rules:
- The protocol is lines of `key=value`: a request is `get=1` or `set=1` plus lines, ended
  by an empty line; the answer ends with `errno=N` and an empty line. Keys travel as hex.
  wireguard-go writes a failing errno negated (`errno=-22`); `UapiError.errno` is positive.
- Parsing and building are pure functions over text, so they are tested without a
  daemon; `UapiClient` only moves bytes over the unix socket, one connection per request.
- The private key read by `get` is turned into its public key at once. Only
  `UapiClient.get_private_key` returns it, for key recovery when adopting a device whose
  key file was lost; no function here logs a line that could hold a key.
- Unknown keys in an answer are ignored (newer daemons add fields).
- A peer set is one message that names the peer, replaces its allowed IPs
  (`replace_allowed_ips=true` before the `allowed_ip` lines) and sets the rest: the
  peer's routing changes atomically, never through an empty intermediate state.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from dataclasses import dataclass, field
from pathlib import Path

from tfcrypt.wireguard.errors import DeviceUnavailable, UapiError, WireGuardError
from tfcrypt.wireguard.keys import public_key_of
from tfcrypt.wireguard.model import (
    DeviceState,
    PeerConfig,
    PeerState,
    decode_key,
    encode_key,
    normalise_cidrs,
    normalise_endpoint,
)

MAX_ANSWER = 64 * 1024 * 1024


@dataclass
class _PeerFields:
    public_key: str
    endpoint: str | None = None
    allowed_ips: list[str] = field(default_factory=list)
    handshake_sec: int = 0
    handshake_nsec: int = 0
    rx_bytes: int = 0
    tx_bytes: int = 0
    persistent_keepalive: int = 0

    def state(self) -> PeerState:
        handshake = None
        if self.handshake_sec or self.handshake_nsec:
            handshake = self.handshake_sec + self.handshake_nsec / 1e9
        return PeerState(
            public_key=self.public_key,
            endpoint=self.endpoint,
            allowed_ips=normalise_cidrs(self.allowed_ips),
            last_handshake=handshake,
            rx_bytes=self.rx_bytes,
            tx_bytes=self.tx_bytes,
            persistent_keepalive=self.persistent_keepalive,
        )


def split_errno(answer: str, operation: str) -> list[str]:
    """The `key=value` lines before `errno=N`; raises UapiError when N is not zero."""
    lines = [line for line in answer.split("\n") if line]
    if not lines or not lines[-1].startswith("errno="):
        raise WireGuardError(f"UAPI {operation}: answer does not end with errno")
    try:
        errno = abs(int(lines[-1].removeprefix("errno=")))
    except ValueError:
        raise WireGuardError(f"UAPI {operation}: unreadable errno line") from None
    if errno:
        raise UapiError(errno, operation)
    return lines[:-1]


def parse_get(answer: str) -> tuple[DeviceState, bytes | None]:
    """Device state and the raw private key (None if unset) from a `get=1` answer."""
    private_key: bytes | None = None
    listen_port = 0
    fwmark = 0
    peers: dict[str, PeerState] = {}
    current: _PeerFields | None = None
    for line in split_errno(answer, "get"):
        key, sep, value = line.partition("=")
        if not sep:
            raise WireGuardError(f"UAPI get: malformed line for key {key[:32]!r}")
        if key == "public_key":
            if current is not None:
                peers[current.public_key] = current.state()
            current = _PeerFields(encode_key(bytes.fromhex(value)))
        elif current is None:
            if key == "private_key":
                raw = bytes.fromhex(value)
                private_key = raw if any(raw) else None
            elif key == "listen_port":
                listen_port = int(value)
            elif key == "fwmark":
                fwmark = int(value)
        elif key == "endpoint":
            current.endpoint = normalise_endpoint(value)
        elif key == "allowed_ip":
            current.allowed_ips.append(value)
        elif key == "last_handshake_time_sec":
            current.handshake_sec = int(value)
        elif key == "last_handshake_time_nsec":
            current.handshake_nsec = int(value)
        elif key == "rx_bytes":
            current.rx_bytes = int(value)
        elif key == "tx_bytes":
            current.tx_bytes = int(value)
        elif key == "persistent_keepalive_interval":
            current.persistent_keepalive = int(value)
    if current is not None:
        peers[current.public_key] = current.state()
    public_key = public_key_of(private_key) if private_key is not None else None
    return DeviceState(public_key, listen_port, fwmark, peers), private_key


def _message(lines: list[str]) -> str:
    return "set=1\n" + "".join(f"{line}\n" for line in lines) + "\n"


def device_set(
    private_key: bytes | None = None,
    listen_port: int | None = None,
    fwmark: int | None = None,
) -> str:
    """A set message for device-level fields; fields left None are not touched."""
    lines = []
    if private_key is not None:
        lines.append(f"private_key={private_key.hex()}")
    if listen_port is not None:
        lines.append(f"listen_port={listen_port}")
    if fwmark is not None:
        lines.append(f"fwmark={fwmark}")
    return _message(lines)


def peer_upsert(peer: PeerConfig) -> str:
    """Create or update one peer; its allowed IPs are replaced in the same message.

    A peer without a desired endpoint keeps whatever endpoint it roamed to.
    """
    return _message(_peer_lines(peer))


def peers_upsert(peers: list[PeerConfig]) -> str:
    """`peer_upsert` for several peers in one message: a `public_key` line starts each."""
    return _message([line for peer in peers for line in _peer_lines(peer)])


def _peer_lines(peer: PeerConfig) -> list[str]:
    lines = [f"public_key={decode_key(peer.public_key).hex()}", "replace_allowed_ips=true"]
    if peer.endpoint is not None:
        lines.append(f"endpoint={peer.endpoint}")
    lines.append(f"persistent_keepalive_interval={peer.persistent_keepalive}")
    lines.extend(f"allowed_ip={cidr}" for cidr in sorted(peer.allowed_ips))
    return lines


def peer_remove(public_key: str) -> str:
    return _message([f"public_key={decode_key(public_key).hex()}", "remove=true"])


class UapiClient:
    """One wireguard-go device's UAPI socket; every call is its own short connection."""

    def __init__(self, socket_path: Path | str, timeout: float = 5.0) -> None:
        self.socket_path = Path(socket_path)
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"UapiClient({str(self.socket_path)!r})"

    async def get(self) -> DeviceState:
        state, _ = parse_get(await self._exchange("get=1\n\n", "get"))
        return state

    async def get_private_key(self) -> bytes | None:
        """The device's private key, only for restoring a lost key file. Never log it."""
        _, private_key = parse_get(await self._exchange("get=1\n\n", "get"))
        return private_key

    async def set(self, message: str, operation: str = "set") -> None:
        split_errno(await self._exchange(message, operation), operation)

    async def server_pid(self) -> int | None:
        """PID of the process serving the socket (SO_PEERCRED) if it answers a `get`.

        A connect alone is not enough: a process being killed still accepts for a moment.
        """
        try:
            async with asyncio.timeout(self.timeout):
                reader, writer = await asyncio.open_unix_connection(
                    self.socket_path, limit=MAX_ANSWER
                )
                try:
                    sock = writer.get_extra_info("socket")
                    creds = sock.getsockopt(
                        socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")
                    )
                    writer.write(b"get=1\n\n")
                    await writer.drain()
                    split_errno((await reader.readuntil(b"\n\n")).decode(errors="replace"), "get")
                finally:
                    writer.close()
                    await _closed(writer)
        except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                WireGuardError):
            return None
        pid, _, _ = struct.unpack("3i", creds)
        return int(pid)

    async def _exchange(self, request: str, operation: str) -> str:
        try:
            async with asyncio.timeout(self.timeout):
                reader, writer = await asyncio.open_unix_connection(
                    self.socket_path, limit=MAX_ANSWER
                )
                try:
                    writer.write(request.encode("ascii"))
                    await writer.drain()
                    answer = await reader.readuntil(b"\n\n")
                finally:
                    writer.close()
                    await _closed(writer)
        except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
            raise DeviceUnavailable(
                f"UAPI {operation} on {self.socket_path}: {type(exc).__name__}: {exc}"
            ) from exc
        except asyncio.LimitOverrunError as exc:
            raise WireGuardError(f"UAPI {operation}: answer too large") from exc
        return answer.decode("ascii", errors="replace")


async def _closed(writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        await writer.wait_closed()
