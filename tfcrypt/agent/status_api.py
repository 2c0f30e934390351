"""The local status API: JSON over HTTP/1.0 on a Unix socket, standard library only.

Rules:
- One verb: `GET /status` answers 200 with the agent's status document (computed at
  request time, never cached); `GET /healthz` answers 200 or 503 with the same document,
  so an HTTP probe needs no JSON parsing; `GET /flows` answers the flow records
  (tfcrypt/agent/flows.py, docs/flows.md). Anything else is 404/405. One request per
  connection, then close (HTTP/1.0): there is nothing to keep alive.
- The socket is the agent's: a socket file nobody answers on is a dead agent's and is
  replaced; one that answers belongs to a running agent and start fails (two agents on
  one node would fight over the dataplane). The file is removed on exit.
- Access control is the file mode: the socket is 0600, owned by the agent's user (root),
  from the moment it is bound (bound under a 0177 umask, never chmodded afterwards), and
  a directory the agent creates for it is 0700. Status holds no key material, but it
  names peers, addresses and policies: not for every local user. An existing directory
  is left as it is (it may be /run); the socket's own mode is what guards it.
- A slow or broken client cannot stall the agent: reads are bounded in time and size.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from tfcrypt.errors import TfcryptError

READ_TIMEOUT = 5.0
SOCKET_MODE = 0o600
DIR_MODE = 0o700
MAX_REQUEST = 8192

StatusProvider = Callable[[], Awaitable[dict[str, Any]]]


class StatusApiError(TfcryptError):
    """The status socket cannot be served, or the agent cannot be reached through it."""


class NotServed(StatusApiError):
    """The agent answers, but does not serve that path (404: `/flows` with flows off)."""


def answers(path: Path) -> bool:
    """Whether something accepts connections on the socket at `path`."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


def _response(code: int, reason: str, body: dict[str, Any]) -> bytes:
    payload = json.dumps(body, indent=1, sort_keys=True).encode() + b"\n"
    head = (f"HTTP/1.0 {code} {reason}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n")
    return head.encode() + payload


class StatusServer:
    """Serves `provider()` on `path` while the `serve()` task runs."""

    def __init__(self, path: str | Path, provider: StatusProvider,
                 flows: StatusProvider | None = None) -> None:
        self.path = Path(path)
        self._provider = provider
        self._flows = flows
        self._server: asyncio.Server | None = None

    def __repr__(self) -> str:
        return f"StatusServer({str(self.path)!r})"

    def _claim(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
        try:
            mode = self.path.lstat().st_mode
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(mode):
            raise StatusApiError(f"{self.path} exists and is not a socket")
        if answers(self.path):
            raise StatusApiError(f"{self.path}: another agent is serving status here; "
                                 "stop it first")
        self.path.unlink()

    async def start(self) -> None:
        """Claim the socket path and listen; StatusApiError if another agent serves it."""
        self._claim()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        umask = os.umask(0o777 & ~SOCKET_MODE)
        try:
            sock.bind(str(self.path))
        except OSError as exc:
            sock.close()
            raise StatusApiError(f"{self.path}: cannot listen: {exc.strerror}") from None
        finally:
            os.umask(umask)
        self._server = await asyncio.start_unix_server(self._handle, sock=sock)

    async def serve(self) -> None:
        """Answer requests until cancelled (a task of the agent's TaskGroup)."""
        if self._server is None:
            await self.start()
        assert self._server is not None
        try:
            async with self._server:
                await self._server.serve_forever()
        finally:
            with contextlib.suppress(OSError):
                self.path.unlink()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT)
            writer.write(await self._answer(head[:MAX_REQUEST]))
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _answer(self, head: bytes) -> bytes:
        parts = head.split(b"\r\n", 1)[0].decode("latin-1").split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return _response(400, "Bad Request", {"error": "not an HTTP request line"})
        method, target = parts[0], parts[1].split("?", 1)[0]
        if target not in ("/status", "/healthz", "/flows") or (
                target == "/flows" and self._flows is None):
            return _response(404, "Not Found", {"error": f"no {target}; use GET /status"})
        if method != "GET":
            return _response(405, "Method Not Allowed", {"error": "use GET"})
        if target == "/flows":
            assert self._flows is not None
            return _response(200, "OK", await self._flows())
        status = await self._provider()
        if target == "/healthz" and not status.get("health", {}).get("healthy"):
            return _response(503, "Service Unavailable", status)
        return _response(200, "OK", status)


def fetch_status(path: str | Path, timeout: float = 5.0,
                 target: str = "/status") -> dict[str, Any]:
    """GET `target` (/status, /flows) from the agent at `path` (blocking; for the CLI)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(str(path))
            s.sendall(f"GET {target} HTTP/1.0\r\nHost: tfcrypt\r\n\r\n".encode())
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        except FileNotFoundError:
            raise StatusApiError(f"no agent status socket at {path}") from None
        except ConnectionRefusedError:
            raise StatusApiError(f"{path}: nothing answers (the agent is not running)") from None
        except PermissionError:
            raise StatusApiError(f"{path}: permission denied (run as root)") from None
        except TimeoutError:
            raise StatusApiError(f"{path}: the agent did not answer in {timeout:.0f}s") from None
        except OSError as exc:
            raise StatusApiError(f"{path}: {exc.strerror or exc}") from None
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
    if " 404 " in f"{status_line} ":
        raise NotServed(f"{path}: the agent does not serve {target}")
    if " 200 " not in f"{status_line} ":
        raise StatusApiError(f"{path}: unexpected answer {status_line!r}")
    try:
        doc = json.loads(body)
    except ValueError:
        raise StatusApiError(f"{path}: the answer is not JSON") from None
    if not isinstance(doc, dict):
        raise StatusApiError(f"{path}: the answer is not a status document")
    return doc
