"""The guest runner's pure parts and its one-line refusal without qemu (the runner
itself is exercised by the kernel tier: scripts/test.sh --kernel)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from netns_lab import guest


def test_softdep_pre_modules_come_first() -> None:
    info = {"softdep": ["pre: crc32c post: foo"]}
    assert guest._softdeps_pre(info) == ["crc32c"]


def test_without_qemu_one_line_names_the_debian_package(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "netns_lab", "guest", "--", "true"],
                         capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 1
    assert out.stderr.splitlines() == [
        "netns_lab: qemu-system-x86_64 not found: install the Debian package qemu-system-x86"]


def test_the_command_runs_in_the_callers_directory_with_its_status() -> None:
    script = guest.command_script(["pytest", "-k", "a b"], "/work/x y", {"K": "v w"})
    assert "cd '/work/x y'" in script
    assert "export K='v w'" in script
    assert script.rstrip().endswith("exec pytest -k 'a b'")
