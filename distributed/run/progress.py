"""The live progress display: a bar with ETA, and one line per step with the figures that matter."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class StepDisplay:
    def __init__(self, total: int, done: int = 0, console: Console | None = None):
        self._console = console or Console(stderr=True)
        self._progress = Progress(
            TextColumn("[bold]training"), BarColumn(), MofNCompleteColumn(), TextColumn("steps"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            TextColumn("{task.fields[summary]}"), console=self._console, transient=False)
        self._task = self._progress.add_task("train", total=total, completed=done, summary="")

    def __enter__(self) -> "StepDisplay":
        self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.stop()

    def update(self, step: int, record: dict) -> None:
        if record.get("stage") == "sft":
            summary, line = f"SFT nll {record.get('nll', float('nan')):.3f}", format_sft_step(step, record)
        else:
            summary = f"reward {record['reward_mean']:+.3f}  acc {100 * record['accuracy']:.1f}%"
            line = format_step(step, record)
        self._progress.update(self._task, completed=step, summary=summary)
        self._progress.console.print(line)


def format_sft_step(step: int, r: dict) -> str:
    return (f"step {step:4d}  SFT  nll {r.get('nll', float('nan')):.4f}  samples {r.get('sft_samples', 0)}  "
            f"tokens {r.get('tokens', 0):.0f}  | upd {r['time_update']:5.1f}s sync {r['time_sync']:4.2f}s")


def format_step(step: int, r: dict) -> str:
    return (
        f"step {step:4d}  reward {r['reward_mean']:+.3f}  acc {100 * r['accuracy']:5.1f}%  "
        f"fmt {100 * r['formatted']:5.1f}%  len {r['completion_tokens_mean']:5.1f}  "
        f"gen {r['generate_tokens_per_s']:6.0f} tok/s  | gen {r['time_generate']:5.1f}s "
        f"upd {r['time_update']:5.1f}s sync {r['time_sync']:4.2f}s other {r['time_other']:4.2f}s  "
        f"loss {r.get('loss', float('nan')):+.4f} kl {r.get('kl', float('nan')):.4f}"
    )
