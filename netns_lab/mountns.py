"""Per-node persistent mount namespaces: each node has its own /sys, /run/wireguard and
tfcrypt's default paths.

Why: wireguard-go puts its UAPI socket in /var/run/wireguard, shared by every network
namespace; a node's own mount namespace binds `<run_dir>/<node>/wireguard` there, so
`wg show` inside a node sees only that node's devices, and /sys is remounted so it shows
the node's network namespace. The node's agent state dir, status socket directory and
Workload API socket directory are bound onto tfcrypt's default paths (/var/lib/tfcrypt,
/run/tfcrypt, /run/spire/sockets), so `tfcrypt status` or `tfcrypt keys show` inside a
node needs no flags, as on a real node. The mount points are empty directories created
on the host (like /run/wireguard) and left there: other labs share them.

Rules (recipe proven on this machine): the run dir is bind-mounted on itself and made
private, because `unshare --mount=<file>` refuses a file on a shared mount; each node's
namespace is pinned by a bind mount at `<run_dir>/mnt/<node>`. Teardown unmounts those
pins, then the run dir's own bind mount. Unmount only paths that are mount points.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path

from .errors import LabError

SHARED_WG_DIR = Path("/run/wireguard")


def is_mountpoint(path: Path) -> bool:
    target = str(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


def _run(argv: list[str], what: str) -> None:
    res = subprocess.run(argv, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise LabError(f"{what} failed: {res.stderr.strip().replace(chr(10), '; ')}")


def make_run_dir_private(run_dir: Path) -> None:
    _run(["mount", "--bind", str(run_dir), str(run_dir)], f"bind mount of {run_dir}")
    _run(["mount", "--make-private", str(run_dir)], f"make-private of {run_dir}")


def create_node_mount_ns(netns: str, pin: Path, wireguard_dir: Path,
                         binds: Sequence[tuple[Path, Path]] = ()) -> None:
    """Create and pin the node's mount namespace inside its network namespace; each
    (host directory, target) of `binds` is bound onto the target inside it (directories
    created mode 0700: they hold a private key and sockets)."""
    SHARED_WG_DIR.mkdir(parents=True, exist_ok=True)
    wireguard_dir.mkdir(parents=True, exist_ok=True)
    for source, target in binds:
        source.mkdir(parents=True, exist_ok=True, mode=0o700)
        target.mkdir(parents=True, exist_ok=True)
    pin.parent.mkdir(parents=True, exist_ok=True)
    pin.touch()
    script = " && ".join([
        "umount -l /sys", "mount -t sysfs sysfs /sys",
        f"mount --bind '{wireguard_dir}' '{SHARED_WG_DIR}'",
        *(f"mount --bind '{source}' '{target}'" for source, target in binds)])
    _run(["nsenter", f"--net=/run/netns/{netns}", "unshare", f"--mount={pin}",
          "--propagation", "slave", "sh", "-c", script], f"mount namespace for {netns}")


def unmount(path: Path) -> None:
    """Unmount `path` if it is a mount point; absence is fine."""
    if is_mountpoint(path):
        _run(["umount", str(path)], f"umount {path}")
