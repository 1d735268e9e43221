"""The inner-loop probe's study side: per-group summaries, the files and the plot.

The curves themselves are computed where the weights are (learners/probe.py: `probe_trajectories`);
a training run calls them on a cadence on learner rank 0, `innerloop probe` (lens/probe_command.py)
on fresh samples, and both write them here.

out_dir/
  probe.jsonl          one line per trajectory: label, question, group, curve, summary, cut summary, attribution
  probe_summary.jsonl  one line per label: per group (correct, incorrect, other_question) the means of
                       start/end/slope/area and attribution, and the comparisons with their intervals
                       (lens/probe_stats.py: cut curves, pairing within questions, the control)
  curves-<label>.png   mean curve (with a one-standard-deviation band) of each group
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from innerloop.distributed.lens import probe_stats
from innerloop.distributed.lens.plotting import on_fraction_grid, saved_figure
from innerloop.learners.probe_summary import TokenGroupChange

if TYPE_CHECKING:
    from innerloop.learners.probe import ProbeRecord

PLOT_GRID = 101  # points on the prefix-fraction axis where curves are averaged


@dataclass(frozen=True)
class GroupSummary:
    """Means over one group's trajectories of one probe (correct, incorrect, or the other-question control)."""

    group: str  # "correct" | "incorrect" | "other_question"
    trajectories: int
    start: float
    end: float
    slope: float
    area: float
    any_word: TokenGroupChange  # pooled over the group's trajectories
    all_tokens: TokenGroupChange
    cut_slope: float | None = None  # mean slope of the curves cut before the answer appears (None: none had one)

    def to_dict(self) -> dict:
        return {"trajectories": self.trajectories, "start": self.start, "end": self.end, "slope": self.slope,
                "area": self.area, "cut_slope": self.cut_slope, "any_word": self.any_word.to_dict(),
                "all_tokens": self.all_tokens.to_dict()}


def check_label(label: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9._-]+", label):
        raise ValueError(f"probe label {label!r} must be letters, digits, '.', '_' or '-' (it names a file)")


def summarize_groups(records: Sequence[ProbeRecord]) -> tuple[GroupSummary, ...]:
    """One summary per group that has trajectories: correct, incorrect, other_question."""
    groups = []
    for name in probe_stats.GROUPS:
        members = [r for r in records if r.group == name]
        if not members:
            continue
        any_word, every = TokenGroupChange("any_word", 0, 0.0), TokenGroupChange("all_tokens", 0, 0.0)
        for r in members:
            any_word, every = any_word.plus(r.attribution.any_word), every.plus(r.attribution.all_tokens)
        means = [_mean(getattr(r.summary, field) for r in members) for field in ("start", "end", "slope", "area")]
        cut = [r.cut_summary.slope for r in members if r.cut_summary is not None]
        groups.append(GroupSummary(name, len(members), *means, any_word, every, _mean(cut) if cut else None))
    return tuple(groups)


def probe_metrics(records: Sequence[ProbeRecord]) -> dict[str, float | int | None]:
    """The numbers a training run logs with its probe event: each group's means, and each paired
    comparison's difference with its interval and the trajectories it rests on."""
    out: dict[str, float | int | None] = {f"probe_{g.group}_{k}": getattr(g, k) for g in summarize_groups(records)
                                          for k in ("trajectories", "start", "end", "slope", "area", "cut_slope")}
    for p in probe_stats.comparisons(records)["paired"]:
        key = f"probe_{p['a']}_minus_{p['b']}_{p['curve']}"
        out.update({f"{key}_slope": p["difference"], f"{key}_ci95_low": p["ci95_low"],
                    f"{key}_ci95_high": p["ci95_high"], f"{key}_questions": p["questions"],
                    f"{key}_trajectories": min(p["trajectories_a"], p["trajectories_b"])})
    return out


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def format_groups(groups: Sequence[GroupSummary]) -> str:
    lines = []
    for g in groups:
        words, every = _percent(g.any_word.mean), _percent(g.all_tokens.mean)
        cut = "n/a" if g.cut_slope is None else f"{g.cut_slope:+.3f}"
        lines.append(f"{g.group:>14}: {g.trajectories} trajectories  answer NLL start {g.start:.3f}  end {g.end:.3f}"
                     f"  slope {g.slope:+.3f} (cut before the answer {cut})  area {g.area:.3f}  |  |change| at "
                     f"reflection words {words} ({g.any_word.count} occurrences), all tokens {every}")
    return "\n".join(lines) or "no trajectories"


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:+.2f}%"


def write_probe(records: Sequence[ProbeRecord], out_dir: str | Path, label: str) -> Path:
    """Append the records and the label's group summary to out_dir's JSONL files; draw the curves.
    Returns the plot's path."""
    if not records:
        raise ValueError("no probe records to write: no trajectory was probed")
    check_label(label)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "probe.jsonl").open("a") as handle:
        handle.writelines(json.dumps(r.to_dict(label)) + "\n" for r in records)
    groups = {g.group: g.to_dict() for g in summarize_groups(records)}
    with (out / "probe_summary.jsonl").open("a") as handle:
        handle.write(json.dumps({"label": label, **groups, "comparisons": probe_stats.comparisons(records)}) + "\n")
    plot = out / f"curves-{label}.png"
    plot_curves(records, plot, title=f"inner-loop loss curve ({label})")
    return plot


def plot_curves(records: Sequence[ProbeRecord], path: str | Path, title: str) -> None:
    """Mean curve and a one-standard-deviation band per group, over the prefix fraction i / L."""
    import numpy as np

    grid = np.linspace(0.0, 1.0, PLOT_GRID)
    with saved_figure(path, dpi=100, figsize=(7, 4.5)) as (figure, axes):
        for name, color in (("correct", "tab:green"), ("incorrect", "tab:red"), ("other_question", "tab:gray")):
            curves = [on_fraction_grid(r.curve, r.positions, grid) for r in records if r.group == name]
            # An empty trajectory has no fraction axis: it is left out of the plot (not of the files).
            curves = [c for c in curves if c is not None]
            if not curves:
                continue
            mean, spread = np.mean(curves, axis=0), np.std(curves, axis=0)
            axes.plot(grid, mean, color=color, label=f"{name} ({len(curves)})")
            axes.fill_between(grid, mean - spread, mean + spread, color=color, alpha=0.2)
        axes.set(title=title, xlabel="fraction of the trajectory read", ylabel="answer NLL (nats per token)")
        axes.legend()
