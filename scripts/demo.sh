#!/usr/bin/env bash
# The main job: set-up, then the lab demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m netns_lab demo "$@"
