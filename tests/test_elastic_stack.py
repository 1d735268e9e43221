"""Learners resized in-job and a killed rank restored from the in-memory snapshot, on the real stack.

One real Ray cluster, vLLM CPU engine and DeepSpeed learner (gloo) on the tiny fp32 model, shared by
the module. Each run starts from fresh ranks (the initial weights), so runs compare step by step:

- a run that never resized (the reference);
- the same run with learner.rank_schedule {1: 2, 3: 1}: 1 rank, then 2, then 1 again, each change a
  checkpoint, a restart and a resharded load between steps;
- the same run with recovery.learner_snapshot, its learner rank SIGKILLed by pid once step 2 is logged.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `tests.doubles`, as the workers import it
    sys.path.insert(0, str(REPO_ROOT))

from innerloop.distributed.config_load import load_config  # noqa: E402
from innerloop.distributed.run.driver import Trainer  # noqa: E402
from innerloop.distributed.state.tracking import RunDir  # noqa: E402
from tests.tiny_model import build_tiny_model  # noqa: E402

STEPS = 4
# Ranks split the batch differently from one rank: the same loss and gradient up to the order of a
# float32 reduction (the two-rank test in test_integration.py sees 1e-5); a few steps of Adam on it.
RESIZED_REL_TOL = 1e-4
SAME_RANKS_REL_TOL = 1e-5  # the resume test's: the same kernels on the same state


def _overrides(model: Path) -> list[str]:
    return [f"model.name={model}", "model.dtype=float32", "rollout.max_tokens=16", "rollout.temperature=1.0",
            "rollout.questions_per_step=4", "rollout.group_size=4", "learner.micro_batch_size=4",
            "reward.kind=custom", "reward.custom=tests.doubles:length_reward", "tasks.eval_count=8",
            "tasks.train_count=50", f"train.steps={STEPS}", "train.checkpoint_every=0", "learner.lr=1e-3",
            "learner.zero_stage=2", "rollout.max_model_len=512", "rollout.kv_cache_gib=0.25",
            "eval.before_and_after=false", "train.export_final_model=false", "train.max_minutes=0",
            "train.keep_checkpoints=5"]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    import ray

    from innerloop.distributed.cluster.fleet import Fleet

    model = build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")
    saved = os.environ.get("PYTHONPATH")  # the workers and the scoring process import tests.doubles
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *([saved] if saved else [])])
    try:
        fleet = Fleet.start(load_config(None, _overrides(model)), str(model))
        fleet.model = model
        try:
            yield fleet
        finally:
            fleet.shutdown()
    finally:
        ray.shutdown()
        os.environ.pop("PYTHONPATH", None) if saved is None else os.environ.update(PYTHONPATH=saved)


def _train(fleet, run_dir: Path, *overrides: str):
    """A run from fresh ranks (the initial weights), on the module's fleet."""
    cfg = load_config(None, [*_overrides(fleet.model), *overrides])
    fleet.resize_learners(cfg.learner.ranks)
    return Trainer(cfg, run_dir).train(actors=fleet)


@pytest.fixture(scope="module")
def plain(fleet, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("plain") / "run"
    _train(fleet, run_dir)
    return run_dir


def _steps(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in RunDir(run_dir).read_metrics() if "event" not in r}


def _events(run_dir: Path, name: str) -> list[dict]:
    return [r for r in RunDir(run_dir).read_metrics() if r.get("event") == name]


def _assert_steps_match(got: Path, expected: Path, steps, rel_tol: float) -> None:
    """Every number a step logs, as the resume test compares them (wall times and rates aside)."""
    want, have = _steps(expected), _steps(got)
    assert sorted(have) == list(range(1, STEPS + 1))
    for step in steps:
        for key, value in want[step].items():
            if key.startswith("time") or key.endswith(("_seconds", "_per_s")) or not isinstance(value, (int, float)):
                continue
            assert math.isclose(have[step][key], value, rel_tol=rel_tol, abs_tol=1e-7), (step, key, have[step][key], value)
    assert RunDir(got).read_ledger() == RunDir(expected).read_ledger()


@pytest.mark.integration
def test_learners_resized_1_2_1_in_job_repeat_the_run_that_never_resized(fleet, plain, tmp_path):
    run_dir = tmp_path / "resized"
    result = _train(fleet, run_dir, "learner.rank_schedule={1: 2, 3: 1}")

    assert result.steps_done == STEPS and fleet.learner_ranks == len(fleet.learners) == 1
    scaled = _events(run_dir, "learner_ranks_scaled")
    assert [(r["step"], r["from"], r["to"]) for r in scaled] == [(1, 1, 2), (3, 2, 1)]
    assert all(r["seconds"] > 0 for r in scaled)
    print("resizes:", scaled)  # what each cost, seen with pytest -s
    # Steps 2 and 3 ran on two ranks, step 4 on one again: each update's numbers are the unresized run's.
    _assert_steps_match(run_dir, plain, range(1, STEPS + 1), RESIZED_REL_TOL)
    assert not list((run_dir / "checkpoints").glob(".universal-*"))  # the converted copies are removed


@pytest.mark.integration
def test_a_killed_learner_restores_its_snapshot_and_loses_no_step(fleet, plain, tmp_path):
    import ray

    run_dir = tmp_path / "killed"
    cfg = load_config(None, [*_overrides(fleet.model), "recovery.learner_snapshot=true"])
    fleet.resize_learners(1)
    pid = ray.get(fleet.learners[0].__ray_call__.remote(lambda learner: os.getpid()))
    killed = threading.Event()

    def kill_after_step_2():
        deadline = time.monotonic() + 300
        while 2 not in _steps(run_dir) and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(pid, signal.SIGKILL)  # during step 3: its generation or its update
        killed.set()

    threading.Thread(target=kill_after_step_2, daemon=True).start()
    result = Trainer(cfg, run_dir).train(actors=fleet)

    assert killed.is_set() and result.steps_done == STEPS
    [restart] = _events(run_dir, "learners_restarted")
    assert (restart["step"], restart["restored_from"], restart["steps_lost"]) == (2, "snapshot", 0)
    print("restart:", restart, "snapshot seconds:", [r["time_snapshot"] for r in _steps(run_dir).values()])
    assert not (run_dir / "superseded.jsonl").exists()  # nothing logged was taken back
    assert all(r["time_snapshot"] > 0 for r in _steps(run_dir).values())
    # The same ranks on the same state: steps 3 and 4 are the unkilled run's, as after a resume.
    _assert_steps_match(run_dir, plain, range(1, STEPS + 1), SAME_RANKS_REL_TOL)
