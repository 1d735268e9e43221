"""`innerloop sweep --address`: each run of a sweep as a Ray job, so a sweep fills the cluster.

Each run is submitted through Ray's job submission client as `innerloop train ... --address auto`
(a job's entrypoint runs on the head node with the cluster's address set), at most `parallel` at
once: by default as many as the cluster's CPUs and GPUs hold by the run's own config, read from the
cluster by a short probe job. A job's logs go to the run's log file when it ends. Interrupting the
sweep stops its jobs (SIGTERM: each run saves its step and checkpoint), so a re-run resumes them.

Run directories must be where the head node writes and this machine reads (a shared filesystem, or
run the sweep on the head node): the sweep reads each run's results from there.
"""

from __future__ import annotations

import json
import logging
import re
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence

from innerloop.distributed.config import Config
from innerloop.distributed.errors import RunStopped

log = logging.getLogger(__name__)

_PROBE = ("python -c \"import json, ray; ray.init(); "
          "print('innerloop-resources ' + json.dumps(ray.cluster_resources()))\"")
_TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class PlannedRun(Protocol):
    """What a run of the sweep (run/sweep.py's PlannedRun) gives this runner."""

    key: str
    cell: str
    seed: int
    log_file: Path

    def train_args(self) -> list[str]: ...


@dataclass(frozen=True)
class JobOutcome:
    ok: bool
    error: str = ""  # a failed job's status and last lines of its logs
    seconds: float = 0.0


def run_needs(cfg: Config) -> dict[str, float]:
    """The logical CPUs and GPUs one run takes (as placement.py reserves them)."""
    rollout, learner = cfg.rollout, cfg.learner
    gpus = (learner.ranks if rollout.colocate
            else learner.ranks * learner.gpus_per_rank + rollout.workers * rollout.engine_gpus)
    return {"CPU": float(learner.ranks + rollout.workers), "GPU": float(gpus)}


def runs_that_fit(have: dict[str, float], needs: dict[str, float]) -> int:
    """How many runs the cluster holds at once (at least 1: a run that does not fit says so itself)."""
    counts = [int(have.get(kind, 0.0) // n) for kind, n in needs.items() if n > 0]
    return max(1, min(counts)) if counts else 1


class RayJobRunner:
    """Submits each planned run as a Ray job, keeps `parallel` running, yields each as it ends."""

    def __init__(self, address: str, parallel: int | None = None, needs: dict[str, float] | None = None,
                 client: Any = None, poll_s: float = 10.0, probe_timeout_s: float = 300.0):
        if client is None:
            from ray.job_submission import JobSubmissionClient

            try:
                client = JobSubmissionClient(address)
            except Exception as exc:  # connection, version and authentication errors, each its own type
                raise RunStopped(f"cannot reach the Ray job server at {address}: {type(exc).__name__}: "
                                 f"{str(exc).splitlines()[0] if str(exc) else ''} (a cluster with token "
                                 "authentication also needs RAY_AUTH_MODE=token here, with its token in "
                                 "~/.ray/auth_token or RAY_AUTH_TOKEN)") from None
        self._client, self._poll_s = client, poll_s
        self.parallel = parallel or runs_that_fit(self._cluster_resources(probe_timeout_s), needs or {"CPU": 1.0})
        log.info("Ray jobs at %s, at most %d runs at once", address, self.parallel)

    def _cluster_resources(self, timeout_s: float) -> dict[str, float]:
        job = self._client.submit_job(entrypoint=_PROBE, submission_id=_job_id("innerloop-sweep-probe"))
        deadline = time.monotonic() + timeout_s
        while (status := _status(self._client.get_job_status(job))) not in _TERMINAL:
            if time.monotonic() > deadline:
                self._client.stop_job(job)
                raise RuntimeError(f"the cluster did not run a probe job within {timeout_s:.0f} s; "
                                   "pass --parallel N to say how many runs it holds")
            time.sleep(min(self._poll_s, 2.0))
        found = re.search(r"innerloop-resources (\{.*\})", self._client.get_job_logs(job))
        if status != "SUCCEEDED" or not found:
            raise RuntimeError(f"the probe job for the cluster's resources ended {status}; "
                               "pass --parallel N to say how many runs it holds")
        return {k: float(v) for k, v in json.loads(found.group(1)).items()}

    def run(self, runs: Sequence[PlannedRun]) -> Iterator[tuple[PlannedRun, JobOutcome]]:
        queue, active = list(runs), {}
        try:
            while queue or active:
                while queue and len(active) < self.parallel:
                    run = queue.pop(0)
                    active[self._submit(run)] = (run, time.monotonic())
                for job, (run, started) in list(active.items()):
                    status = _status(self._client.get_job_status(job))
                    if status in _TERMINAL:
                        del active[job]
                        yield run, self._finished(job, run, status, time.monotonic() - started)
                if active:
                    time.sleep(self._poll_s)
        finally:  # interrupted (or a client error): stop what still runs, so a re-run resumes it alone
            for job, (run, _) in active.items():
                log.warning("stopping Ray job %s (run %s); a re-run of the sweep resumes it", job, run.key)
                try:
                    self._client.stop_job(job)
                except Exception as exc:  # the client's own errors vary by transport; the sweep is ending anyway
                    log.warning("could not stop Ray job %s: %s", job, exc)

    def _submit(self, run: PlannedRun) -> str:
        entrypoint = shlex.join(["innerloop", *run.train_args(), "--address", "auto"])
        job = self._client.submit_job(entrypoint=entrypoint, submission_id=_job_id(f"innerloop-{run.cell}-seed-{run.seed}"),
                                      metadata={"innerloop_sweep_run": run.key})
        log.info("run %s: Ray job %s: %s", run.key, job, entrypoint)
        return job

    def _finished(self, job: str, run: PlannedRun, status: str, seconds: float) -> JobOutcome:
        try:
            logs = self._client.get_job_logs(job)
        except Exception as exc:  # the outcome still counts without the logs
            logs = f"(the job's logs could not be read: {exc})"
        with open(run.log_file, "a", encoding="utf-8") as out:
            out.write(f"\n$ Ray job {job}: {status}\n{logs}")
        if status == "SUCCEEDED":
            return JobOutcome(True, "", seconds)
        return JobOutcome(False, f"Ray job {job} {status}:\n" + "\n".join(logs.rstrip().splitlines()[-15:]), seconds)


def _status(status: Any) -> str:
    return str(getattr(status, "value", status))


def _job_id(prefix: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}-{time.monotonic_ns() % 10**6}")
