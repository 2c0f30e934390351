#!/usr/bin/env bash
# Every benchmark figure of bench/ (issue #7) from one command, as root: set-up, the
# bench extra (matplotlib), then `python -m bench all`. Arguments go to `python -m bench`
# after `all` (e.g. --quick). Run it on a quiet machine: the figures are ratios taken side
# by side, but two cores shared with other work still blur them.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/pip install -q --disable-pip-version-check -e '.[test,bench]'
exec .venv/bin/python -m bench all "$@"
