"""The lab's SPIFFE Workload API server (package lab_workload_api) as a lab process.

Rules: it runs in the root namespace (it only opens Unix sockets in the run dir), one
socket per node plus one for the controller; the caller's identity is the socket it uses.
It writes `<run_dir>/spire/ready` once every socket listens; the lab waits for that file.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import LabError
from .layout import TRUST_DOMAIN, Layout

READY_TIMEOUT = 30.0
DEFAULT_SVID_TTL = 600


def config_path(layout: Layout) -> Path:
    return layout.spire_dir / "config.json"


def write_config(layout: Layout, svid_ttl: int,
                 serve_as: Mapping[str, str] | None = None) -> Path:
    """`serve_as` {node: another node} makes a node's socket hand out the other node's
    SVID (a misregistration in SPIRE): a fault injector for tests, never the default."""
    by_name = {n.name: n for n in layout.all_nodes()}
    for node, other in (serve_as or {}).items():
        if node not in by_name or other not in by_name:
            raise LabError(f"serve_as {node}->{other}: unknown node")
    identities: list[dict[str, Any]] = [
        {"socket": str(n.spiffe_socket),
         "spiffe_id": by_name[(serve_as or {}).get(n.name, n.name)].spiffe_id}
        for n in layout.all_nodes()
    ]
    identities.append({"socket": str(layout.controller_socket),
                       "spiffe_id": layout.controller_spiffe_id})
    config = {"trust_domain": TRUST_DOMAIN, "state_dir": str(layout.spire_dir),
              "svid_ttl_seconds": svid_ttl, "identities": identities}
    layout.spire_dir.mkdir(parents=True, exist_ok=True)
    (layout.run_dir / "spiffe").mkdir(parents=True, exist_ok=True)
    path = config_path(layout)
    path.write_text(json.dumps(config, indent=2) + "\n")
    return path


def server_argv(layout: Layout) -> list[str]:
    return [sys.executable, "-m", "lab_workload_api", "serve", "--config",
            str(config_path(layout))]


def ready_file(layout: Layout) -> Path:
    return layout.spire_dir / "ready"


def wait_ready(layout: Layout, pid: int, alive: Any, log: str,
               timeout: float = READY_TIMEOUT) -> None:
    """Wait until the ready file names `pid`: a file left by a killed server names
    another one. `alive()` says whether the server process still runs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if ready_file(layout).read_text().strip() == str(pid):
                return
        except FileNotFoundError:
            pass
        if not alive():
            raise LabError(f"Workload API server exited before it was ready: see {log}"
                           f"{_tail(log)}")
        time.sleep(0.1)
    raise LabError(f"Workload API server not ready after {timeout:.0f} s: see {log}")


def _tail(log: str, lines: int = 8) -> str:
    """The end of the server's log, for an error seen where the log is not (a guest's
    tmpfs is gone with the guest)."""
    try:
        text = Path(log).read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return ""
    return "; last lines: " + " | ".join(text) if text else ""
