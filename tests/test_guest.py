"""The guest runner's pure parts and its one-line refusal without qemu (the runner
itself is exercised by the kernel tier: scripts/test.sh --kernel)."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from netns_lab import guest
from netns_lab.errors import LabError


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


def fake_ko(path: Path, **info: str) -> Path:
    """A minimal ELF64 object holding only a .modinfo section, as a .ko file has."""
    modinfo = b"".join(f"{k}={v}".encode() + b"\0" for k, v in info.items())
    shstrtab = b"\0.modinfo\0.shstrtab\0"
    body_off = 64
    shoff = body_off + len(modinfo) + len(shstrtab)
    header = (b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
              + struct.pack("<HHIQQQIHHHHHH", 1, 62, 1, 0, 0, shoff, 0, 64, 0, 0, 64, 3, 2))

    def section(name: int, off: int, size: int, kind: int) -> bytes:
        return struct.pack("<IIQQQQIIQQ", name, kind, 0, 0, off, size, 0, 0, 1, 0)

    sections = (section(0, 0, 0, 0) + section(1, body_off, len(modinfo), 1)
                + section(10, body_off + len(modinfo), len(shstrtab), 3))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header + modinfo + shstrtab + sections)
    return path


def test_modules_load_after_their_depends_and_softdeps(tmp_path: Path) -> None:
    net, crypto = tmp_path / "kernel" / "net", tmp_path / "kernel" / "crypto"
    fake_ko(net / "nf_tables.ko", depends="libcrc32c,nfnetlink")
    fake_ko(net / "nfnetlink.ko", depends="")
    fake_ko(tmp_path / "kernel" / "lib" / "libcrc32c.ko", depends="", softdep="pre: crc32c")
    fake_ko(crypto / "crc32c_generic.ko", depends="", alias="crypto-crc32c")
    fake_ko(crypto / "crc32c-intel.ko", depends="", alias="crc32c")
    index = guest.module_index(tmp_path)
    assert set(index) == {"nf_tables", "nfnetlink", "libcrc32c", "crc32c_generic",
                          "crc32c_intel"}
    assert guest.modinfo(index["nf_tables"])["depends"] == ["libcrc32c,nfnetlink"]
    order = guest.load_order(index, ["nf_tables"])
    assert order == ["crc32c_intel", "libcrc32c", "nfnetlink", "nf_tables"]


def test_a_missing_dependency_is_named(tmp_path: Path) -> None:
    fake_ko(tmp_path / "kernel" / "wireguard.ko", depends="udp_tunnel")
    index = guest.module_index(tmp_path)
    with pytest.raises(LabError, match="module udp_tunnel \\(needed by wireguard\\)"):
        guest.load_order(index, ["wireguard"])
