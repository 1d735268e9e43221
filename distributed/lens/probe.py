"""The inner-loop probe's study side: per-group summaries, the files and the plot.

The curves themselves are computed where the weights are (learners/probe.py: `probe_trajectories`);
a training run calls them on a cadence on learner rank 0, `innerloop probe` (lens/probe_command.py)
on fresh samples, and both write them here.

out_dir/
  probe.jsonl          one line per trajectory: label, question, correct, curve, summary, attribution
  probe_summary.jsonl  one line per label: mean start/end/slope/area and attribution, correct vs incorrect
  curves-<label>.png   mean curve (with a one-standard-deviation band) of correct vs incorrect trajectories
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from innerloop.distributed.lens.plotting import on_fraction_grid, saved_figure
from innerloop.learners.probe_summary import TokenGroupChange

if TYPE_CHECKING:
    from innerloop.learners.probe import ProbeRecord

PLOT_GRID = 101  # points on the prefix-fraction axis where curves are averaged


@dataclass(frozen=True)
class GroupSummary:
    """Means over the correct (or the incorrect) trajectories of one probe."""

    group: str  # "correct" | "incorrect"
    trajectories: int
    start: float
    end: float
    slope: float
    area: float
    any_word: TokenGroupChange  # pooled over the group's trajectories
    other: TokenGroupChange

    def to_dict(self) -> dict:
        return {"trajectories": self.trajectories, "start": self.start, "end": self.end, "slope": self.slope,
                "area": self.area, "any_word": self.any_word.to_dict(), "other": self.other.to_dict()}


def check_label(label: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9._-]+", label):
        raise ValueError(f"probe label {label!r} must be letters, digits, '.', '_' or '-' (it names a file)")


def summarize_groups(records: Sequence[ProbeRecord]) -> tuple[GroupSummary, ...]:
    """One summary for the correct and one for the incorrect trajectories (a group without any is left out)."""
    groups = []
    for name, wanted in (("correct", True), ("incorrect", False)):
        members = [r for r in records if r.correct == wanted]
        if not members:
            continue
        any_word, other = TokenGroupChange("any_word", 0, 0.0), TokenGroupChange("other", 0, 0.0)
        for r in members:
            any_word, other = any_word.plus(r.attribution.any_word), other.plus(r.attribution.other)
        means = [_mean(getattr(r.summary, field) for r in members) for field in ("start", "end", "slope", "area")]
        groups.append(GroupSummary(name, len(members), *means, any_word, other))
    return tuple(groups)


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def format_groups(groups: Sequence[GroupSummary]) -> str:
    lines = []
    for g in groups:
        words, other = _percent(g.any_word.mean), _percent(g.other.mean)
        lines.append(f"{g.group:>9}: {g.trajectories} trajectories  answer NLL start {g.start:.3f}  end {g.end:.3f}"
                     f"  slope {g.slope:+.3f}  area {g.area:.3f}  |  relative change at reflection words {words}"
                     f" ({g.any_word.count} tokens), elsewhere {other}")
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
        handle.write(json.dumps({"label": label, **groups}) + "\n")
    plot = out / f"curves-{label}.png"
    plot_curves(records, plot, title=f"inner-loop loss curve ({label})")
    return plot


def plot_curves(records: Sequence[ProbeRecord], path: str | Path, title: str) -> None:
    """Mean curve and a one-standard-deviation band per group, over the prefix fraction i / L."""
    import numpy as np

    grid = np.linspace(0.0, 1.0, PLOT_GRID)
    with saved_figure(path, dpi=100, figsize=(7, 4.5)) as (figure, axes):
        for name, wanted, color in (("correct", True, "tab:green"), ("incorrect", False, "tab:red")):
            curves = [on_fraction_grid(r.curve, r.positions, grid) for r in records if r.correct == wanted]
            # An empty trajectory has no fraction axis: it is left out of the plot (not of the files).
            curves = [c for c in curves if c is not None]
            if not curves:
                continue
            mean, spread = np.mean(curves, axis=0), np.std(curves, axis=0)
            axes.plot(grid, mean, color=color, label=f"{name} ({len(curves)})")
            axes.fill_between(grid, mean - spread, mean + spread, color=color, alpha=0.2)
        axes.set(title=title, xlabel="fraction of the trajectory read", ylabel="answer NLL (nats per token)")
        axes.legend()
