"""How one configuration value is read and checked, whichever layer it came from.

Rules:
- A parser takes a string (flag, environment) or a YAML value and returns the typed value,
  or raises ValueError saying why; a check takes the typed value and returns a problem or
  None. Neither knows which layer or key the value came from: tfcrypt.config names both
  in the message it raises (`tfcrypt.yaml: listen_port: 70000 is not in 1..65535`).
- A quoted value is cut short (tfcrypt.safeyaml.excerpt): a hostile config file cannot
  make a message as long as itself.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
from collections.abc import Callable, Sequence
from typing import Any

from tfcrypt import safeyaml

NODE_NAME = re.compile(r"^[a-z0-9]([a-z0-9.-]{0,61}[a-z0-9])?$")
IFNAME = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")


def _x(value: object) -> str:
    """A value quoted in a message, cut short (tfcrypt.safeyaml.excerpt)."""
    return safeyaml.excerpt(value)


# -- value parsers: str (flag, env) or a YAML value in, typed value out, ValueError(why) --

def as_int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"{_x(value)} is not an integer")
    if isinstance(value, int):
        return value
    try:
        return int(value.strip(), 0)
    except ValueError:
        raise ValueError(f"{_x(value)} is not an integer") from None


def as_float(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"{_x(value)} is not a number")
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"{_x(value)} is not a number") from None


def as_bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    text = value.strip().lower() if isinstance(value, str) else None
    if text in ("true", "yes", "1"):
        return True
    if text in ("false", "no", "0"):
        return False
    raise ValueError(f"{_x(value)} is not true or false")


def as_str(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{_x(value)} is not a string")
    return value


def optional(parse: Callable[[object], Any]) -> Callable[[object], Any]:
    def inner(value: object) -> Any:
        return None if value is None or value == "" else parse(value)
    return inner


def split_endpoints(value: str | Sequence[str]) -> tuple[str, ...]:
    """`--etcd a,b` and repeated `--etcd a --etcd b` both mean [a, b]."""
    items = [value] if isinstance(value, str) else list(value)
    return tuple(p.strip() for item in items for p in item.split(",") if p.strip())


def as_list(value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        return split_endpoints(value)
    if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        return split_endpoints(value)
    raise ValueError(f"{_x(value)} is not a list of strings")


# -- checks: a valid value gives None, an invalid one the reason, without the key --------

def in_range(lo: float, hi: float) -> Callable[[Any], str | None]:
    return lambda v: None if lo <= v <= hi else f"{v} is not in {lo}..{hi}"


def one_of(*choices: str) -> Callable[[Any], str | None]:
    return lambda v: None if v in choices else f"{_x(v)} is not one of {', '.join(choices)}"


def node_name_problem(v: str) -> str | None:
    return None if NODE_NAME.match(v) else (
        f"{_x(v)} is not a valid node name (lowercase letters, digits, '-' and '.', at most 63)")


def ip_problem(v: str) -> str | None:
    try:
        ipaddress.ip_address(v)
    except ValueError:
        return f"{_x(v)} is not an IP address"
    return None


def ifname_problem(v: str) -> str | None:
    return None if IFNAME.match(v) else f"{_x(v)} is not a valid interface name (1-15 characters)"


def endpoints_problem(v: tuple[str, ...]) -> str | None:
    if not v:
        return "at least one endpoint is needed"
    bad = [e for e in v if not re.match(r"^(https?://)?[^\s/]+:\d+$", e)]
    return f"{_x(bad[0])} is not host:port or http(s)://host:port" if bad else None


def etcd_tls_problem(endpoints: Sequence[str], tls: bool,
                     server_name: str | None = None) -> str | None:
    """Why the etcd endpoints' schemes contradict `etcd_tls`, or None (docs/registry.md):
    an https:// endpoint without TLS is never silently downgraded, an http:// one with
    TLS never silently upgraded."""
    for e in endpoints:
        if e.startswith("https://") and not tls:
            return (f"etcd: {_x(e)} is https://: set etcd_tls (--etcd-tls) to connect "
                    "with TLS and the SVID as client certificate")
        if e.startswith("http://") and tls:
            return f"etcd: {_x(e)} is http:// but etcd_tls is set: write https:// or host:port"
    if server_name and not tls:
        return "etcd_server_name: only meaningful with etcd_tls (--etcd-tls)"
    return None


def dns_name_problem(v: str) -> str | None:
    ok = re.match(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$", v) is not None
    return None if ok else f"{_x(v)} is not a DNS name"


def cidrs_problem(v: tuple[str, ...]) -> str | None:
    for item in v:
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            return f"{_x(item)} is not an address or CIDR"
    return None


def single_bit_problem(v: int) -> str | None:
    ok = 0 < v <= 0xFFFFFFFF and not v & (v - 1)
    return None if ok else f"{v:#x} must be a single bit of a 32-bit mark"


def mask_problem(v: int) -> str | None:
    return None if 0 < v <= 0xFFFFFFFF else f"{v:#x} is not a 32-bit mask"


def table_problem(v: int) -> str | None:
    ok = 1 <= v < 0xFFFFFFFF and v not in (252, 253, 254, 255) and v + 1 not in (252, 253, 254)
    return None if ok else f"{v} (and the next id, used for fail-closed routes) must be free " \
                           "table ids (not 0, 252-255)"


def prefix_problem(v: str) -> str | None:
    return None if v.startswith("/") and not v.endswith("/") else \
        f"{_x(v)} must start and not end with '/'"


def template_problem(v: str) -> str | None:
    return None if "{node}" in v and v.startswith("spiffe://") else \
        f"{_x(v)} must be a spiffe:// ID containing {{node}}"


def spiffe_ids_problem(v: tuple[str, ...]) -> str | None:
    bad = [i for i in v if not i.startswith("spiffe://")]
    if not v:
        return "at least one controller ID is needed"
    return f"{_x(bad[0])} is not a spiffe:// ID" if bad else None


def absolute_problem(v: str) -> str | None:
    return None if v.startswith("/") else f"{_x(v)} is not an absolute path"


def state_dir_problem(v: str) -> str | None:
    """Why `v` cannot be the state directory: relative, or an existing non-directory."""
    if (problem := absolute_problem(v)) is not None:
        return problem
    if os.path.lexists(v) and not os.path.isdir(v):
        return f"{_x(v)} exists and is not a directory"
    return None


def program_problem(v: str) -> str | None:
    """Why `v` cannot name a program: a relative path would depend on the agent's cwd."""
    if not v.strip() or "\0" in v:
        return f"{_x(v)} is not a program name or path"
    if "/" in v and not v.startswith("/"):
        return f"{_x(v)} is neither a program name (looked up on PATH) nor an absolute path"
    return None


def runnable_problem(v: str) -> str | None:
    """Why the program `v` cannot be started here: not on PATH, missing, not a file, not
    executable. Checked only where it will run (the userspace backend's wireguard-go),
    so a kernel-backend node needs no wireguard-go at all."""
    if "/" not in v:
        return None if shutil.which(v) else f"{_x(v)} is not on PATH"
    if not os.path.exists(v):
        return f"{_x(v)} does not exist"
    if not os.path.isfile(v):
        return f"{_x(v)} is not a file"
    if not os.access(v, os.X_OK):
        return f"{_x(v)} is not executable"
    return None


def socket_path_problem(v: str) -> str | None:
    if len(v.encode()) > 107:
        return f"{_x(v)} is longer than a Unix socket path may be (107 bytes)"
    return absolute_problem(v)


def split_host_port(value: str) -> tuple[str, int]:
    """`HOST:PORT` or `[IPv6]:PORT`; ValueError says what is wrong."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"{_x(value)} is not HOST:PORT")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    ipaddress.ip_address(host)
    if not 1 <= int(port) <= 65535:
        raise ValueError(f"{_x(value)}: port is not in 1..65535")
    return host, int(port)


def host_port_problem(v: str | None) -> str | None:
    if v is None:
        return None
    try:
        split_host_port(v)
    except ValueError as exc:
        return f"{_x(v)} is not IP:PORT ({exc})"
    return None


def cross_problem(mark: int, mask: int) -> str | None:
    return None if mask & mark == mark else f"{mask:#x} must contain the mark {mark:#x}"
