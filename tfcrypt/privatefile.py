"""Replacing a private file atomically: the one way tfcrypt writes its key, its rollback
floors and its status document.

Why one helper: each of those files must never be seen half-written (a reader after a
crash finds the old content or the new, whole) nor, even for an instant, with a mode wider
than 0600 (a wider file from an older version is replaced by rename, not chmodded, so no
reader sees the new content under the old mode). `durable` adds the fsyncs of the file and
of its directory, for files whose loss after a power cut matters (the key, the floors);
the status document is rewritten every reconcile and needs neither.
"""

from __future__ import annotations

import os
from pathlib import Path

PRIVATE_MODE = 0o600


def write_private(path: Path, data: bytes, *, durable: bool = True) -> None:
    """Replace `path` with `data`: a 0600 temporary beside it (O_EXCL, never following a
    link), written whole, then renamed over `path`. Raises OSError; nothing is left
    behind on failure."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW,
                 PRIVATE_MODE)
    try:
        try:
            os.fchmod(fd, PRIVATE_MODE)  # the umask may have narrowed or the mode kept it
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
