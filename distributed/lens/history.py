"""Per-question history of a run: each question is a task, each step that took it is one visit.

Built from trajectories.jsonl (one line per trajectory trained on); plain functions, no Ray.

Definitions (one visit = one step that trained on the question, with its G trajectories):
- pass rate of a visit: the fraction of its trajectories that were correct.
- solved at a visit: at least one of its trajectories was correct (pass@G > 0). Any-correct, not
  majority: one correct trajectory is what gives the group a learning signal toward the answer.
- first solved step: the step of the first visit at which it was solved; None if never.
- forgetting event: a solved visit followed, at the next visit, by an unsolved one; recorded as
  (step of the solved visit, step of the unsolved visit). solved, unsolved, solved, unsolved gives two.
- zero-variance group: a visit whose rewards were all equal, so every advantage was zero and the
  update learned nothing from that question at that step.
- status: never_solved (no visit solved), solved (its last visit was solved), forgotten (its last
  visit was not solved, an earlier one was).
A question taken twice in one step counts as one visit holding all of that step's trajectories.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from innerloop.distributed.lens.plotting import saved_figure

CHECKPOINT_FILE = "question_history.json"  # its name inside each checkpoint folder
FORMAT = 1
_REQUIRED = ("step", "question_id", "reward", "correct", "completion_tokens", "policy_version")


class HistoryError(ValueError):
    """No history to build or read; the message says where one comes from."""


@dataclass(frozen=True)
class Visit:
    """One step's trajectories of one question."""

    step: int                          # the step that trained on them (1-based)
    trajectories: int                  # G (more if the question was taken twice that step)
    correct: int                       # how many of them were correct
    zero_variance: bool                # all their rewards were equal: zero advantage for the group
    completion_tokens: int             # summed over the trajectories
    policy_versions: tuple[int, ...]   # the weights versions that sampled them, ascending

    @property
    def pass_rate(self) -> float:
        return self.correct / self.trajectories

    @property
    def solved(self) -> bool:
        return self.correct > 0


@dataclass(frozen=True)
class QuestionHistory:
    question_id: str
    visits: tuple[Visit, ...]          # ascending by step; everything else is derived from them

    @property
    def steps(self) -> tuple[int, ...]:
        return tuple(v.step for v in self.visits)

    @property
    def attempts(self) -> int:
        """Trajectories trained on, over all visits."""
        return sum(v.trajectories for v in self.visits)

    @property
    def pass_rates(self) -> dict[int, float]:
        return {v.step: v.pass_rate for v in self.visits}

    @property
    def first_solved_step(self) -> int | None:
        return next((v.step for v in self.visits if v.solved), None)

    @property
    def forgetting_events(self) -> tuple[tuple[int, int], ...]:
        return tuple((a.step, b.step) for a, b in zip(self.visits, self.visits[1:]) if a.solved and not b.solved)

    @property
    def zero_variance_groups(self) -> int:
        return sum(v.zero_variance for v in self.visits)

    @property
    def mean_completion_tokens(self) -> float:
        return sum(v.completion_tokens for v in self.visits) / self.attempts

    @property
    def policy_versions(self) -> tuple[int, ...]:
        return tuple(sorted({p for v in self.visits for p in v.policy_versions}))

    @property
    def status(self) -> str:
        if self.first_solved_step is None:
            return "never_solved"
        return "solved" if self.visits[-1].solved else "forgotten"


@dataclass(frozen=True)
class HistorySummary:
    questions: int
    solved: int
    forgotten: int
    never_solved: int
    visits: int
    zero_variance_groups: int
    trajectories: int
    last_step: int


# ---------------------------------------------------------------- building


def build_history(trajectories: Iterable[Mapping[str, Any]]) -> dict[str, QuestionHistory]:
    """{question id: its history} from trajectories.jsonl records, ordered by first visit, then id."""
    by_visit: dict[tuple[str, int], list[Mapping[str, Any]]] = defaultdict(list)
    for number, record in enumerate(trajectories, start=1):
        missing = [key for key in _REQUIRED if key not in record]
        if missing:
            raise HistoryError(f"trajectory record {number} lacks {', '.join(missing)}; "
                               f"each needs {', '.join(_REQUIRED)}")
        by_visit[(str(record["question_id"]), int(record["step"]))].append(record)
    visits: dict[str, list[Visit]] = defaultdict(list)
    for (question_id, step), group in sorted(by_visit.items(), key=lambda item: item[0][1]):
        visits[question_id].append(_visit(step, group))
    histories = [QuestionHistory(qid, tuple(v)) for qid, v in visits.items()]
    histories.sort(key=lambda h: (h.visits[0].step, h.question_id))
    return {h.question_id: h for h in histories}


def _visit(step: int, group: list[Mapping[str, Any]]) -> Visit:
    rewards = [float(t["reward"]) for t in group]
    return Visit(step=step, trajectories=len(group), correct=sum(bool(t["correct"]) for t in group),
                 zero_variance=max(rewards) == min(rewards),
                 completion_tokens=sum(int(t["completion_tokens"]) for t in group),
                 policy_versions=tuple(sorted({int(t["policy_version"]) for t in group})))


def history_of_run(run_dir: str | Path) -> dict[str, QuestionHistory]:
    """The history of a run directory (its trajectories.jsonl), or of a checkpoint folder (its saved copy)."""
    from innerloop.distributed.state.tracking import RunDir

    run_dir = Path(run_dir)
    if (run_dir / CHECKPOINT_FILE).is_file():
        return load(run_dir / CHECKPOINT_FILE)
    if not (run_dir / "trajectories.jsonl").is_file():
        raise HistoryError(f"{run_dir} has no trajectories.jsonl (nor a {CHECKPOINT_FILE}): give the run "
                           "directory of an `innerloop train` run, which writes one line per trajectory "
                           "trained on, or one of its checkpoints/step-N folders")
    histories = build_history(RunDir(run_dir).read_trajectories())
    if not histories:
        raise HistoryError(f"{run_dir / 'trajectories.jsonl'} is empty: the run has not finished a step yet")
    return histories


def summarize(histories: Mapping[str, QuestionHistory]) -> HistorySummary:
    statuses = [h.status for h in histories.values()]
    every_visit = [v for h in histories.values() for v in h.visits]
    return HistorySummary(
        questions=len(statuses), solved=statuses.count("solved"), forgotten=statuses.count("forgotten"),
        never_solved=statuses.count("never_solved"), visits=len(every_visit),
        zero_variance_groups=sum(v.zero_variance for v in every_visit),
        trajectories=sum(v.trajectories for v in every_visit),
        last_step=max((v.step for v in every_visit), default=0))


# ---------------------------------------------------------------- storing


def to_json(histories: Mapping[str, QuestionHistory]) -> str:
    """The visits are the record; the derived figures are written too, for people and jq (load ignores them)."""
    questions = [{"question_id": h.question_id, "status": h.status, "first_solved_step": h.first_solved_step,
                  "forgetting_events": h.forgetting_events, "zero_variance_groups": h.zero_variance_groups,
                  "mean_completion_tokens": round(h.mean_completion_tokens, 2),
                  "policy_versions": h.policy_versions, "visits": [asdict(v) for v in h.visits]}
                 for h in histories.values()]
    # One question per line: compact for long runs, yet greppable and diffable.
    lines = ",\n".join(json.dumps(q) for q in questions)
    return f'{{"format": {FORMAT}, "questions": [\n{lines}\n]}}\n'


def from_json(text: str) -> dict[str, QuestionHistory]:
    data = json.loads(text)
    found = data.get("format") if isinstance(data, dict) else None
    if found != FORMAT:
        raise HistoryError(f"question history format {found!r} is not {FORMAT}; "
                           "rebuild it with `innerloop questions RUN_DIR --json FILE`")
    return {q["question_id"]: QuestionHistory(q["question_id"], tuple(_visit_from_json(v) for v in q["visits"]))
            for q in data["questions"]}


def _visit_from_json(v: dict[str, Any]) -> Visit:
    return Visit(**{**v, "policy_versions": tuple(v["policy_versions"])})


def save(histories: Mapping[str, QuestionHistory], path: str | Path) -> None:
    Path(path).write_text(to_json(histories))


def load(path: str | Path) -> dict[str, QuestionHistory]:
    try:
        return from_json(Path(path).read_text())
    except HistoryError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as exc:  # cut short or edited by hand
        raise HistoryError(f"{path} is not a readable question history ({exc}); rebuild it from the run "
                           "directory with `innerloop questions RUN_DIR --json FILE`") from exc


def checkpoint_files(trajectories: Iterable[Mapping[str, Any]]) -> dict[str, bytes]:
    """What `checkpoints.save(..., extra_files=...)` stores: the history up to the checkpoint's step."""
    return {CHECKPOINT_FILE: to_json(build_history(trajectories)).encode()}


# ---------------------------------------------------------------- text for the CLI


def summary_text(where: str | Path, s: HistorySummary) -> str:
    return "\n".join([
        f"{where}: {s.questions} questions, {s.trajectories} trajectories trained on, steps 1-{s.last_step}",
        f"  solved        {s.solved:6d}  solved at their last visit (a trajectory was correct)",
        f"  forgotten     {s.forgotten:6d}  solved at an earlier visit, not at their last",
        f"  never solved  {s.never_solved:6d}  no trajectory correct at any visit",
        f"  zero-variance groups: {s.zero_variance_groups} of {s.visits} visits (all rewards equal: no signal)"])


def question_line(h: QuestionHistory) -> str:
    """One question: its first solved step, forgetting events and pass rate at each visit (step:rate)."""
    forgot = " ".join(f"{a}->{b}" for a, b in h.forgetting_events) or "-"
    rates = " ".join(f"{step}:{rate:.2f}" for step, rate in h.pass_rates.items())
    return (f"{h.question_id}  visits {len(h.visits)}  first solved {h.first_solved_step or '-'}  "
            f"forgot {forgot}  pass rate {rates}")


# ---------------------------------------------------------------- the heatmap


def heatmap_rows(histories: Mapping[str, QuestionHistory], max_rows: int) -> tuple[list[QuestionHistory], str]:
    """The questions to draw (the `max_rows` most visited when there are more) and the title that says so.

    Rows are ordered by first solved step (never solved last), so learning reads top to bottom.
    """
    chosen = list(histories.values())
    if len(chosen) > max_rows:
        chosen = sorted(chosen, key=lambda h: (-len(h.visits), h.question_id))[:max_rows]
        which = f"the {max_rows} most visited of {len(histories)} questions"
    else:
        which = f"all {len(histories)} questions"
    never = float("inf")
    chosen.sort(key=lambda h: (h.first_solved_step or never, h.visits[0].step, h.question_id))
    return chosen, f"pass rate per question and step: {which}"


def pass_rate_grid(rows: list[QuestionHistory]):
    """[questions, steps] array of pass rates (column j is step j + 1); NaN where a question was not visited."""
    import numpy as np

    grid = np.full((len(rows), max(h.visits[-1].step for h in rows)), np.nan)
    for row, h in enumerate(rows):
        for v in h.visits:
            grid[row, v.step - 1] = v.pass_rate
    return grid


def write_heatmap(histories: Mapping[str, QuestionHistory], path: str | Path, max_rows: int = 100) -> None:
    """A PNG: one row per question, one column per step, colored by pass rate; blank where not visited."""
    import matplotlib
    import numpy as np

    if not histories:
        raise HistoryError("no questions to draw: the history is empty")
    rows, title = heatmap_rows(histories, max_rows)
    grid = pass_rate_grid(rows)
    last_step = grid.shape[1]
    colors = matplotlib.colormaps["viridis"].with_extremes(bad="white")  # NaN: not visited at that step
    # At least 7 inches wide: the title names what is shown and must fit above a short run's columns.
    size = (min(20.0, max(7.0, 4 + 0.05 * last_step)), min(20.0, 2 + 0.12 * len(rows)))
    with saved_figure(path, dpi=100, figsize=size) as (figure, axes):
        image = axes.imshow(np.ma.masked_invalid(grid), aspect="auto", interpolation="nearest", cmap=colors,
                            vmin=0.0, vmax=1.0, extent=(0.5, last_step + 0.5, len(rows) - 0.5, -0.5))
        figure.colorbar(image, ax=axes, label="pass rate (fraction of the group correct)")
        axes.set_title(title, fontsize=9, wrap=True)
        axes.set(xlabel="step", ylabel="question (by first solved step)")
        if len(rows) <= 50:  # beyond that the labels overlap
            axes.set_yticks(range(len(rows)), [h.question_id for h in rows], fontsize=7)
        else:
            axes.set_yticks([])
