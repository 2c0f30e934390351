"""The node's WireGuard private key at rest.

Rules:
- One file, `<state_dir>/wireguard.key`: base64 of 32 bytes and a newline, exactly what
  `wg genkey` prints, so operators can inspect it with `wg pubkey < wireguard.key`.
- Mode 0600, owner only. A wider mode is narrowed and reported; the key is kept (it may
  have leaked, but replacing it silently would break every peer; rotation is an operator
  decision, and `problem` tells them).
- Every write is atomic: a 0600 temporary in the same directory, fsync, rename, fsync of
  the directory. A crash leaves either the old key or the new one, never half a key.
- A corrupt file is never silently reused: with a fallback (the key an adopted running
  device already uses) it is rewritten with that key so the dataplane keeps working;
  without one it is moved aside and a fresh key is made.
- Key material never appears in a message, a repr or a log line.
"""

from __future__ import annotations

import base64
import binascii
import errno
import logging
import os
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from tfcrypt.privatefile import write_private
from tfcrypt.wireguard.model import KEY_LEN, encode_key

log = logging.getLogger(__name__)

KEY_FILE = "wireguard.key"
FILE_MODE = 0o600
DIR_MODE = 0o700


@dataclass(frozen=True)
class KeyLoad:
    """The key in use after loading; `problem` explains any repair that was needed."""

    private_key: bytes = field(repr=False)
    public_key_b64: str
    created: bool
    problem: str | None = None

    @property
    def private_key_b64(self) -> str:
        return encode_key(self.private_key)


def generate_private_key() -> bytes:
    """32 random bytes clamped like `wg genkey`, from cryptography's X25519."""
    raw = bytearray(X25519PrivateKey.generate().private_bytes_raw())
    raw[0] &= 248
    raw[31] = (raw[31] & 127) | 64
    return bytes(raw)


def public_key_of(private_key: bytes) -> str:
    """Base64 public key for a raw private key (what `wg pubkey` prints)."""
    if len(private_key) != KEY_LEN:
        raise ValueError(f"private key must be {KEY_LEN} bytes")
    public = X25519PrivateKey.from_private_bytes(private_key).public_key()
    return encode_key(public.public_bytes_raw())


def load_or_create(state_dir: Path | str, fallback: bytes | None = None) -> KeyLoad:
    """Load the key at rest, repairing or creating it as the module rules say."""
    directory = Path(state_dir)
    _ensure_dir(directory)
    path = directory / KEY_FILE
    problems: list[str] = []

    raw: bytes | None = None
    try:
        raw, mode_problem = _read(path)
    except FileNotFoundError:
        raw = None
        if fallback is not None:
            problems.append("key file missing; restored from the running device")
    except _Corrupt as corrupt:
        problems.append(f"key file corrupt ({corrupt})")
        if fallback is None:
            aside = _move_aside(path)
            problems.append(f"moved aside to {aside.name}; generated a new key")
        else:
            problems.append("rewritten with the running device's key")
    else:
        if mode_problem:
            problems.append(mode_problem)

    created = False
    if raw is None:
        if fallback is not None:
            if len(fallback) != KEY_LEN:
                raise ValueError(f"fallback key must be {KEY_LEN} bytes")
            raw = fallback
        else:
            raw = generate_private_key()
            created = True
        _write_atomic(path, raw)

    problem = "; ".join(problems) or None
    if problem:
        log.warning("wireguard key at %s: %s", path, problem)
    return KeyLoad(raw, public_key_of(raw), created=created, problem=problem)


def rotate(state_dir: Path | str) -> KeyLoad:
    """Replace the key at rest with a fresh one; the caller bumps its record's epoch."""
    directory = Path(state_dir)
    _ensure_dir(directory)
    raw = generate_private_key()
    _write_atomic(directory / KEY_FILE, raw)
    log.info("wireguard key at %s rotated", directory / KEY_FILE)
    return KeyLoad(raw, public_key_of(raw), created=True, problem=None)


class _Corrupt(Exception):
    """The key file exists but does not hold a key; the message says why, never what."""


def _ensure_dir(directory: Path) -> None:
    directory.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)


def _read(path: Path) -> tuple[bytes, str | None]:
    """The key and a mode problem (already fixed), or _Corrupt / FileNotFoundError."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _Corrupt("a symbolic link") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _Corrupt("not a regular file")
        mode_problem = None
        mode = stat.S_IMODE(st.st_mode)
        if mode != FILE_MODE:
            os.fchmod(fd, FILE_MODE)
            mode_problem = f"mode was {mode:04o}, fixed to {FILE_MODE:04o}"
        data = os.read(fd, 1024)
    finally:
        os.close(fd)
    try:
        raw = base64.b64decode(data.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise _Corrupt("not base64") from None
    if len(raw) != KEY_LEN:
        raise _Corrupt(f"{len(raw)} bytes instead of {KEY_LEN}")
    return raw, mode_problem


def _move_aside(path: Path) -> Path:
    aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
    os.replace(path, aside)
    return aside


def _write_atomic(path: Path, raw: bytes) -> None:
    write_private(path, encode_key(raw).encode("ascii") + b"\n")
