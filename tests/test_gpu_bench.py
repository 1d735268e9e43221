"""The GPU benchmark: rollout and update tokens/s and weight-sync time on one lent GPU.

Skipped without CUDA (the `gpu` marker). On a GPU machine with the gpu extra installed:
    .venv/bin/python -m pytest -q -m gpu tests/test_gpu_bench.py
writes runs/bench-gpu/*.json, the figures docs/performance.md asks to record with the card's name.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
OUT = REPO_ROOT / "runs" / "bench-gpu"


def _bench(name: str, *extra: str) -> dict:
    command = [sys.executable, "scripts/bench.py", name, "--gpu", "--reps", "3", "--out", str(OUT), *extra]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads((OUT / f"{name}.json").read_text())


@pytest.mark.gpu
def test_gpu_rollout_tokens_per_s():
    result = _bench("rollout", "--questions", "32")
    assert result["ours_tokens_per_s"] > 0 and result["machine"]["gpu"]


@pytest.mark.gpu
def test_gpu_update_tokens_per_s():
    result = _bench("learner", "--questions", "32")
    assert result["ours_tokens_per_s"] > 0 and result["bare_tokens_per_s"] > 0


@pytest.mark.gpu
def test_gpu_weight_sync_seconds():
    rows = _bench("sync")["rows"]
    assert [r["model"] for r in rows] == ["tiny", "135M", "0.5B"] and all(r["sync_s_median"] > 0 for r in rows)
