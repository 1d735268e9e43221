"""Soak test: hundreds of real steps on the tiny model, sampling the resident memory of every process.

    .venv/bin/python scripts/soak.py --steps 300 --out runs/soak

Runs the real stack (Ray, a vLLM CPU engine, a DeepSpeed learner) on a tiny Llama built locally,
samples the RSS of the driver and every process under it (Ray's own, the actors, vLLM's engine
core, the scoring process) every few seconds, and checks that no process grew more than
--bound-mib between the end of warm-up and the end. Writes soak.json into --out, prints a table,
and exits 1 if the bound was broken.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # tests.tiny_model and tests.doubles (the reward the tiny model can earn)


def main() -> int:
    args = _parser().parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    import os

    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    from tests.tiny_model import build_tiny_model

    from innerloop.distributed.config_load import load_config
    from innerloop.distributed.run.driver import Trainer

    model = build_tiny_model(out / "model")
    cfg = load_config(None, [
        f"model.name={model}", "model.dtype=float32", "rollout.max_tokens=32", "rollout.questions_per_step=8",
        "rollout.group_size=8", "learner.micro_batch_size=16", "reward.kind=custom",
        "reward.custom=tests.doubles:length_reward", "tasks.train_count=1000", "tasks.eval_count=16",
        f"train.steps={args.steps}", f"train.checkpoint_every={args.checkpoint_every}", "train.max_minutes=0",
        "rollout.max_model_len=512", "rollout.kv_cache_gib=0.25", "eval.before_and_after=false",
        "train.export_final_model=false", "learner.lr=1e-4"])
    sampler = MemorySampler(every_s=args.sample_every, run_dir=out / "run")
    sampler.start()
    started = time.perf_counter()
    try:
        Trainer(cfg, out / "run").train()
    finally:
        sampler.stop()
    report = summarize(sampler.samples, warmup_step=args.warmup_steps, bound_mib=args.bound_mib)
    report.update(steps=args.steps, seconds=round(time.perf_counter() - started, 1),
                  command=" ".join(sys.argv))
    (out / "soak.json").write_text(json.dumps({**report, "samples": sampler.samples}, indent=1))
    print_table(report)
    return 0 if report["within_bound"] else 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--checkpoint-every", type=int, default=50)
    parser.add_argument("--warmup-steps", type=int, default=25, help="growth is measured from this step")
    parser.add_argument("--bound-mib", type=float, default=64.0, help="allowed RSS growth per process")
    parser.add_argument("--sample-every", type=float, default=5.0, help="seconds between samples")
    parser.add_argument("--out", default="runs/soak")
    return parser


class MemorySampler:
    """RSS of this process and all its descendants, tagged with the run's latest logged step."""

    def __init__(self, every_s: float, run_dir: Path, root_role: str = "driver"):
        """`root_role`: what this process is called in the samples (scripts/chaos.py's is not the driver)."""
        self.every_s, self.run_dir, self.root_role = every_s, run_dir, root_role
        self.samples: list[dict] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            self.samples.append({"time": round(time.time(), 1), "step": self._step(), "rss_mib": _tree_rss(self.root_role)})

    def _step(self) -> int:
        metrics = self.run_dir / "metrics.jsonl"
        if not metrics.exists():
            return 0
        lines = metrics.read_text().splitlines()
        return json.loads(lines[-1]).get("step", 0) if lines else 0


def _tree_rss(root_role: str = "driver") -> dict[str, float]:
    """'role pid' -> RSS in MiB, for this process and every process under it."""
    import psutil

    root = psutil.Process()
    found = {}
    for process in [root, *root.children(recursive=True)]:
        try:
            found[f"{_role(process, root, root_role)} {process.pid}"] = round(process.memory_info().rss / 2**20, 1)
        except psutil.Error:  # ended between the listing and the read
            continue
    return found


def _role(process, root, root_role: str = "driver") -> str:
    """A stable name: Ray retitles an actor's process with the method it runs ("ray::Learner.update")."""
    if process.pid == root.pid:
        return root_role
    command = process.cmdline() or [process.name()]
    if command[0].startswith("ray::"):
        return command[0].split(".")[0].split()[0]
    if "innerloop.distributed.cli" in command and "train" in command:  # a driver started under this one
        return "driver"
    return process.name()


def summarize(samples: list[dict], warmup_step: int, bound_mib: float) -> dict:
    """Per process alive from warm-up to the end: RSS then, at the end, and the peak."""
    after = [s for s in samples if s["step"] >= warmup_step]
    if len(after) < 2:
        return {"within_bound": False, "processes": {}, "note": "too few samples after warm-up"}
    first, last = after[0]["rss_mib"], after[-1]["rss_mib"]
    processes = {}
    for name in sorted(set(first) & set(last)):
        peak = max(s["rss_mib"].get(name, 0.0) for s in after)
        processes[name] = {"warm_mib": first[name], "end_mib": last[name], "peak_mib": peak,
                           "growth_mib": round(last[name] - first[name], 1)}
    worst = max((p["growth_mib"] for p in processes.values()), default=0.0)
    return {"warmup_step": warmup_step, "from_step": after[0]["step"], "to_step": after[-1]["step"],
            "bound_mib": bound_mib, "worst_growth_mib": worst, "within_bound": worst <= bound_mib,
            "processes": processes}


def print_table(report: dict) -> None:
    print(f"RSS from step {report.get('from_step')} to {report.get('to_step')} (MiB); bound {report['bound_mib']} MiB")
    print(f"{'process':42} {'warm':>8} {'end':>8} {'peak':>8} {'growth':>8}")
    for name, p in sorted(report["processes"].items(), key=lambda item: -item[1]["end_mib"]):
        if p["end_mib"] >= 20:  # small helpers (shells, idle ray agents) are listed in soak.json only
            print(f"{name[:42]:42} {p['warm_mib']:8.1f} {p['end_mib']:8.1f} {p['peak_mib']:8.1f} {p['growth_mib']:+8.1f}")
    verdict = "within" if report["within_bound"] else "BEYOND"
    print(f"worst growth {report['worst_growth_mib']:+.1f} MiB: {verdict} the bound")


if __name__ == "__main__":
    sys.exit(main())
