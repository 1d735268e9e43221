"""The run directory and what is written into it: resolved config, metrics (JSONL, then the trackers).

run_dir/
  config.yaml          the resolved config (defaults, file and overrides merged)
  metrics.jsonl        one JSON object per step, plus the eval and event records
  ledger.jsonl         the question ids each step consumed: exactly once each, across resumes
  trajectories.jsonl   one line per trajectory trained on: question, reward, length, policy version, staleness
  superseded.jsonl     records of steps a resume (or recovery) went back over, kept for inspection
  stacks/              stack dumps of every process, written when a phase overran its deadline
  bad_steps/           the data of steps skipped for a NaN/inf loss
  tensorboard/         event files for `tensorboard --logdir run_dir`
  mlruns/, wandb/      the MLflow store and the W&B run files, where tracking.backends names them (trackers.py)
  trackers.json        what continues the same tracker runs on a resume: run ids, the last step each was sent
  checkpoints/step-N/  model (Hugging Face folder), DeepSpeed state, driver state
  final_model/         the exported Hugging Face folder
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from innerloop.distributed.config import Config
from innerloop.distributed.state.lock import RunLock
from innerloop.distributed.state.trackers import Trackers


@dataclass(frozen=True)
class ScaleRequest:
    """What `innerloop scale` asked of a running job; None: no change asked."""
    rollout_workers: int | None = None
    learner_ranks: int | None = None


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path).resolve()
        self.lock = RunLock(self.path)  # makes the folder too, with a clear error where it cannot
        self.lock.make_folder()
        self.checkpoints = self.path / "checkpoints"
        self.final_model = self.path / "final_model"
        self.metrics_file = self.path / "metrics.jsonl"
        self.ledger_file = self.path / "ledger.jsonl"
        self.trajectories_file = self.path / "trajectories.jsonl"
        self.superseded_file = self.path / "superseded.jsonl"
        self.stacks = self.path / "stacks"
        self.bad_steps = self.path / "bad_steps"
        self.scale_request = self.path / "scale.json"  # written by `innerloop scale`, taken between steps
        self.report = self.path / "report.html"  # written by `innerloop report`
        self.trackers = Trackers.default(self.path)  # TensorBoard until start_trackers knows the config
        self._log_final_model = True

    def write_config(self, cfg: Config) -> None:
        """Written whole, then renamed over the old one: a crash never leaves half a config."""
        text = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
        partial = self.path / "config.yaml.partial"
        partial.write_text(f"# resolved config, fingerprint {cfg.fingerprint()}\n{text}")
        partial.replace(self.path / "config.yaml")

    def start_trackers(self, cfg: Config) -> None:
        """The backends of tracking.backends, started with the resolved config (after write_config:
        the config file goes to them too); a run directory's earlier tracker runs are continued."""
        self.trackers.finish(lambda: [])
        self.trackers = Trackers.start(self.path, cfg.tracking, cfg.model_dump(mode="json"))
        self._log_final_model = cfg.tracking.log_final_model

    def log(self, record: dict[str, Any], step: int) -> None:
        """Append one record to metrics.jsonl, then mirror it to the trackers (its numbers, its event)."""
        record = {"step": step, "time": round(time.time(), 3), **record}
        _append(self.metrics_file, [record])  # first: a tracker never costs a record
        self.trackers.log(record, step)

    def track_outputs(self, final_model: Path | None) -> None:
        """At the run's end: the final model folder and the report (where present) to the trackers."""
        model = final_model if self._log_final_model else None
        self.trackers.log_artifacts({"final_model": model, "report": self.report})

    def record_questions(self, step: int, question_ids: list[str]) -> None:
        """The ledger: which questions step `step` consumed (written with its metrics, before any
        checkpoint of that step, so a checkpoint never runs ahead of its ledger)."""
        _append(self.ledger_file, [{"step": step, "questions": list(question_ids)}])

    def record_trajectories(self, step: int, trained_on_version: int, trajectories) -> None:
        """One line per trajectory step `step` trained on. `staleness`: how many policy versions the
        learner (at `trained_on_version`) was ahead of the weights that sampled it; 0 when synchronous."""
        lines = [{"step": step, "question_id": t.question_id, "reward": t.reward, "correct": t.correct,
                  "formatted": t.formatted, "completion_tokens": len(t.completion_ids),
                  "finish_reason": t.finish_reason, "policy_version": t.policy_version,
                  "staleness": trained_on_version - t.policy_version} for t in trajectories]
        _append(self.trajectories_file, lines)

    def read_trajectories(self) -> list[dict[str, Any]]:
        return read_jsonl(self.trajectories_file)

    def request_scale(self, rollout_workers: int | None = None, learner_ranks: int | None = None) -> None:
        """Ask the running driver for this many rollout workers and/or learner ranks (written whole,
        then renamed; a request not yet taken is merged with this one, the newer count winning)."""
        pending = self._read_scale_request()
        wanted = {"rollout_workers": rollout_workers, "learner_ranks": learner_ranks}
        request = {**pending, **{k: v for k, v in wanted.items() if v is not None}, "time": time.time()}
        partial = self.scale_request.with_suffix(".partial")
        partial.write_text(json.dumps(request))
        partial.replace(self.scale_request)

    def take_scale_request(self) -> ScaleRequest:
        """The counts last requested, once (each None when nothing is pending for it)."""
        request = self._read_scale_request()
        self.scale_request.unlink(missing_ok=True)

        def count(key: str) -> int | None:
            value = request.get(key)
            return value if isinstance(value, int) and value >= 1 else None

        return ScaleRequest(count("rollout_workers"), count("learner_ranks"))

    def _read_scale_request(self) -> dict[str, Any]:
        try:
            request = json.loads(self.scale_request.read_text())
        except (OSError, ValueError):
            return {}
        return request if isinstance(request, dict) else {}

    def read_ledger(self) -> list[dict[str, Any]]:
        return read_jsonl(self.ledger_file)

    def rewind(self, step: int | None) -> int:
        """Forget what was logged after `step` (None: everything), as a resume goes back to it.

        The dropped records move to superseded.jsonl; TensorBoard purges its later points.
        Returns how many records were dropped.
        """
        dropped = 0
        for path in (self.metrics_file, self.ledger_file, self.trajectories_file):
            records = read_jsonl(path)
            keep = [step is not None and r.get("step", 0) <= step for r in records]
            kept = [r for r, k in zip(records, keep) if k]
            gone = [{"file": path.name, **r} for r, k in zip(records, keep) if not k]
            if gone:
                _append(self.superseded_file, gone)
                _write_jsonl(path, kept)
                dropped += len(gone)
        self.trackers.rewind(step)  # TensorBoard purges its later points; the others skip what they hold
        return dropped

    def read_metrics(self) -> list[dict[str, Any]]:
        return read_jsonl(self.metrics_file)

    def close(self) -> None:
        self.trackers.finish(lambda: [r for r in self.read_metrics() if "event" in r])
        self.lock.release()


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def _append(path: Path, records: list[dict[str, Any]]) -> None:
    with path.open("a") as handle:
        handle.write("".join(json.dumps(r, default=_plain) + "\n" for r in records))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSONL file the run writes (none yet if it is missing). A kill -9 mid-write can
    leave a last line cut short: it is not a record. (A user's file, where a bad line is an error: actors/rows.py.)"""
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():  # a cut multibyte char too
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    partial = path.with_suffix(".partial")
    partial.write_text("".join(json.dumps(r, default=_plain) + "\n" for r in records))
    partial.replace(path)
