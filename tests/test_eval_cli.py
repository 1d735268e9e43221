"""`innerloop eval` end to end: the real CLI, a real vLLM engine, the tiny model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.tiny_model import build_tiny_model

REPO = Path(__file__).resolve().parent.parent


def _innerloop(*args: str) -> subprocess.CompletedProcess:
    cli = Path(sys.executable).parent / "innerloop"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([str(cli), *args], capture_output=True, text=True, timeout=600, env=env, cwd=REPO)


@pytest.mark.integration
def test_eval_reports_accuracy_of_a_model_folder(tmp_path):
    model = build_tiny_model(tmp_path / "tiny")
    result = _innerloop("eval", str(model), "--set", "model.dtype=float32", "--set", "tasks.eval_count=12",
                        "--set", "eval.max_tokens=8", "--set", "rollout.kv_cache_gib=0.25")
    assert result.returncode == 0, result.stderr[-3000:]
    # A random tiny model answers nothing right; the line must still count all 12 held-out questions.
    assert f"held-out accuracy of {model}: 0.0% (0/12;" in result.stdout


def test_eval_of_a_missing_model_fails_clearly(tmp_path):
    result = _innerloop("eval", str(tmp_path / "no-such-model"))
    assert result.returncode == 2
    assert "no such folder" in result.stderr and "Traceback" not in result.stderr
