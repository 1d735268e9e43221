"""Chaos soak: hundreds of real steps on the tiny model under a seeded schedule of mixed faults.

    .venv/bin/python scripts/chaos.py --steps 300 --out runs/chaos

The job is the real `innerloop train` (Ray, a vLLM CPU engine per rollout worker, a DeepSpeed learner,
float32), joined to a Ray cluster this script starts (`ray.cluster_utils.Cluster`, so simulated nodes
can join and leave it). From outside, as a cluster would, the script kills rollout workers mid-generation
and mid-sync, kills the learner mid-update, adds and removes nodes, runs `innerloop scale` up and down
(rollout workers 1 -> 2 -> 1, learner ranks 1 -> 2 -> 1), SIGKILLs the driver and resumes it with
`innerloop train --resume`, and has the reward hang past reward.timeout_s or overflow into a NaN step
(tests/chaos_reward.py). The faults come one at a time, in
a seeded order, far enough apart that each one's cost is measured alone (scripts/chaos_plan.py).

At the end it checks and prints: every step logged once, every question consumed once (ledger.jsonl), no
trajectory trained twice, the policy version strictly increasing, each process's memory growth within
--bound-mib, no process of the run left, and the wall time each fault cost, by kind. Writes chaos.json
into --out; exits 1 if any check failed. Every wait has a timeout: a stalled run fails, never hangs.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil

import chaos_faults as faults  # this folder's (scripts/ is on sys.path when run)
import chaos_plan
from soak import MemorySampler

from innerloop.distributed.run.sweep import tail

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # tests.tiny_model, tests.chaos_reward
MARKER = "INNERLOOP_CHAOS_RUN"  # every process of the run inherits it: how leftovers are found


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    out = Path(args.out).resolve()
    if (out / "run").exists():
        print(f"error: {out / 'run'} exists; give a new --out", file=sys.stderr)
        return 2
    schedule = chaos_plan.plan(args.seed, args.steps, args.per_kind, args.checkpoint_every + 1, args.spacing)
    env = _environment(out)
    from ray.cluster_utils import Cluster

    from tests.tiny_model import build_tiny_model

    model = build_tiny_model(out / "model")
    started = time.time()
    # Logical CPUs: the head takes the job's actors (and their replacements), the added nodes one worker each.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 16, "include_dashboard": False})
    soak = Soak(args, out, env, cluster)
    sampler = MemorySampler(every_s=args.sample_every, run_dir=soak.run_dir, root_role="chaos")
    sampler.start()
    try:
        soak.run(schedule, _overrides(model, args))
    finally:
        sampler.stop()
        soak.stop_driver()
        cluster.shutdown()
    report = soak.report(sampler.samples, schedule, env[MARKER])
    report.update(seconds=round(time.time() - started, 1), command=" ".join(["scripts/chaos.py", *(argv or sys.argv[1:])]))
    (out / "chaos.json").write_text(json.dumps({**report, "samples": sampler.samples}, indent=1))
    print_report(report)
    return 0 if report["passed"] else 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0, help="seeds the fault schedule")
    parser.add_argument("--per-kind", type=int, default=2, help="faults of each kind")
    parser.add_argument("--spacing", type=int, default=12, help="steps between faults, at least")
    parser.add_argument("--window", type=int, default=3, help="steps after a fault over which its cost is measured")
    parser.add_argument("--checkpoint-every", type=int, default=10)
    parser.add_argument("--questions", type=int, default=8, help="questions per step")
    parser.add_argument("--group", type=int, default=8, help="trajectories per question")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--bound-mib", type=float, default=64.0, help="allowed RSS growth per process after warm-up")
    parser.add_argument("--warmup-steps", type=int, default=10, help="a process's growth is measured from this "
                        "many steps after it first appeared")
    parser.add_argument("--sample-every", type=float, default=2.0, help="seconds between memory samples")
    parser.add_argument("--stall-s", type=float, default=300.0, help="no new step for this long: the run stalled")
    parser.add_argument("--fault-timeout-s", type=float, default=90.0, help="to catch a process mid-phase")
    parser.add_argument("--out", default="runs/chaos")
    return parser


def _environment(out: Path) -> dict:
    """This process's environment, which the cluster's processes, and through them every actor and scorer,
    inherit: the marker, the chaos reward's control folder, the repository on the path."""
    from tests.chaos_reward import CONTROL_ENV

    (out / "control").mkdir(parents=True, exist_ok=True)
    os.environ[MARKER] = uuid.uuid4().hex
    os.environ[CONTROL_ENV] = str(out / "control")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    os.environ.pop("RAY_ADDRESS", None)
    return dict(os.environ)


def _overrides(model: Path, args) -> list[str]:
    return [
        f"model.name={model}", "model.dtype=float32", f"rollout.max_tokens={args.max_tokens}",
        f"rollout.questions_per_step={args.questions}", f"rollout.group_size={args.group}",
        f"learner.micro_batch_size={args.questions * args.group // 4}", "learner.lr=1e-4",
        "reward.kind=custom", "reward.custom=tests.chaos_reward:chaos_reward", "reward.timeout_s=2",
        "tasks.eval_count=8",  # the default pool of 1000: a long soak goes through it more than once
        f"train.steps={args.steps}", f"train.checkpoint_every={args.checkpoint_every}", "train.keep_checkpoints=2",
        "train.keep_best=0", "train.max_minutes=0", "train.export_final_model=false", "eval.before_and_after=false",
        "rollout.max_model_len=512", "rollout.kv_cache_gib=0.25",
        "rollout.max_workers=2",  # a node that joins gets a worker (the base pool is one)
        "rollout.sync_timeout_s=10",  # what a worker dying mid-transfer may cost the others' waits
        "recovery.max_worker_restarts=1000", "recovery.max_learner_restarts=1000",
        "recovery.max_nonfinite_steps=1000"]


class Soak:
    """The job (one driver process at a time) and the faults injected into it."""

    def __init__(self, args, out: Path, env: dict, cluster):
        self.args, self.out, self.env, self.cluster = args, out, env, cluster
        self.run_dir, self.control = out / "run", out / "control"
        self.driver: subprocess.Popen | None = None
        self.drivers = 0
        self.fired: list[dict] = []
        self.missed: list[dict] = []
        self.stopped: str | None = None  # why the soak ended early, if it did
        self.driver_exit: int | None = None
        self.actors_left_by_killed_drivers: list[dict] = []
        self._nodes = faults.Nodes(cluster)
        self._me = psutil.Process()

    # ---- the driver ---------------------------------------------------------------------------

    def start_driver(self, overrides: list[str] | None) -> None:
        """`innerloop train` joined to the cluster: a new run with `overrides`, or (None) --resume."""
        self.drivers += 1
        args = (["--run-dir", str(self.run_dir), *sum((["--set", o] for o in overrides), [])] if overrides
                else ["--resume", str(self.run_dir)])
        log = (self.out / f"driver-{self.drivers}.log").open("w")
        self.driver = subprocess.Popen(
            [sys.executable, "-m", "innerloop.distributed.cli", "train", *args, "--address", self.cluster.address],
            stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=REPO_ROOT)

    def stop_driver(self) -> None:
        if self.driver is not None and self.driver.poll() is None:
            self.driver.send_signal(signal.SIGTERM)
            try:
                self.driver.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.driver.kill()
                self.driver.wait(timeout=30)

    def step(self) -> int:
        """The newest step the run logged (lower again after a rewind)."""
        records = [r for r in _read(self.run_dir / "metrics.jsonl") if "event" not in r]
        return records[-1]["step"] if records else 0

    def wait_for_step(self, target: int) -> bool:
        """Until the run logged `target`; False (with self.stopped saying why) if the driver ended first
        or no step came for --stall-s."""
        last, since = self.step(), time.monotonic()
        while (now := self.step()) < target:
            if self.driver.poll() is not None:
                log = self.out / f"driver-{self.drivers}.log"
                self.stopped = (f"the driver exited (code {self.driver.returncode}) at step {now}, before step "
                                f"{target}; its log: {log}, which ends:\n" + _indented(tail(log, 8)))
                return False
            if now != last:
                last, since = now, time.monotonic()
            elif time.monotonic() - since > self.args.stall_s:
                self.stopped = f"no step logged for {self.args.stall_s:g} s after step {now}: the run stalled"
                return False
            time.sleep(0.05)
        return True

    # ---- the run ------------------------------------------------------------------------------

    def run(self, schedule: list[chaos_plan.Fault], overrides: list[str]) -> None:
        self.start_driver(overrides)
        settled = 0  # the step the previous fault's cost window ends at
        for fault in schedule:
            if not self.wait_for_step(max(fault.step, settled)):
                return
            at = self.step()
            outcome = self.inject(fault.kind)
            record = {"kind": fault.kind, "planned_step": fault.step, "step_when_fired": at}
            if outcome is None:
                self.missed.append(record)
                print(f"chaos: {fault.kind} could not be injected (step {at})", flush=True)
            else:
                self.fired.append({**record, **outcome})
                print(f"chaos: {fault.kind} at step {at}", flush=True)
            settled = at + self.args.window + 1
        self.wait_for_end()

    def wait_for_end(self) -> None:
        if not self.wait_for_step(self.args.steps):
            return
        try:
            self.driver_exit = self.driver.wait(timeout=300)
        except subprocess.TimeoutExpired:
            self.stopped = "the driver logged its last step but did not exit within 300 s"

    def worker_on(self, node_id: str) -> bool:
        """Whether the run logged starting a rollout worker on this node."""
        return any(r.get("event") == "rollout_workers_scaled" and r.get("node") == node_id
                   for r in _read(self.run_dir / "metrics.jsonl"))

    def inject(self, kind: str) -> dict | None:
        timeout, root = self.args.fault_timeout_s, self._me
        if kind == "worker_mid_generate":
            return faults.kill_mid(root, faults.WORKER, ("generate",), timeout)
        if kind == "worker_mid_sync":
            return faults.kill_mid(root, faults.WORKER, faults.SYNC_METHODS, timeout)
        if kind == "learner_killed":
            return faults.kill_mid(root, faults.LEARNER, ("update",), timeout)
        if kind == "node_joined":
            return self._nodes.join()
        if kind == "node_left":
            return self._nodes.leave(self.worker_on, timeout)
        if kind in ("scale_up", "scale_down"):
            return faults.scale(self.run_dir, "rollout-workers", 2 if kind == "scale_up" else 1, self.env)
        if kind in ("learners_grown", "learners_shrunk"):
            return faults.scale(self.run_dir, "learner-ranks", 2 if kind == "learners_grown" else 1, self.env)
        if kind == "driver_killed":
            return self.kill_driver()
        if kind in ("reward_hang", "nan_step"):
            return faults.request(self.control, "hang" if kind == "reward_hang" else "nan", timeout)
        raise ValueError(f"unknown fault kind {kind!r}")

    def kill_driver(self) -> dict:
        """SIGKILL the driver; its actors must end by themselves (Ray ends a dead driver's actors); then
        `innerloop train --resume` continues the run."""
        actors = faults.actor_pids(self._me, faults.WORKER) + faults.actor_pids(self._me, faults.LEARNER)
        self.driver.send_signal(signal.SIGKILL)
        killed_at = time.time()
        self.driver.wait(timeout=30)
        left = faults.wait_gone(actors, timeout_s=60)
        if left:
            self.actors_left_by_killed_drivers.append({"time": killed_at, "pids": left})
            for pid in left:  # the check fails; end them so the run can go on
                os.kill(pid, signal.SIGKILL)
        actors_gone_s = round(time.time() - killed_at, 2)
        self.start_driver(None)
        return {"time": killed_at, "actors_gone_s": actors_gone_s}

    # ---- the report ---------------------------------------------------------------------------

    def report(self, samples: list[dict], schedule: list, marker_value: str) -> dict:
        args = self.args
        final = _read(self.run_dir / "metrics.jsonl")
        superseded = [r for r in _read(self.run_dir / "superseded.jsonl") if r.get("file") == "metrics.jsonl"]
        ledger, trajectories = _read(self.run_dir / "ledger.jsonl"), _read(self.run_dir / "trajectories.jsonl")
        leftovers = _leftovers(marker_value)
        growth = chaos_plan.memory_growth(samples, args.warmup_steps)
        kinds_fired = {f["kind"] for f in self.fired}
        checks = {
            "the run finished": ([self.stopped] if self.stopped else []) +
                                ([] if self.driver_exit == 0 else [f"the last driver's exit code: {self.driver_exit}"]),
            "every fault injected": [f"{m['kind']} (planned at step {m['planned_step']})" for m in self.missed] +
                                    [f"{k} never fired" for k in sorted({f.kind for f in schedule} - kinds_fired)],
            "every step logged once, policy version strictly increasing": chaos_plan.steps_problems(final, args.steps),
            "every question consumed once (ledger)": chaos_plan.ledger_problems(ledger, args.steps,
                                                                                self.uninterrupted_questions()),
            "no trajectory trained twice": chaos_plan.trajectory_problems(trajectories, ledger, args.group),
            f"memory growth per process within {args.bound_mib:g} MiB": chaos_plan.memory_problems(growth, args.bound_mib),
            "no orphan process": [f"{p['title']} (pid {p['pid']})" for p in leftovers] +
                                 [f"killed driver's actors still alive after 60 s: {a['pids']}"
                                  for a in self.actors_left_by_killed_drivers],
        }
        events = {}
        for r in [*superseded, *final]:
            if "event" in r:
                events[r["event"]] = events.get(r["event"], 0) + 1
        judged = [e for e in growth.values() if "growth_mib" in e]
        return {
            "passed": not any(checks.values()), "checks": checks, "steps": args.steps, "drivers": self.drivers,
            "fired": self.fired, "missed": self.missed,
            "lost": chaos_plan.lost_by_kind(self.fired, [*superseded, *final], final, args.window),
            "events": events, "reward_errors": sum(r.get("reward_errors", 0) for r in final if "event" not in r),
            "skipped_steps": [r["step"] for r in final if r.get("step_skipped")],
            "memory": {"bound_mib": args.bound_mib, "judged": len(judged),
                       "worst_growth_mib": max((e["growth_mib"] for e in judged), default=None),
                       "processes": growth},
        }


    def uninterrupted_questions(self) -> list[list[str]]:
        """Each step's question ids as a run that never stopped takes them: the run's own question stream
        (its resolved config, the driver's start-up checks), replayed from the start."""
        from innerloop.distributed.config_load import load_config
        from innerloop.distributed.run.checks import check_run
        from innerloop.distributed.run.questions import QuestionStream

        cfg = load_config(self.run_dir / "config.yaml", [])
        stream = QuestionStream(check_run(cfg).train, cfg.train.seed)
        return [[q.question_id for q in stream.take(cfg.rollout.questions_per_step)] for _ in range(self.args.steps)]


def _leftovers(marker_value: str) -> list[dict]:
    """Our processes still alive once everything was shut down (waited for, bounded), then ended."""
    deadline = time.monotonic() + 30
    while (left := faults.orphans(MARKER, marker_value)) and time.monotonic() < deadline:
        time.sleep(1)
    for process in left:
        try:
            os.kill(process["pid"], signal.SIGKILL)
        except OSError:
            pass
    return left


def _indented(text: str) -> str:
    """Under the check that names it, in the report."""
    return "\n".join("        " + line for line in text.splitlines())


def _read(path: Path) -> list[dict]:
    from innerloop.distributed.state.tracking import read_jsonl

    return read_jsonl(path)


def print_report(report: dict) -> None:
    lost = report["lost"]
    print(f"\nfaults ({report['drivers']} driver processes; a normal step took {lost['normal_step_s']} s; "
          f"cost = {lost['window_steps']} steps after the fault less {lost['window_steps']} normal steps)")
    print(f"{'kind':22} {'fired':>5} {'lost s, mean':>13} {'total':>8}  each")
    for kind in chaos_plan.KINDS:
        entry = lost["kinds"].get(kind)
        if entry:
            mean = "-" if entry["mean_s"] is None else f"{entry['mean_s']:.1f}"
            print(f"{kind:22} {entry['count']:5d} {mean:>13} {entry['total_s']:8.1f}  "
                  f"{' '.join(f'{s:.1f}' for s in entry['lost_s'])}")
    print("events logged: " + ", ".join(f"{k} {v}" for k, v in sorted(report["events"].items())) +
          f"; reward errors {report['reward_errors']}; skipped steps {report['skipped_steps']}")
    memory = report["memory"]
    print(f"memory: {memory['judged']} processes lived past their warm-up; worst growth "
          f"{memory['worst_growth_mib']} MiB (bound {memory['bound_mib']:g})")
    roles: dict[str, list] = {}
    for name, entry in memory["processes"].items():
        roles.setdefault(name.rsplit(" ", 1)[0], []).append(entry)
    print(f"{'role':24} {'processes':>9} {'peak MiB':>9} {'worst growth':>13}")
    for role, entries in sorted(roles.items(), key=lambda item: -max(e["peak_mib"] for e in item[1])):
        peak, judged = max(e["peak_mib"] for e in entries), [e["growth_mib"] for e in entries if "growth_mib" in e]
        if peak >= 20:  # small helpers (Ray's agents, shells) are in chaos.json only
            print(f"{role[:24]:24} {len(entries):9d} {peak:9.1f} {max(judged) if judged else '-':>13}")
    for name, problems in report["checks"].items():
        print(f"{'PASS' if not problems else 'FAIL'}  {name}" + "".join(f"\n      {p}" for p in problems))
    print(f"{'all checks passed' if report['passed'] else 'SOME CHECKS FAILED'} in {report['seconds'] / 60:.1f} min")


if __name__ == "__main__":
    sys.exit(main())
