"""The lab Workload API server as a subprocess, for tests (started and stopped by PID).

Temp dirs must be short: Unix socket addresses are limited to 107 bytes.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

TD = "lab.tfcrypt"
N1 = f"spiffe://{TD}/tfcrypt/node/n1"
START_TIMEOUT = 20.0


@dataclass
class Server:
    """One running server process and the paths it serves."""

    dir: Path
    config_path: Path
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_path = self.dir / "server.log"

    @property
    def state_dir(self) -> Path:
        return self.dir / "state"

    @property
    def ready(self) -> Path:
        return self.state_dir / "ready"

    def sock(self, name: str) -> Path:
        return self.dir / f"{name}.sock"

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "lab_workload_api", "serve",
                 "--config", str(self.config_path)],
                stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        while not self._ready_for(self.proc.pid):
            if self.proc.poll() is not None:
                pytest.fail(f"server exited {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                pytest.fail(f"server not ready after {START_TIMEOUT}s:\n{self.log()}")
            time.sleep(0.05)

    def _ready_for(self, pid: int) -> bool:
        """A ready file left by a killed server names another pid: not ready yet."""
        try:
            return self.ready.read_text() == str(pid)
        except FileNotFoundError:
            return False

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=10)
        finally:
            self.kill()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def server_config(d: Path, ttl: float) -> dict[str, Any]:
    return {
        "trust_domain": TD,
        "state_dir": str(d / "state"),
        "svid_ttl_seconds": ttl,
        "identities": [
            {"socket": str(d / "n1.sock"), "spiffe_id": N1},
            {"socket": str(d / "x.sock"), "spiffe_id": None},
        ],
    }


