"""Exactly-once resume with the real stack: kill -9 the whole job mid-run, resume, and compare.

Three real jobs, each `innerloop train` in its own process with its own Ray cluster, vLLM engine and
DeepSpeed learner on the tiny model: an uninterrupted run of K steps; the same config killed with
SIGKILL (the driver and every process under it) once step k's checkpoint exists; then
`innerloop train --resume RUN_DIR` to K. The steps after k must repeat the uninterrupted run's
metrics, and the ledger must show every question consumed exactly once.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from innerloop.distributed.state.tracking import RunDir
from tests.tiny_model import build_tiny_model

REPO_ROOT = Path(__file__).resolve().parents[1]
STEPS, KILL_AFTER = 4, 2
JOB_TIMEOUT_S = 600


def varies(key: str) -> bool:
    """Wall times and throughputs differ run to run; everything else a step logs must repeat."""
    return key.startswith("time") or key.endswith(("_seconds", "_per_s"))

# Same seeds, same weights, same kernels: the runs agree exactly in practice; this only allows for
# a reduction order that a different thread schedule could change.
REL_TOL = 1e-5


def _overrides(model: Path) -> list[str]:
    return [f"model.name={model}", "model.dtype=float32", "rollout.max_tokens=16", "rollout.temperature=1.0",
            "rollout.questions_per_step=4", "rollout.group_size=4", "learner.micro_batch_size=8",
            "reward.kind=custom", "reward.custom=tests.doubles:length_reward", "tasks.eval_count=8",
            "tasks.train_count=50", f"train.steps={STEPS}", "train.checkpoint_every=1", "learner.lr=1e-3",
            "rollout.max_model_len=512", "rollout.kv_cache_gib=0.25", "eval.before_and_after=false",
            "train.export_final_model=false", "train.max_minutes=0", "train.keep_checkpoints=5"]


def _job(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    env.pop("RAY_ADDRESS", None)  # each job starts its own cluster, as a user's would
    return subprocess.Popen([sys.executable, "-m", "innerloop.distributed.cli", "train", *args],
                            stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT,
                            start_new_session=True)


def _finish(job: subprocess.Popen, log: Path) -> None:
    try:
        code = job.wait(timeout=JOB_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        _kill_tree(job.pid)
        code = "timeout"
    assert code == 0, f"job failed ({code}):\n{log.read_text()[-4000:]}"


def _kill_tree(pid: int) -> int:
    """SIGKILL a process and everything under it (Ray's head, actors, vLLM's engine): a dead job."""
    import psutil

    root = psutil.Process(pid)
    everyone = [root, *root.children(recursive=True)]
    for process in everyone:
        try:
            process.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(everyone, timeout=30)
    return len(everyone)


def _steps(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in RunDir(run_dir).read_metrics() if "event" not in r}


@pytest.mark.integration
def test_kill_9_then_resume_repeats_the_uninterrupted_run_exactly_once(tmp_path):
    model = build_tiny_model(tmp_path / "model")
    plain, cut = tmp_path / "plain", tmp_path / "cut"

    _finish(_job(["--run-dir", str(plain), *sum((["--set", o] for o in _overrides(model)), [])],
                 tmp_path / "plain.log"), tmp_path / "plain.log")

    job = _job(["--run-dir", str(cut), *sum((["--set", o] for o in _overrides(model)), [])], tmp_path / "cut.log")
    marker = cut / "checkpoints" / f"step-{KILL_AFTER:06d}" / "manifest.json"
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not marker.exists() and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists(), f"no checkpoint of step {KILL_AFTER}:\n{(tmp_path / 'cut.log').read_text()[-4000:]}"
    killed = _kill_tree(job.pid)
    assert killed > 3  # the driver, Ray's own processes, the actors: the whole job
    assert max(_steps(cut)) < STEPS, "the job finished before it was killed"

    _finish(_job(["--resume", str(cut)], tmp_path / "resume.log"), tmp_path / "resume.log")

    expected, got = _steps(plain), _steps(cut)
    assert sorted(got) == list(range(1, STEPS + 1))  # each step logged once, however far the killed run got
    for step in range(KILL_AFTER + 1, STEPS + 1):
        for key, value in expected[step].items():
            if varies(key) or not isinstance(value, (int, float)):
                continue
            assert math.isclose(got[step][key], value, rel_tol=REL_TOL, abs_tol=1e-9), (step, key, got[step][key], value)
    ledger = RunDir(cut).read_ledger()
    assert ledger == RunDir(plain).read_ledger()
    consumed = [q for record in ledger for q in record["questions"]]
    assert len(consumed) == len(set(consumed)) == STEPS * 4  # within one epoch: every question once


def _session_processes(session: int) -> list:
    import psutil

    alive = []
    for process in psutil.process_iter():
        try:
            if os.getsid(process.pid) == session and process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process)
        except (ProcessLookupError, psutil.Error):
            pass
    return alive


@pytest.mark.integration
def test_sigterm_stops_after_the_step_saves_it_and_leaves_no_process(tmp_path):
    """What Slurm and Kubernetes send before SIGKILL: the run saves its last step and exits cleanly."""
    model = build_tiny_model(tmp_path / "model")
    run = tmp_path / "run"
    overrides = [*_overrides(model), "train.steps=50", "train.checkpoint_every=20"]
    job = _job(["--run-dir", str(run), *sum((["--set", o] for o in overrides), [])], tmp_path / "run.log")
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not _steps(run) and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _steps(run), f"no step logged:\n{(tmp_path / 'run.log').read_text()[-4000:]}"
    job.send_signal(signal.SIGTERM)  # the driver only, as a scheduler does first
    code = job.wait(timeout=120)
    log = (tmp_path / "run.log").read_text()
    assert code == 143, log[-4000:]
    last = max(_steps(run))
    assert last < 50 and (run / "checkpoints" / f"step-{last:06d}" / "manifest.json").is_file()
    assert f"stopped by SIGTERM after step {last}, which is saved" in log
    assert not list((run / "checkpoints").glob(".partial-*")) and not (run / ".lock").exists()
    time.sleep(2)  # Ray's last processes exit right after the driver
    assert not _session_processes(job.pid), [p.name() for p in _session_processes(job.pid)]
