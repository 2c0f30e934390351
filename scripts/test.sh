#!/usr/bin/env bash
# The whole test suite, as CI runs it: set-up, lint, type check, then every test tier
# (pure core, reconcilers against fakes, the lab tier in real namespaces) and, last, the
# kernel tier: the lab tests marked `kernel` again, inside Debian's current kernel under
# qemu (TCG), with agents using the kernel WireGuard backend (docs/lab.md).
#
#   bash scripts/test.sh               everything, kernel tier included
#   bash scripts/test.sh ARGS...       setup, lint, then pytest ARGS on the host only
#   bash scripts/test.sh --kernel [ARGS...]
#                                      setup, lint, then only the kernel tier (ARGS go to
#                                      pytest inside the guest, e.g. -k mesh)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/mypy --strict tfcrypt/core tfcrypt/model

kernel_tier() {
    # Deadlines x6 in the guest: TCG runs Python several times slower than the host.
    # The lab server issues the guest's SVIDs: SPIRE under TCG more than doubled the tier
    # (16.7 min against ~7.5, measured 2026-12-03); the host tiers run on SPIRE.
    .venv/bin/python -m netns_lab guest --timeout 2400 \
        --env NETNS_LAB_BACKEND=kernel --env NETNS_LAB_TIMEOUT_SCALE=6 \
        --env NETNS_LAB_WORKLOAD_API=lab -- \
        .venv/bin/pytest -q -p no:cacheprovider -m kernel --timeout 900 "$@" tests/
}

if [ "${1:-}" = "--kernel" ]; then
    shift
    kernel_tier "$@"
    exit
fi
if [ $# -gt 0 ]; then
    exec .venv/bin/pytest -q -p no:cacheprovider "$@"
fi
# Two workers, each given whole files (a module's lab stays in one worker): the lab tests
# mostly wait on real processes (CPU ~40% of one core, measured), and labs never collide
# (random names, their own namespaces). TFCRYPT_TEST_WORKERS=0 runs them in this process.
.venv/bin/pytest -q -p no:cacheprovider -n "${TFCRYPT_TEST_WORKERS:-2}" --dist loadfile
kernel_tier
