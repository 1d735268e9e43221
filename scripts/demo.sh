#!/usr/bin/env bash
# The demo: sets up .venv if needed, converts the demo model once, then trains on the embedded
# defaults and prints held-out accuracy before and after. Extra arguments go to `innerloop train`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/innerloop prepare-model
exec .venv/bin/innerloop train "$@"
