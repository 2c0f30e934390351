"""netns_lab.gobin finds what scripts/build-go.sh built: the same cache path (a hash of
go.mod + go.sum), and a clear error naming the command to run when it is not built."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from netns_lab import gobin
from netns_lab.errors import LabError


def _module(tools: Path, text: str) -> None:
    (tools / "m").mkdir(parents=True)
    (tools / "m" / "go.mod").write_text(text)
    (tools / "m" / "go.sum").write_text("example.org/x v1.0.0 h1:abc=\n")


def test_the_cache_path_is_the_scripts_hash_and_follows_a_version_bump(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TFCRYPT_GO_BIN", str(tmp_path / "cache"))
    tools = tmp_path / "tools"
    _module(tools, "module m\n\ngo 1.26\n")
    script_hash = subprocess.run(
        ["bash", "-c", "cat go.mod go.sum | sha256sum | cut -c1-16"], cwd=tools / "m",
        capture_output=True, text=True, check=True).stdout.strip()
    first = gobin.build_dir("m", tools)
    assert first == tmp_path / "cache" / f"m-{script_hash}"
    (tools / "m" / "go.mod").write_text("module m\n\ngo 1.26\n\nrequire example.org/x v1.0.1\n")
    assert gobin.build_dir("m", tools) != first


def test_a_missing_build_names_the_command_that_makes_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TFCRYPT_GO_BIN", str(tmp_path / "cache"))
    tools = tmp_path / "tools"
    _module(tools, "module m\n")
    with pytest.raises(LabError, match=r"bash scripts/build-go.sh m"):
        gobin.go_binary("m", "prog", tools)
    d = gobin.build_dir("m", tools)
    d.mkdir(parents=True)
    (d / "prog").write_text("")
    with pytest.raises(LabError, match="not built"):  # no .complete: an interrupted build
        gobin.go_binary("m", "prog", tools)
    (d / ".complete").touch()
    assert gobin.go_binary("m", "prog", tools) == d / "prog"
    with pytest.raises(LabError, match="no Go module tools/other"):
        gobin.go_binary("other", "prog", tools)


def test_an_ldflags_file_is_part_of_the_cache_key(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """tools/<m>/ldflags (e.g. kube-apiserver's version stamp) changes the binary, so it
    keys the cache as build-go.sh hashes it: go.mod, go.sum, then ldflags."""
    monkeypatch.setenv("TFCRYPT_GO_BIN", str(tmp_path / "cache"))
    tools = tmp_path / "tools"
    _module(tools, "module m\n")
    without = gobin.build_dir("m", tools)
    (tools / "m" / "ldflags").write_text("-X example.org/x.version=v1\n")
    script_hash = subprocess.run(
        ["bash", "-c", "cat go.mod go.sum ldflags | sha256sum | cut -c1-16"],
        cwd=tools / "m", capture_output=True, text=True, check=True).stdout.strip()
    assert gobin.build_dir("m", tools) == tmp_path / "cache" / f"m-{script_hash}" != without


def test_a_rename_file_is_part_of_the_cache_key_after_ldflags(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """tools/<m>/rename (golang.zx2c4.com/wireguard builds "wireguard", run as
    "wireguard-go") changes what the cache holds, so it keys it as build-go.sh hashes it:
    go.mod, go.sum, ldflags, then rename."""
    monkeypatch.setenv("TFCRYPT_GO_BIN", str(tmp_path / "cache"))
    tools = tmp_path / "tools"
    _module(tools, "module m\n")
    without = gobin.build_dir("m", tools)
    (tools / "m" / "rename").write_text("prog prog-renamed\n")
    script_hash = subprocess.run(
        ["bash", "-c", "cat go.mod go.sum rename | sha256sum | cut -c1-16"],
        cwd=tools / "m", capture_output=True, text=True, check=True).stdout.strip()
    assert gobin.build_dir("m", tools) == tmp_path / "cache" / f"m-{script_hash}" != without
    (tools / "m" / "ldflags").write_text("-s -w\n")
    script_hash = subprocess.run(
        ["bash", "-c", "cat go.mod go.sum ldflags rename | sha256sum | cut -c1-16"],
        cwd=tools / "m", capture_output=True, text=True, check=True).stdout.strip()
    assert gobin.build_dir("m", tools) == tmp_path / "cache" / f"m-{script_hash}"


def test_the_pinned_wireguard_go_is_built_under_its_run_name() -> None:
    """What the lab and the benches start: tools/wireguard-go's build, renamed from
    "wireguard" by its rename file, reporting upstream's version (not Debian's 2022 one)."""
    binary = gobin.go_binary("wireguard-go", "wireguard-go")  # scripts/setup.sh built it
    out = subprocess.run([str(binary), "--version"], capture_output=True, text=True,
                         check=True).stdout
    assert out.startswith("wireguard-go v0.0.2025"), out
