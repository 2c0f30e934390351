"""This node's WireGuard key and the epoch that orders its records.

Rules:
- The key lives in the state directory (tfcrypt.wireguard.keys); the epoch beside it in
  `epoch`. A new or rotated key gets epoch max(previous + 1, now in unix seconds), so a
  node whose state directory was lost still publishes an epoch above its old records
  (peers reject lower epochs as rollbacks).
- Re-signing after an SVID rotation keeps the epoch: the record did not change.
- A writer publishes above what etcd last held for its key (`publish_above`): a record
  of ours at a higher epoch (another agent instance, a restored backup of the state dir)
  would otherwise make every reader refuse ours as a rollback for good.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from tfcrypt.wireguard import keys

EPOCH_FILE = "epoch"


@dataclass(frozen=True)
class NodeKey:
    key: keys.KeyLoad
    epoch: int

    @property
    def public_key(self) -> str:
        return self.key.public_key_b64


def _read_epoch(state_dir: Path) -> int | None:
    try:
        text = (state_dir / EPOCH_FILE).read_text().strip()
        return int(text) if text.isdigit() else None
    except OSError:
        return None


def _write_epoch(state_dir: Path, epoch: int) -> None:
    tmp = state_dir / f".{EPOCH_FILE}.tmp"
    tmp.write_text(f"{epoch}\n")
    os.replace(tmp, state_dir / EPOCH_FILE)


def _next_epoch(state_dir: Path, now: float) -> int:
    return max((_read_epoch(state_dir) or 0) + 1, int(now))


def load_node_key(state_dir: Path | str, now: float, fallback: bytes | None = None) -> NodeKey:
    state_dir = Path(state_dir)
    loaded = keys.load_or_create(state_dir, fallback=fallback)
    epoch = _read_epoch(state_dir)
    if loaded.created or epoch is None:
        epoch = _next_epoch(state_dir, now)
        _write_epoch(state_dir, epoch)
    return NodeKey(loaded, epoch)


def rotate_node_key(state_dir: Path | str, now: float) -> NodeKey:
    state_dir = Path(state_dir)
    epoch = _next_epoch(state_dir, now)
    loaded = keys.rotate(state_dir)
    _write_epoch(state_dir, epoch)
    return NodeKey(loaded, epoch)


def key_file_stamp(state_dir: Path | str) -> tuple[int, int] | None:
    """(inode, mtime) of the key file: a rotation by `tfcrypt keys rotate` changes it."""
    try:
        st = (Path(state_dir) / keys.KEY_FILE).stat()
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns)


def publish_above(state_dir: Path | str, node_key: NodeKey, floor: int) -> NodeKey:
    """The same key at epoch `floor + 1`, saved: etcd held a record of ours at `floor`
    (another agent instance for this node, a restored backup of the state dir) that
    readers have accepted, so anything lower would be refused as a rollback for good."""
    epoch = max(floor + 1, node_key.epoch)
    _write_epoch(Path(state_dir), epoch)
    return NodeKey(node_key.key, epoch)
