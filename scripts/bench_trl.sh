#!/usr/bin/env bash
# TRL's GRPOTrainer on the demo workload (the peer of `scripts/bench.py step`), in .venv-bench:
# a venv that sees .venv's packages and adds TRL and accelerate, so .venv itself never changes.
# Arguments go to scripts/bench_trl.py, e.g. --steps 4 --use-vllm.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ ! -x .venv-bench/bin/python ]; then
  python3 -m venv .venv-bench
  site=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  bench_site=$(.venv-bench/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  # addsitedir, not a bare path: .venv's own .pth files (innerloop's editable install) must load too.
  echo "import site; site.addsitedir('$site')" > "$bench_site/innerloop-venv.pth"
  # No dependency resolution: everything TRL needs but accelerate is already in .venv, pinned.
  .venv-bench/bin/pip install -q --no-deps "trl==1.16.0" "accelerate==1.13.0"
fi
exec .venv-bench/bin/python scripts/bench_trl.py "$@"
