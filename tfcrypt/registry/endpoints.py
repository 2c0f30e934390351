"""etcd endpoints and the retry schedule between them.

Rules:
- An endpoint is "http://host:port", "https://host:port" or "host:port" (IPv6 as
  "[::1]:2379"). The scheme must agree with the registry's TLS setting (`check_scheme`):
  an "https://" endpoint without TLS is refused rather than silently downgraded, and an
  "http://" one with TLS is refused rather than silently upgraded.
- Retries rotate through the endpoints: attempt n goes to endpoint (first + n) % len, so
  one dead member of three costs one failed attempt, not a stall.
- The delay between attempts grows from `initial` by `factor` up to `maximum`; it starts
  over once a connection has proven itself (the caller asks for a fresh schedule).
- Each delay is shortened by a random part of up to `jitter` (a fraction), never
  lengthened: after an etcd restart a thousand agents must not relist in lockstep.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from tfcrypt.errors import ConfigError


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int
    scheme: str | None = field(default=None, compare=False)  # "http", "https" or None

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


def parse_endpoint(text: str) -> Endpoint:
    rest = text.strip()
    scheme, sep, tail = rest.partition("://")
    if not sep:
        scheme, tail = "", rest
    if scheme not in ("", "http", "https"):
        raise ConfigError(f"etcd endpoint {text!r}: expected [http(s)://]host:port")
    rest = tail.rstrip("/")
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"etcd endpoint {text!r}: expected [http(s)://]host:port")
    if ":" in host and not (host.startswith("[") and host.endswith("]")):
        raise ConfigError(f"etcd endpoint {text!r}: write IPv6 addresses as [addr]:port")
    return Endpoint(host, int(port), scheme or None)


def check_scheme(endpoints: Sequence[Endpoint], tls: bool) -> None:
    """ConfigError if an endpoint's scheme contradicts the TLS setting."""
    for ep in endpoints:
        if ep.scheme == "https" and not tls:
            raise ConfigError(f"etcd endpoint https://{ep}: set etcd_tls (--etcd-tls) to "
                              "connect with TLS and the SVID as client certificate")
        if ep.scheme == "http" and tls:
            raise ConfigError(f"etcd endpoint http://{ep}: etcd_tls is set; write "
                              f"https://{ep} or {ep}")


def parse_endpoints(texts: Sequence[str]) -> tuple[Endpoint, ...]:
    if isinstance(texts, str):
        texts = [t for t in texts.split(",") if t.strip()]
    if not texts:
        raise ConfigError("etcd endpoints: at least one is required")
    return tuple(parse_endpoint(t) for t in texts)


@dataclass(frozen=True)
class Backoff:
    """Delays between retries: initial, initial*factor, ... capped at maximum (seconds)."""

    initial: float = 0.2
    factor: float = 2.0
    maximum: float = 5.0
    jitter: float = 0.2

    def __post_init__(self) -> None:
        if (
            self.initial <= 0
            or self.factor < 1
            or self.maximum < self.initial
            or not 0 <= self.jitter < 1
        ):
            raise ConfigError(f"invalid backoff {self}")

    def delays(self) -> Iterator[float]:
        delay = self.initial
        while True:
            yield delay * (1 - self.jitter * random.random())
            delay = min(delay * self.factor, self.maximum)
