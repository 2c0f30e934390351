"""Parse and validate the server's JSON config into a frozen `ServerConfig`.

Rules:
- every problem raises `ConfigError` with a one-line message that starts with the key
  (`identities[1].socket: ...`), so an operator sees at once what to fix;
- unknown keys are errors, not ignored: a typo must not silently drop a setting;
- a `spiffe_id` of null registers a socket with no identity (callers get PermissionDenied);
- sockets are absolute, unique and short enough for a Unix socket address (sun_path).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tfcrypt.errors import ConfigError

DEFAULT_SVID_TTL_SECONDS = 3600.0
MIN_SVID_TTL_SECONDS = 2.0
MAX_SOCKET_PATH_BYTES = 107  # sun_path is 108 bytes including the terminating NUL

_TRUST_DOMAIN_RE = re.compile(r"^[a-z0-9._-]+$")
_PATH_SEGMENT_RE = re.compile(r"^[A-Za-z0-9._-]+$")
_TOP_KEYS = {"trust_domain", "state_dir", "svid_ttl_seconds", "identities"}
_IDENTITY_KEYS = {"socket", "spiffe_id"}


@dataclass(frozen=True)
class IdentityConfig:
    """One Workload API socket and the SPIFFE ID its callers get (None: no identity)."""

    socket: Path
    spiffe_id: str | None


@dataclass(frozen=True)
class ServerConfig:
    trust_domain: str
    state_dir: Path
    svid_ttl_seconds: float
    identities: tuple[IdentityConfig, ...]

    @property
    def ready_file(self) -> Path:
        return self.state_dir / "ready"


def load_config(path: Path) -> ServerConfig:
    """Read and validate `path`; unreadable files and bad JSON are ConfigErrors too."""
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"--config: cannot read {path}: {e.strerror}") from e
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--config: {path} is not JSON: {e}") from e
    return parse_config(raw)


def parse_config(raw: Any) -> ServerConfig:
    if not isinstance(raw, dict):
        raise ConfigError("(top level): must be a JSON object")
    _reject_unknown(raw, _TOP_KEYS, prefix="")
    trust_domain = _trust_domain(raw)
    state_dir = _absolute_path(_required(raw, "state_dir"), "state_dir")
    ttl = _ttl(raw)
    identities = _identities(raw, trust_domain)
    return ServerConfig(trust_domain, state_dir, ttl, identities)


def _required(obj: dict[str, Any], key: str, prefix: str = "") -> Any:
    if key not in obj:
        raise ConfigError(f"{prefix}{key}: required key is missing")
    return obj[key]


def _reject_unknown(obj: dict[str, Any], allowed: set[str], prefix: str) -> None:
    unknown = sorted(obj.keys() - allowed)
    if unknown:
        raise ConfigError(
            f"{prefix}{unknown[0]}: unknown key (allowed: {', '.join(sorted(allowed))})")


def _trust_domain(raw: dict[str, Any]) -> str:
    value = _required(raw, "trust_domain")
    if not isinstance(value, str) or not _TRUST_DOMAIN_RE.match(value):
        raise ConfigError(
            "trust_domain: must be a SPIFFE trust domain name "
            f"(lowercase letters, digits, '.', '-', '_'), got {value!r}")
    return value


def _absolute_path(value: Any, key: str) -> Path:
    if not isinstance(value, str) or not value.startswith("/"):
        raise ConfigError(f"{key}: must be an absolute path string, got {value!r}")
    return Path(value)


def _ttl(raw: dict[str, Any]) -> float:
    value = raw.get("svid_ttl_seconds", DEFAULT_SVID_TTL_SECONDS)
    if (isinstance(value, bool) or not isinstance(value, int | float)
            or not math.isfinite(value) or value < MIN_SVID_TTL_SECONDS):
        raise ConfigError(
            f"svid_ttl_seconds: must be a number >= {MIN_SVID_TTL_SECONDS:g}, got {value!r}")
    return float(value)


def _identities(raw: dict[str, Any], trust_domain: str) -> tuple[IdentityConfig, ...]:
    value = _required(raw, "identities")
    if not isinstance(value, list) or not value:
        raise ConfigError("identities: must be a non-empty list")
    seen: set[Path] = set()
    result = []
    for i, item in enumerate(value):
        prefix = f"identities[{i}]."
        if not isinstance(item, dict):
            raise ConfigError(f"identities[{i}]: must be an object with socket and spiffe_id")
        _reject_unknown(item, _IDENTITY_KEYS, prefix)
        socket = _absolute_path(_required(item, "socket", prefix), f"{prefix}socket")
        if len(str(socket).encode()) > MAX_SOCKET_PATH_BYTES:
            raise ConfigError(
                f"{prefix}socket: path longer than {MAX_SOCKET_PATH_BYTES} bytes "
                "cannot be a Unix socket address")
        if socket in seen:
            raise ConfigError(f"{prefix}socket: {socket} is listed twice")
        seen.add(socket)
        spiffe_id = _spiffe_id(_required(item, "spiffe_id", prefix), trust_domain,
                               f"{prefix}spiffe_id")
        result.append(IdentityConfig(socket, spiffe_id))
    return tuple(result)


def _spiffe_id(value: Any, trust_domain: str, key: str) -> str | None:
    if value is None:
        return None
    want = f"spiffe://{trust_domain}/"
    if not isinstance(value, str) or not value.startswith(want):
        raise ConfigError(f"{key}: must be null or a SPIFFE ID under {want}, got {value!r}")
    segments = value[len(want):].split("/")
    if not all(_PATH_SEGMENT_RE.match(s) and s not in {".", ".."} for s in segments):
        raise ConfigError(f"{key}: path of {value!r} is not a valid SPIFFE ID path")
    return value
