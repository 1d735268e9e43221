"""A failed or colliding `innerloop train` leaves a run directory as it was (no Ray is started here).

- every start-up check runs before anything is written: a resume whose override is wrong fails, and
  the run's config.yaml is byte for byte what it was;
- a run directory is locked by the process training in it: a second one is refused at once, naming it.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from innerloop.distributed import cli
from tests.tiny_model import build_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    """A local model folder, so the start-up checks never convert the default model."""
    return f"model.name={build_tiny_model(tmp_path_factory.mktemp('tiny'))}"


@pytest.fixture
def stopped_run(tmp_path):
    """A run directory as a run that stopped after its checkpoint of step 2 leaves it."""
    run = tmp_path / "run"
    (run / "checkpoints" / "step-000002").mkdir(parents=True)
    (run / "checkpoints" / "step-000002" / "state.json").write_text("{}")
    (run / "config.yaml").write_text("train:\n  steps: 5\n")
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1}) + "\n")
    return run


def snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_resume_with_a_bad_override_fails_and_changes_nothing(stopped_run, capsys):
    before = snapshot(stopped_run)
    code = cli.main(["train", "--resume", str(stopped_run), "--set", "tasks.source=dataset",
                     "--set", "tasks.path=typo.jsonl"])
    assert code == 2 and "typo.jsonl" in capsys.readouterr().err
    assert snapshot(stopped_run) == before  # config.yaml included: a plain --resume still works


def test_a_second_process_is_refused_while_one_trains(stopped_run, tiny, capsys):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from innerloop.distributed.state.lock import RunLock\n"
         f"RunLock({str(stopped_run)!r}).acquire(); print('locked', flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = snapshot(stopped_run)
        code = cli.main(["train", "--resume", str(stopped_run), "--set", "train.steps=9", "--set", tiny])
        err = capsys.readouterr().err
        assert code == 1 and f"process {holder.pid} on" in err and "is training in it" in err
        assert snapshot(stopped_run) == before
    finally:
        holder.kill()
        holder.wait(timeout=30)


def test_a_run_directory_that_cannot_be_made_is_a_clear_error(tmp_path, tiny, capsys):
    (tmp_path / "file").write_text("not a folder")
    assert cli.main(["train", "--run-dir", str(tmp_path / "file" / "run"), "--set", tiny]) == 2
    assert "cannot create the run directory" in capsys.readouterr().err
