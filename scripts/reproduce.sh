#!/usr/bin/env bash
# A single-run walkthrough of the lens on the demo model and task (CPU, ~1 hour; the evidence with
# seeds and intervals is configs/sweeps/, docs/meta-learning.md):
# (a) update subsets m in {1, 2, 4, 8} of G = 8, (b) GRPO from the base model vs an SFT cold start
# on the task generator's worked solutions then GRPO, (c) inner-loop probe curves during the m = 8 run.
# Each run writes runs/repro-*/; then `innerloop report` makes one HTML page per run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/innerloop prepare-model >/dev/null
common=(--set train.steps=20 --set train.max_minutes=0 --set train.checkpoint_every=0 --set eval.every=10)
for m in 8 4 2 1; do
  extra=()
  [ "$m" = 8 ] && extra=(--set probe.every_steps=5 --set probe.questions=8 --set probe.samples=4)
  .venv/bin/innerloop train --run-dir "runs/repro-m$m" "${common[@]}" --set algorithm.update_subset=$m "${extra[@]}"
done
.venv/bin/innerloop train --run-dir runs/repro-sft "${common[@]}" --set sft.steps=10
for run in runs/repro-*/; do .venv/bin/innerloop report "$run"; done
