"""Per-node persistent mount namespaces, so each node has its own /sys and /run/wireguard.

Why: wireguard-go puts its UAPI socket in /var/run/wireguard, shared by every network
namespace; a node's own mount namespace binds `<run_dir>/<node>/wireguard` there, so
`wg show` inside a node sees only that node's devices, and /sys is remounted so it shows
the node's network namespace.

Rules (recipe proven on this machine): the run dir is bind-mounted on itself and made
private, because `unshare --mount=<file>` refuses a file on a shared mount; each node's
namespace is pinned by a bind mount at `<run_dir>/mnt/<node>`. Teardown unmounts those
pins, then the run dir's own bind mount. Unmount only paths that are mount points.
"""

from __future__ import annotations

import subprocess
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


def create_node_mount_ns(netns: str, pin: Path, wireguard_dir: Path) -> None:
    """Create and pin the node's mount namespace inside its network namespace."""
    SHARED_WG_DIR.mkdir(parents=True, exist_ok=True)
    wireguard_dir.mkdir(parents=True, exist_ok=True)
    pin.parent.mkdir(parents=True, exist_ok=True)
    pin.touch()
    script = (
        "umount -l /sys && mount -t sysfs sysfs /sys && "
        f"mount --bind '{wireguard_dir}' '{SHARED_WG_DIR}'"
    )
    _run(["nsenter", f"--net=/run/netns/{netns}", "unshare", f"--mount={pin}",
          "--propagation", "slave", "sh", "-c", script], f"mount namespace for {netns}")


def unmount(path: Path) -> None:
    """Unmount `path` if it is a mount point; absence is fine."""
    if is_mountpoint(path):
        _run(["umount", str(path)], f"umount {path}")
