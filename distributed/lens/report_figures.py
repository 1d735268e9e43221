"""The figures of `innerloop report`: matplotlib (Agg, files only) drawn into PNG bytes.

Each function takes records already gathered by report.py and returns a Figure to embed.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from innerloop.distributed.lens import history
from innerloop.distributed.lens.plotting import saved_figure

if TYPE_CHECKING:
    from innerloop.distributed.lens.report import EvalPoint, ProbeCurves


@dataclass(frozen=True)
class Figure:
    title: str                # the caption
    alt: str                  # what the image shows, for screen readers and a failed load
    png: bytes

    def data_uri(self) -> str:
        return "data:image/png;base64," + base64.b64encode(self.png).decode("ascii")


Series = tuple[Sequence[int], Sequence[float]]  # (steps, values)


def training_curves(metrics: Mapping[str, Series], evals: Sequence["EvalPoint"]) -> Figure:
    """Mean reward, and training accuracy beside the held-out evaluations, over steps.
    `metrics`: the series of reward_mean, accuracy and formatted."""
    with _figure(2, height=6.5) as (figure, (reward_axes, accuracy_axes), png):
        reward_axes.plot(*metrics["reward_mean"], marker=".", label="mean reward")
        reward_axes.set(ylabel="reward", title="mean reward of the trajectories trained on")
        accuracy_axes.plot(*metrics["accuracy"], marker=".", label="training (trajectories trained on)")
        accuracy_axes.plot(*metrics["formatted"], linestyle=":", label="training, well formatted")
        if evals:
            accuracy_axes.plot([p.step for p in evals], [p.accuracy for p in evals], "o", color="black",
                               label="held-out evaluation")
        accuracy_axes.set(xlabel="step", ylabel="fraction", ylim=(-0.05, 1.05), title="accuracy")
        for axes in (reward_axes, accuracy_axes):
            axes.legend(loc="best", fontsize=8)
            axes.grid(alpha=0.3)
    held_out = f"; {len(evals)} held-out evaluations as black dots" if evals else ""
    steps = len(metrics["accuracy"][0])
    return Figure("Reward and accuracy per step", f"Line plots of mean reward and accuracy over {steps} "
                  f"steps{held_out}.", png.getvalue())


def phase_times(steps: Sequence[Mapping[str, Any]], phases: Sequence[str]) -> Figure:
    """Seconds per step, stacked by phase (generate, update, sync, other)."""
    x = [int(r["step"]) for r in steps]
    # time_other is the step's remainder; a clock's jitter can make it a hair below zero.
    stacked = [[max(0.0, float(r.get(f"time_{p}", 0.0))) for r in steps] for p in phases]
    with _figure(1, height=3.5) as (figure, (axes,), png):
        if len(x) > 1:
            axes.stackplot(x, stacked, labels=phases, alpha=0.85)
        else:  # one step has no area to fill: stacked bars say the same
            bottom = 0.0
            for phase, values in zip(phases, stacked):
                axes.bar(x, values, bottom=bottom, label=phase)
                bottom += values[0]
        axes.set(xlabel="step", ylabel="seconds", title="time per step, by phase")
        axes.legend(loc="upper left", fontsize=8)
        axes.grid(alpha=0.3)
    return Figure("Time per step by phase", f"Stacked plot of seconds per step split into {', '.join(phases)} "
                  f"over {len(x)} steps.", png.getvalue())


def probe_curves(curves: "ProbeCurves") -> Figure:
    """The mean inner-loop probe curve of correct and of incorrect trajectories, along the trajectory."""
    with _figure(1, height=3.5, steps_on_x=False) as (figure, (axes,), png):
        for label, mean, count, color in (("correct", curves.correct, curves.correct_count, "tab:green"),
                                          ("incorrect", curves.incorrect, curves.incorrect_count, "tab:red")):
            if mean is not None:
                axes.plot(curves.fractions, mean, marker=".", color=color, label=f"{label} ({count} trajectories)")
        axes.set(xlabel="fraction of the trajectory", ylabel="probe loss (answer NLL)",
                 title="inner-loop probe: loss of the reference answer after each prefix")
        axes.legend(loc="best", fontsize=8)
        axes.grid(alpha=0.3)
    return Figure("Inner-loop probe, mean curve", f"Mean probe loss against the fraction of the trajectory: "
                  f"{curves.correct_count} correct and {curves.incorrect_count} incorrect trajectories.",
                  png.getvalue())


def heatmap(histories: Mapping[str, history.QuestionHistory], max_rows: int = 100) -> Figure:
    """history.py's heatmap, drawn into memory."""
    png = io.BytesIO()
    history.write_heatmap(histories, png, max_rows=max_rows)
    _, which = history.heatmap_rows(histories, max_rows)
    return Figure("Per-question pass rate", f"Heatmap, one row per question and one column per step, colored "
                  f"by the fraction of the group correct ({which}).", png.getvalue())


@contextmanager
def _figure(rows: int, height: float, steps_on_x: bool = True):
    """(figure, axes, PNG buffer): the buffer holds the PNG once the block ends; the figure is closed."""
    png = io.BytesIO()
    with saved_figure(png, dpi=90, format="png", nrows=rows, figsize=(10, height), squeeze=False,
                      sharex=True) as (figure, axes):
        if steps_on_x:
            from matplotlib.ticker import MaxNLocator

            axes[-1, 0].xaxis.set_major_locator(MaxNLocator(integer=True))  # no step 1.5
        yield figure, tuple(axes[:, 0]), png
