"""The table of `innerloop sweep`: what each run directory holds, summarized per cell, compared in pairs.

Per run: held-out accuracy is the final eval (the `eval_after` record of metrics.jsonl), strict
(`eval_accuracy`) and lenient (`eval_lenient_accuracy`), with the sampled eval's Pass@k beside them
where the run drew one (`eval_pass@K`, `eval_lenient_pass@K`: lens/sampled_eval.py); each metric named in the sweep file is the
mean of that key over the run's last `last_steps` step records (one step's value is noisy; the last
few say where training ended), except the probe's numbers (`probe_*`, lens/probe.py's `probe_metrics`):
the mean over all of the run's probe events. Per cell: mean +- 95% t-interval over its finished seeds.

Pairs of cells are compared on the same held-out questions (RUN_DIR/eval_questions.jsonl, lens/accuracy.py),
seeds paired by number and pooled: McNemar's exact test on the discordant (seed, question) pairs, and a
paired bootstrap that resamples questions (each question carrying its mean A - B over the paired seeds,
so repeats of one question across seeds are not taken for independent evidence). Pass@K (the largest
K the runs report) is compared the same way: the paired bootstrap over questions of each question's
Pass@K difference (from its n samples), averaged over the paired seeds.

Writes OUT/sweep.json, OUT/sweep.md and OUT/sweep.png.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from innerloop.distributed.lens import sweep_stats
from innerloop.distributed.lens.accuracy import read_eval_questions
from innerloop.distributed.lens.sampled_eval import per_question_pass_at_k, read_sampled_questions
from innerloop.distributed.state.tracking import read_jsonl

BOOTSTRAP_RESAMPLES = 10_000
_PASS_KEY = re.compile(r"eval_(lenient_)?pass@(\d+)")


@dataclass(frozen=True)
class RunRow:
    cell: str
    seed: int
    run_dir: Path
    state: str  # done | failed | pending
    error: str = ""
    seconds: float | None = None  # this sweep's time on it (None: finished earlier, or not run)


def _number(value: Any) -> float | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def run_result(run_dir: Path, metrics: Sequence[str], last_steps: int) -> dict[str, Any]:
    """What one run directory says: final strict/lenient accuracy, formatted share, step count, and each
    named metric's mean over the last `last_steps` steps."""
    records = read_jsonl(run_dir / "metrics.jsonl")
    final = next((r for r in reversed(records) if r.get("event") == "eval_after"), {})
    done = next((r for r in reversed(records) if r.get("event") == "done"), {})
    steps = [r for r in records if "event" not in r]
    tail, probes = steps[-last_steps:], [r for r in records if r.get("event") == "probe"]
    means = {}
    for name in metrics:
        # A probe's numbers (probe_*) are logged with its probe events: their mean over all of the run's probes.
        chosen = probes if name.startswith("probe_") else tail
        values = [v for v in (_number(r.get(name)) for r in chosen) if v is not None]
        means[name] = sum(values) / len(values) if values else None
    return {"steps": len(steps), "strict": _number(final.get("eval_accuracy")),
            "lenient": _number(final.get("eval_lenient_accuracy")), "formatted": _number(final.get("eval_formatted")),
            "eval_questions": final.get("eval_questions"), "train_seconds": _number(done.get("seconds")),
            "pass": {key: _number(value) for key, value in final.items() if _PASS_KEY.fullmatch(key)},
            "metrics": means}


def summarize(source: str, cells: dict[str, list[str]], rows: Sequence[RunRow], metrics: Sequence[str],
              last_steps: int) -> dict[str, Any]:
    """The whole table as one JSON-able mapping: cells (runs, means and intervals), then comparisons."""
    out_cells, questions, sampled = [], {}, {}
    for name, overrides in cells.items():
        runs = []
        for row in (r for r in rows if r.cell == name):
            run = {"seed": row.seed, "state": row.state, "run_dir": str(row.run_dir), "seconds": row.seconds,
                   "error": row.error}
            if row.state == "done":
                run.update(run_result(row.run_dir, metrics, last_steps))
                questions[(name, row.seed)] = read_eval_questions(row.run_dir)
                sampled[(name, row.seed)] = read_sampled_questions(row.run_dir)
            runs.append(run)
        done = [r for r in runs if r["state"] == "done"]
        pass_keys = sorted({k for r in done for k in r["pass"]}, key=_pass_order)
        out_cells.append({"name": name, "overrides": overrides, "runs": runs,
                          "seeds_done": len(done), "seeds": len(runs),
                          "strict": _interval(r["strict"] for r in done),
                          "lenient": _interval(r["lenient"] for r in done),
                          "pass": {k: _interval(r["pass"].get(k) for r in done) for k in pass_keys},
                          "metrics": {m: _interval(r["metrics"][m] for r in done) for m in metrics}})
    comparisons = [c for a, b in itertools.combinations(cells, 2) if (c := compare(a, b, questions))]
    top_k = max((int(_PASS_KEY.fullmatch(k).group(2)) for c in out_cells for k in c["pass"]), default=None)
    for c in comparisons:
        if top_k is not None and (found := compare_pass(c["a"], c["b"], sampled, top_k)):
            c[f"pass@{top_k}"] = found
    finished = [r for c in out_cells for r in c["runs"] if r["state"] == "done"]
    unlogged = [m for m in metrics if finished and all(r["metrics"][m] is None for r in finished)]
    return {"sweep": source, "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "last_steps": last_steps,
            "metrics": list(metrics), "unlogged_metrics": unlogged, "cells": out_cells, "comparisons": comparisons}


def _pass_order(key: str) -> tuple[int, bool]:
    match = _PASS_KEY.fullmatch(key)
    return int(match.group(2)), bool(match.group(1))


def compare_pass(a: str, b: str, sampled: dict, k: int) -> dict[str, Any] | None:
    """Cells a and b on Pass@k of the questions both sampled, over the seeds both finished: a paired
    bootstrap over questions, each carrying its Pass@k difference averaged over the seeds."""
    seeds = sorted(s for (cell, s), q in sampled.items() if cell == a and q and sampled.get((b, s)))
    if not seeds:
        return None
    scores = {(cell, s): per_question_pass_at_k(sampled[(cell, s)], k) for cell in (a, b) for s in seeds}
    shared = sorted(set.intersection(*(set(scores[(a, s)]) & set(scores[(b, s)]) for s in seeds)))
    if not shared:
        return None
    per_question = [sum(scores[(a, s)][q] - scores[(b, s)][q] for s in seeds) / len(seeds) for q in shared]
    boot = sweep_stats.paired_bootstrap(per_question, BOOTSTRAP_RESAMPLES, seed=0)
    return {"seeds": seeds, "questions": len(shared), "bootstrap": boot.to_dict()}


def _interval(values) -> dict | None:
    found = sweep_stats.mean_ci([v for v in values if v is not None])
    return None if found is None else found.to_dict()


def compare(a: str, b: str, questions: dict) -> dict[str, Any] | None:
    """Cells a and b on the questions both answered, over the seeds both finished; None if none."""
    seeds = sorted(s for (cell, s), q in questions.items() if cell == a and q and questions.get((b, s)))
    if not seeds:
        return None
    shared = set.intersection(*(set(questions[(a, s)]) & set(questions[(b, s)]) for s in seeds))
    if not shared:
        return None
    ids = sorted(shared)
    result: dict[str, Any] = {"a": a, "b": b, "seeds": seeds, "questions": len(ids)}
    for index, kind in enumerate(("strict", "lenient")):
        pairs = [(questions[(a, s)][q][index], questions[(b, s)][q][index]) for s in seeds for q in ids]
        counts = sweep_stats.paired_counts(pairs)
        per_question = [sum(questions[(a, s)][q][index] - questions[(b, s)][q][index] for s in seeds) / len(seeds)
                        for q in ids]
        boot = sweep_stats.paired_bootstrap(per_question, BOOTSTRAP_RESAMPLES, seed=0)
        result[kind] = {"a_accuracy": (counts.both + counts.a_only) / counts.pairs,
                        "b_accuracy": (counts.both + counts.b_only) / counts.pairs,
                        "both": counts.both, "a_only": counts.a_only, "b_only": counts.b_only,
                        "neither": counts.neither, "mcnemar_p": sweep_stats.mcnemar_exact(counts.a_only, counts.b_only),
                        "bootstrap": boot.to_dict()}
    return result


# ---------------------------------------------------------------- Markdown, JSON, PNG


def _pct(ci: dict | None) -> str:
    if ci is None:
        return "-"
    if ci["ci95_half_width"] is None:
        return f"{100 * ci['mean']:.1f}% (n=1)"
    return f"{100 * ci['mean']:.1f}% ± {100 * ci['ci95_half_width']:.1f}"


def _num(ci: dict | None) -> str:
    if ci is None:
        return "-"
    if ci["ci95_half_width"] is None:
        return f"{ci['mean']:.4g} (n=1)"
    return f"{ci['mean']:.4g} ± {ci['ci95_half_width']:.2g}"


def _p(p: float) -> str:
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def _cell_text(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _pass_columns(summary: dict[str, Any]) -> list[str]:
    """The Pass@K keys of the table: the largest K any cell reports, strict then lenient."""
    keys = {k for cell in summary["cells"] for k in cell.get("pass", {})}
    top = max((_pass_order(k)[0] for k in keys), default=None)
    return [k for k in (f"eval_pass@{top}", f"eval_lenient_pass@{top}") if k in keys]


def markdown(summary: dict[str, Any]) -> str:
    metrics, passes = summary["metrics"], _pass_columns(summary)
    titles = {k: ("lenient " if "lenient" in k else "") + "Pass@" + k.rpartition("@")[2] for k in passes}
    lines = [f"# Sweep: {summary['sweep']}", "",
             "Held-out accuracy after training (each run's final eval), mean ± 95% CI half-width "
             "(t-interval over seeds, in points); strict: the verifier; lenient: the last number, boxed or not. "
             + ("Pass@K: the final eval's sampled completions (eval.sampled), on its questions. " if passes else "")
             + f"Metrics: the mean over each run's last {summary['last_steps']} steps (probe_*: over its probes), "
             "then over seeds.", "",
             "| cell | overrides | seeds done | strict accuracy | lenient accuracy |"
             + "".join(f" {titles[k]} |" for k in passes) + "".join(f" {m} |" for m in metrics),
             "| --- | --- | --- | --- | --- |" + " --- |" * (len(passes) + len(metrics))]
    for cell in summary["cells"]:
        lines.append(f"| {cell['name']} | {_cell_text(', '.join(cell['overrides']) or '-')} | "
                     f"{cell['seeds_done']}/{cell['seeds']} | {_pct(cell['strict'])} | {_pct(cell['lenient'])} |"
                     + "".join(f" {_pct(cell.get('pass', {}).get(k))} |" for k in passes)
                     + "".join(f" {_num(cell['metrics'][m])} |" for m in metrics))
    if summary["unlogged_metrics"]:
        lines += ["", f"No finished run logged {', '.join(summary['unlogged_metrics'])} (a typo in the sweep "
                  "file's metrics? A step record's keys are the names)."]
    if summary["comparisons"]:
        lines += ["", "## Paired comparisons", "",
                  "A - B on the same held-out questions, seeds paired by number and pooled. McNemar: exact test "
                  "on the discordant (seed, question) pairs (A only / B only). Bootstrap: questions resampled "
                  f"{BOOTSTRAP_RESAMPLES:,} times; 95% interval of the difference and its two-sided p.", "",
                  "| A | B | seeds | questions | strict A - B [95% CI] | A only / B only | McNemar p | bootstrap p "
                  "| lenient A - B [95% CI] | A only / B only | McNemar p | bootstrap p |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for c in summary["comparisons"]:
            parts = []
            for kind in ("strict", "lenient"):
                k, boot = c[kind], c[kind]["bootstrap"]
                parts += [f"{100 * boot['difference']:+.1f} [{100 * boot['ci95_low']:+.1f}, "
                          f"{100 * boot['ci95_high']:+.1f}]", f"{k['a_only']} / {k['b_only']}",
                          _p(k["mcnemar_p"]), _p(boot["p_value"])]
            lines.append(f"| {c['a']} | {c['b']} | {','.join(map(str, c['seeds']))} | {c['questions']} | "
                         + " | ".join(parts) + " |")
        pass_rows = [(c, key, c[key]) for c in summary["comparisons"] for key in c if key.startswith("pass@")]
        if pass_rows:
            lines += ["", "Pass@K, A - B: the paired bootstrap over the questions both sampled (each question's "
                      "Pass@K from its n samples, averaged over the paired seeds).", "",
                      "| A | B | seeds | questions | Pass@K | A - B [95% CI] | bootstrap p |",
                      "| --- | --- | --- | --- | --- | --- | --- |"]
            for c, key, found in pass_rows:
                boot = found["bootstrap"]
                lines.append(f"| {c['a']} | {c['b']} | {','.join(map(str, found['seeds']))} | {found['questions']} | "
                             f"{key} | {100 * boot['difference']:+.1f} [{100 * boot['ci95_low']:+.1f}, "
                             f"{100 * boot['ci95_high']:+.1f}] | {_p(boot['p_value'])} |")
    lines += ["", "## Runs", "", "| cell | seed | state | strict | lenient | steps | minutes | run directory |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    failures = []
    for cell in summary["cells"]:
        for run in cell["runs"]:
            def pct(key, run=run):
                return "-" if run.get(key) is None else f"{100 * run[key]:.1f}%"
            seconds = run.get("train_seconds") or run["seconds"]  # the run's own time, else the sweep's on it
            minutes = "-" if seconds is None else f"{seconds / 60:.1f}"
            lines.append(f"| {cell['name']} | {run['seed']} | {run['state']} | {pct('strict')} | {pct('lenient')} | "
                         f"{run.get('steps', '-')} | {minutes} | {run['run_dir']} |")
            if run["state"] == "failed":
                failures.append((f"{cell['name']} seed {run['seed']}", run["error"]))
    if failures:
        lines += ["", "## Failed runs", ""]
        for name, error in failures:
            lines += [f"{name}:", "```", error.strip() or "(no output)", "```", ""]
    return "\n".join(lines).rstrip() + "\n"


def write_figure(summary: dict[str, Any], path: Path) -> None:
    """Strict and lenient accuracy per cell: bars at the mean, 95% CI whiskers, each seed a dot."""
    from innerloop.distributed.lens.plotting import saved_figure

    cells = summary["cells"]
    with saved_figure(path, dpi=120, format="png", figsize=(max(4.0, 1.4 * len(cells) + 2), 4.0)) as (figure, axes):
        for offset, kind, colour in ((-0.2, "strict", "tab:blue"), (0.2, "lenient", "tab:orange")):
            for i, cell in enumerate(cells):
                ci, x = cell[kind], i + offset
                if ci is not None:
                    error = [[100 * (ci["ci95_half_width"] or 0)]] * 2
                    axes.bar(x, 100 * ci["mean"], width=0.38, color=colour, alpha=0.6, yerr=error, capsize=4,
                             label=kind if i == 0 else None)
                seeds = [100 * r[kind] for r in cell["runs"] if r.get(kind) is not None]
                axes.scatter([x] * len(seeds), seeds, color="black", s=10, zorder=3)
        axes.set_xticks(range(len(cells)), [c["name"] for c in cells], rotation=20, ha="right")
        axes.set(ylabel="held-out accuracy (%)", ylim=(0, 100), title="held-out accuracy per cell (mean, 95% CI, seeds)")
        if any(c[kind] is not None for c in cells for kind in ("strict", "lenient")):
            axes.legend(loc="upper left")


def write_tables(out: Path, source: str, cells: dict[str, list[str]], rows: Sequence[RunRow],
                 metrics: Sequence[str], last_steps: int, figure: bool = True) -> dict[str, Any]:
    """OUT/sweep.json, OUT/sweep.md and (`figure`) OUT/sweep.png, each written whole then renamed into place."""
    summary = summarize(source, cells, rows, metrics, last_steps)
    _replace(out / "sweep.json", json.dumps(summary, indent=2) + "\n")
    _replace(out / "sweep.md", markdown(summary))
    if figure:
        partial = out / "sweep.png.partial"
        write_figure(summary, partial)
        partial.replace(out / "sweep.png")
    return summary


def _replace(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text, encoding="utf-8")
    partial.replace(path)
