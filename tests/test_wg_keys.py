"""The WireGuard private key at rest: created 0600, reloaded identical, repaired, rotated."""

from __future__ import annotations

import base64
import os
import stat
import subprocess
from pathlib import Path

import pytest

from tfcrypt.wireguard.keys import KEY_FILE, load_or_create, public_key_of, rotate


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_created_0600_in_wg_genkey_format_and_reloaded_identical(tmp_path: Path) -> None:
    first = load_or_create(tmp_path / "state")
    path = tmp_path / "state" / KEY_FILE
    assert first.created and first.problem is None
    assert mode_of(path) == 0o600
    text = path.read_text()
    assert text.endswith("\n") and len(base64.b64decode(text.strip(), validate=True)) == 32

    again = load_or_create(tmp_path / "state")
    assert not again.created and again.problem is None
    assert again.private_key == first.private_key
    assert again.public_key_b64 == first.public_key_b64
    assert [p.name for p in path.parent.iterdir()] == [KEY_FILE]


def test_key_never_in_repr(tmp_path: Path) -> None:
    loaded = load_or_create(tmp_path)
    assert loaded.private_key_b64 not in repr(loaded)
    assert repr(loaded.private_key) not in repr(loaded)


@pytest.mark.parametrize("content", [b"not base64 at all!\n", base64.b64encode(b"x" * 31) + b"\n"])
def test_corrupt_without_fallback_moved_aside_and_replaced(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / KEY_FILE
    path.write_bytes(content)
    os.chmod(path, 0o600)

    loaded = load_or_create(tmp_path)

    assert loaded.created
    assert loaded.problem is not None and "corrupt" in loaded.problem
    asides = sorted(p for p in tmp_path.iterdir() if p.name.startswith(f"{KEY_FILE}.corrupt-"))
    assert len(asides) == 1 and asides[0].read_bytes() == content
    assert base64.b64decode(path.read_text().strip()) == loaded.private_key
    assert mode_of(path) == 0o600


def test_corrupt_with_fallback_rewritten_with_running_key(tmp_path: Path) -> None:
    running = load_or_create(tmp_path / "other").private_key
    path = tmp_path / KEY_FILE
    path.write_bytes(b"garbage")

    loaded = load_or_create(tmp_path, fallback=running)

    assert not loaded.created
    assert loaded.private_key == running
    assert loaded.problem is not None and "running device" in loaded.problem
    assert base64.b64encode(running).decode() not in loaded.problem
    assert base64.b64decode(path.read_text().strip()) == running
    assert not [p for p in tmp_path.iterdir() if ".corrupt-" in p.name]


def test_missing_file_with_fallback_keeps_running_key(tmp_path: Path) -> None:
    running = load_or_create(tmp_path / "other").private_key
    loaded = load_or_create(tmp_path / "fresh", fallback=running)
    assert loaded.private_key == running and not loaded.created
    assert loaded.problem is not None and "missing" in loaded.problem


def test_wide_mode_fixed_and_reported_key_kept(tmp_path: Path) -> None:
    first = load_or_create(tmp_path)
    path = tmp_path / KEY_FILE
    os.chmod(path, 0o644)

    loaded = load_or_create(tmp_path)

    assert mode_of(path) == 0o600
    assert loaded.problem is not None and "0644" in loaded.problem
    assert loaded.private_key == first.private_key and not loaded.created


def test_symlink_is_not_followed(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_text(base64.b64encode(b"k" * 32).decode() + "\n")
    (tmp_path / KEY_FILE).symlink_to(target)

    loaded = load_or_create(tmp_path)

    assert loaded.created and loaded.problem is not None and "symbolic link" in loaded.problem
    assert not (tmp_path / KEY_FILE).is_symlink()


def test_rotate_gives_a_different_key_and_persists_it(tmp_path: Path) -> None:
    first = load_or_create(tmp_path)
    rotated = rotate(tmp_path)
    assert rotated.private_key != first.private_key
    assert rotated.public_key_b64 != first.public_key_b64
    assert load_or_create(tmp_path).private_key == rotated.private_key
    assert mode_of(tmp_path / KEY_FILE) == 0o600


def test_public_key_matches_wg_pubkey(tmp_path: Path) -> None:
    loaded = load_or_create(tmp_path)
    wg = subprocess.run(
        ["wg", "pubkey"], input=(tmp_path / KEY_FILE).read_bytes(),
        capture_output=True, check=True,
    )
    assert wg.stdout.decode().strip() == loaded.public_key_b64


def test_public_key_of_matches_wg_for_a_wg_genkey_key() -> None:
    private = subprocess.run(["wg", "genkey"], capture_output=True, check=True).stdout
    public = subprocess.run(["wg", "pubkey"], input=private, capture_output=True, check=True)
    assert public_key_of(base64.b64decode(private.strip())) == public.stdout.decode().strip()
