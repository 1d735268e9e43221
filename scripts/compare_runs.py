"""Compare finished runs side by side: a table of times and accuracies, and one figure of their curves.

    .venv/bin/python scripts/compare_runs.py runs/async-s0 runs/async-s1 --out docs/figures/async.png

The table (markdown) goes to stdout: steps, wall minutes from the first to the last step, median step
time and its phases, held-out accuracy before/after, and the last steps' training accuracy. The
figure plots, per run, training accuracy per step (a 5-step moving mean) and held-out evaluations.
The first step of each run is left out of the medians: it includes warm-up.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def read_run(path: Path) -> tuple[list[dict], list[dict]]:
    """(step records, held-out eval records) of a run's metrics.jsonl."""
    lines = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in lines if "policy_version" in r]
    evals = [r for r in lines if str(r.get("event", "")).startswith("eval_")]
    return steps, evals


def median_of(records: list[dict], key: str) -> float:
    values = [r[key] for r in records[1:] if isinstance(r.get(key), (int, float))]
    return statistics.median(values) if values else float("nan")


def summary_row(name: str, steps: list[dict], evals: list[dict]) -> dict:
    grpo = [r for r in steps if r.get("stage", "grpo") == "grpo"]
    before = next((e["eval_accuracy"] for e in evals if e["event"] == "eval_before"), float("nan"))
    after = next((e["eval_accuracy"] for e in evals if e["event"] == "eval_after"), float("nan"))
    tail = grpo[-5:]
    return {
        "run": name, "steps": len(steps),
        "minutes": (steps[-1]["time"] - steps[0]["time"] + steps[0]["time_step"]) / 60 if steps else float("nan"),
        "step_s": median_of(grpo, "time_step"), "generate_s": median_of(grpo, "time_generate"),
        "update_s": median_of(grpo, "time_update"), "sync_s": median_of(grpo, "time_sync"),
        "before": before, "after": after,
        "train_acc_last5": sum(r["accuracy"] for r in tail) / max(1, len(tail)),
        "staleness": median_of(grpo, "staleness_mean"),
    }


def print_table(rows: list[dict]) -> None:
    print("| run | steps | minutes | step s (median) | generate s | update s | sync s | held-out before | "
          "held-out after | train acc, last 5 steps | staleness |")
    print("| --- " * 11 + "|")
    for r in rows:
        print(f"| {r['run']} | {r['steps']} | {r['minutes']:.1f} | {r['step_s']:.1f} | {r['generate_s']:.1f} | "
              f"{r['update_s']:.1f} | {r['sync_s']:.2f} | {100 * r['before']:.1f}% | {100 * r['after']:.1f}% | "
              f"{100 * r['train_acc_last5']:.1f}% | {r['staleness']:.0f} |")


def plot(runs: dict[str, tuple[list[dict], list[dict]]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, (steps, evals) in runs.items():
        acc = [r["accuracy"] for r in steps if "accuracy" in r]
        xs = [r["step"] for r in steps if "accuracy" in r]
        smooth = [sum(acc[max(0, i - 4): i + 1]) / len(acc[max(0, i - 4): i + 1]) for i in range(len(acc))]
        (line,) = ax.plot(xs, smooth, label=f"{name}: training accuracy (5-step mean)")
        held = [(e["step"], e["eval_accuracy"]) for e in evals]
        if held:
            ax.plot(*zip(*held), "o--", color=line.get_color(), label=f"{name}: held-out (greedy)")
    ax.set_xlabel("step")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, help="PNG of the curves")
    args = parser.parse_args()
    runs = {path.name: read_run(path) for path in args.runs}
    print_table([summary_row(name, *data) for name, data in runs.items()])
    if args.out:
        plot(runs, args.out)
        print(f"\nfigure: {args.out}")


if __name__ == "__main__":
    main()
