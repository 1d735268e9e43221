#!/usr/bin/env bash
# The GPU check: one command on a machine with one CUDA GPU, about 10 minutes, JSON out.
#
#   bash scripts/gpu_check.sh            # results in runs/gpu-check/ (GPU_CHECK_OUT=... to move them)
#
# 1. the gpu-marked tests (tests/test_gpu.py: colocated sleep, CUDA IPC sync, exact weights);
# 2. weight-sync time, CUDA IPC (colocated) against the object store, for ~0.5B and ~1.5B models;
# 3. rollout tokens/s, our worker against bare vLLM on the same engine settings;
# 4. a short training run's step breakdown and each process's peak memory.
# Each part has its own time limit, so one that hangs cannot take the others' time; a part that
# fails is recorded in summary.json and the rest still run. Set-up (first run): .venv-gpu with
# vLLM's CUDA build (the `gpu` extra), which needs the package index; PYTHON=... to use another.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${GPU_CHECK_OUT:-runs/gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

PY=${PYTHON:-.venv-gpu/bin/python}
if ! "$PY" -c "import torch, vllm, deepspeed, ray; assert torch.cuda.is_available()" 2>/dev/null; then
  if [ -n "${PYTHON:-}" ]; then
    echo "gpu_check: $PY lacks torch with CUDA, vllm, deepspeed or ray (pip install -e '.[gpu,dev]')" >&2
    exit 2
  fi
  echo "gpu_check: setting up .venv-gpu (vLLM's CUDA build; a few minutes)"
  python3 -m venv .venv-gpu && .venv-gpu/bin/pip install -q -U pip && .venv-gpu/bin/pip install -q -e ".[gpu,dev]" \
    || { echo "gpu_check: set-up failed; install innerloop with the gpu extra and rerun with PYTHON=..." >&2; exit 2; }
fi
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('gpu_check on', torch.cuda.get_device_name(0))" || exit 2

status=()
part() {  # part NAME SECONDS COMMAND...: run one part under its limit, log it, record its exit status
  local name=$1 limit=$2; shift 2
  echo "== $name (at most ${limit} s)"
  timeout "$limit" "$@" > >(tee "$OUT/$name.log") 2>&1
  local rc=$?
  status+=("\"$name\": $rc")
  echo "== $name: exit $rc"
}

part tests 150 "$PY" -m pytest -q -m gpu tests/test_gpu.py --junitxml "$OUT/tests.xml"
part sync 200 "$PY" scripts/bench_sync.py --gpu --models 0.5B,1.5B --workers 1 --reps 3 --out "$OUT"
part rollout 120 "$PY" scripts/bench.py rollout_vllm --gpu --questions 32 --reps 3 --max-tokens 256 --out "$OUT"
part step 150 "$PY" scripts/bench.py step --gpu --steps 4 --out "$OUT"

"$PY" - "$OUT" "{$(IFS=,; echo "${status[*]}")}" <<'EOF'
import json, sys
from pathlib import Path

out, status = Path(sys.argv[1]), json.loads(sys.argv[2])
found = {p.stem: json.loads(p.read_text()) for p in out.glob("*.json") if p.stem != "summary"}
summary = {"exit_status": status, "results": found}
(out / "summary.json").write_text(json.dumps(summary, indent=1))
print(json.dumps({"exit_status": status, "files": sorted(found)}, indent=1))
sys.exit(0 if all(rc == 0 for rc in status.values()) else 1)
EOF
