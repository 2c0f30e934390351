#!/usr/bin/env bash
# The whole test suite, as CI runs it: set-up, lint, type check, then every test tier
# (pure core, reconcilers against fakes, and the lab tier in real namespaces).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/mypy --strict tfcrypt/core tfcrypt/model
exec .venv/bin/pytest -q -p no:cacheprovider "$@"
