"""The inner-loop probe over sampled trajectories: curves, per-group summaries, files and plots.

`probe_trajectories` and `write_probe` are what a training loop calls on a cadence (with the policy's
transformers model); `innerloop probe` (distributed/probe_command.py) calls them on fresh samples.

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
from typing import Sequence

from innerloop.distributed.records import Question, Trajectory
from innerloop.learners.probe_summary import (DEFAULT_WORDS, Attribution, CurveSummary, TokenGroupChange, attribute,
                                              summarize_curve, word_starts)

# The defaults of `innerloop probe` (candidates for a `probe:` config section).
ANSWER_SLOT = "{answer}"
DEFAULT_SUFFIX = "\n\n**Final Answer**\n\\boxed{{answer}}"  # the paper's; text after {answer} is not fed
DEFAULT_QUESTIONS = 8  # held-out questions probed
DEFAULT_SAMPLES = 4  # trajectories per question
DEFAULT_EVERY = 1  # probe after every token
DEFAULT_BATCH = 8  # prefixes per batched suffix forward
PLOT_GRID = 101  # points on the prefix-fraction axis where curves are averaged


@dataclass(frozen=True)
class ProbeItem:
    """One trajectory to probe and the reference answer of its question."""

    question_id: str
    prompt_ids: tuple[int, ...]  # [P] chat-templated prompt
    completion_ids: tuple[int, ...]  # [L] the trajectory, without a trailing end-of-turn token
    answer: str
    correct: bool


@dataclass(frozen=True)
class ProbeRecord:
    question_id: str
    correct: bool
    completion_tokens: int  # L
    positions: tuple[int, ...]  # [K] prefix lengths probed
    curve: tuple[float, ...]  # [K] mean answer NLL (nats) after each prefix
    summary: CurveSummary
    attribution: Attribution

    def to_dict(self, label: str) -> dict:
        return {"label": label, "question_id": self.question_id, "correct": self.correct,
                "completion_tokens": self.completion_tokens, "positions": list(self.positions),
                "curve": list(self.curve), "summary": self.summary.to_dict(),
                "attribution": self.attribution.to_dict()}


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


def items_from_trajectories(trajectories: Sequence[Trajectory], questions: Sequence[Question],
                            end_ids: Sequence[int]) -> list[ProbeItem]:
    """Pair trajectories with their reference answers. A trailing end-of-turn token is dropped: the
    suffix continues the trajectory's text, not a closed turn."""
    answers = {q.question_id: q.answer for q in questions}
    items = []
    for t in trajectories:
        if t.question_id not in answers:
            raise ValueError(f"trajectory of question {t.question_id} has no question with a reference answer")
        completion = t.completion_ids
        while completion and completion[-1] in end_ids:
            completion = completion[:-1]
        items.append(ProbeItem(t.question_id, t.prompt_ids, completion, answers[t.question_id], t.correct))
    return items


def suffix_tokens(tokenizer, suffix_template: str, answer: str) -> tuple[list[int], int]:
    """(lead-in + answer token ids, answer token count). The lead-in and the answer are tokenized apart,
    so the scored tokens are exactly the answer's; text after {answer} (the closing brace) is not fed:
    under causal attention it cannot change the answer tokens' NLL."""
    check_suffix_template(suffix_template)
    if not answer.strip():
        raise ValueError("a question has an empty reference answer: nothing to score")
    lead_ids = tokenizer.encode(suffix_template.split(ANSWER_SLOT)[0], add_special_tokens=False)
    answer_ids = tokenizer.encode(answer, add_special_tokens=False)
    return lead_ids + answer_ids, len(answer_ids)


def check_suffix_template(suffix_template: str) -> None:
    if suffix_template.count(ANSWER_SLOT) != 1 or not suffix_template.split(ANSWER_SLOT)[0]:
        raise ValueError(f"the suffix {suffix_template!r} must hold {ANSWER_SLOT} exactly once, after some "
                         "lead-in text: the first answer token is predicted from it (the paper's suffix is "
                         f"{DEFAULT_SUFFIX!r})")


def check_label(label: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9._-]+", label):
        raise ValueError(f"probe label {label!r} must be letters, digits, '.', '_' or '-' (it names a file)")


def probe_trajectories(model, tokenizer, items: Sequence[ProbeItem], suffix_template: str = DEFAULT_SUFFIX,
                       every: int = DEFAULT_EVERY, words: Sequence[str] = DEFAULT_WORDS,
                       batch_size: int = DEFAULT_BATCH) -> list[ProbeRecord]:
    """One record per item. `model`: a transformers causal LM (full attention) in eval mode, whose
    whole weights this process holds (gradients are not tracked)."""
    from innerloop.learners.probe import answer_nll_curve

    records = []
    for item in items:
        suffix_ids, answer_len = suffix_tokens(tokenizer, suffix_template, item.answer)
        curve = answer_nll_curve(model, item.prompt_ids, item.completion_ids, suffix_ids, answer_len, every,
                                 batch_size)
        token_words = word_starts([tokenizer.decode([t]) for t in item.completion_ids], words)
        records.append(ProbeRecord(
            item.question_id, item.correct, len(item.completion_ids), curve.positions, curve.values,
            summarize_curve(curve.positions, curve.values, len(item.completion_ids)),
            attribute(curve.positions, curve.values, token_words, words)))
    return records


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
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt
    import numpy as np

    grid = np.linspace(0.0, 1.0, PLOT_GRID)
    figure, axes = plt.subplots(figsize=(7, 4.5))
    try:
        for name, wanted, color in (("correct", True, "tab:green"), ("incorrect", False, "tab:red")):
            # An empty trajectory has no fraction axis: it is left out of the plot (not of the files).
            curves = [np.interp(grid, np.array(r.positions) / r.completion_tokens, r.curve)
                      for r in records if r.correct == wanted and r.completion_tokens > 0]
            if not curves:
                continue
            mean, spread = np.mean(curves, axis=0), np.std(curves, axis=0)
            axes.plot(grid, mean, color=color, label=f"{name} ({len(curves)})")
            axes.fill_between(grid, mean - spread, mean + spread, color=color, alpha=0.2)
        axes.set(title=title, xlabel="fraction of the trajectory read", ylabel="answer NLL (nats per token)")
        axes.legend()
        figure.tight_layout()
        figure.savefig(path, dpi=100)
    finally:
        plt.close(figure)
