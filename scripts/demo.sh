#!/usr/bin/env bash
# The demo: sets up .venv if needed, then trains on the embedded defaults (the first start converts the
# demo model, ~30 s) and prints held-out accuracy before and after. Extra arguments go to `innerloop
# train`, e.g. --verbose for Ray's, vLLM's and DeepSpeed's output too (else in RUN_DIR/output.log).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/innerloop train "$@"
