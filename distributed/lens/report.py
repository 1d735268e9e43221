"""`innerloop report RUN_DIR`: one self-contained HTML page about a run.

Reads what the run directory holds (see tracking.py): config.yaml, metrics.jsonl, trajectories.jsonl
and, where the inner-loop probe has run, RUN_DIR/probe/**/probe.jsonl. The figures are PNGs drawn
with matplotlib and embedded as data: URIs, and the page's Content-Security-Policy forbids fetching
anything, so the file opens anywhere, offline, as it is. A missing or empty input leaves a note in its
section saying what would fill it; only a folder without metrics.jsonl is refused: it is not a run.

The gathering below is plain functions over the records; the drawing lives in report_figures.py.
"""

from __future__ import annotations

import html
import json
import math
import statistics
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from innerloop.distributed.lens import history, report_figures
from innerloop.distributed.lens.plotting import on_fraction_grid
from innerloop.distributed.lens.report_figures import Figure
from innerloop.distributed.state.tracking import RunDir, read_jsonl

PHASES = ("generate", "probe", "update", "sync", "other")  # time_<phase> of a step record: they sum to time_step
TIMED = ("generate", "update", "sync", "other")  # every GRPO step has these; time_probe only when it probed
PROBE_GRID_POINTS = 21                             # fractions 0, 0.05, ..., 1 of a trajectory
MAX_EVENT_ROWS = 500                               # the events table shows the last ones beyond this


class ReportError(ValueError):
    """No report can be made; the message says what a run directory holds and where one comes from."""


@dataclass(frozen=True)
class EvalPoint:
    step: int                 # the step the held-out evaluation ran after (0: before training)
    label: str                # "before", "after" or "step_N"
    accuracy: float           # fraction of held-out questions answered correctly
    questions: int | None


@dataclass(frozen=True)
class RunEvent:
    step: int
    name: str                 # e.g. checkpoint, rollout_workers_scaled, learners_restarted
    details: str              # the record's other fields, key=value


@dataclass(frozen=True)
class RunSummary:
    steps: int                                   # step records logged
    last_step: int
    accuracy_before: float | None                # held-out, from the eval_before / eval_after events
    accuracy_after: float | None
    median_step_seconds: float | None
    phase_shares: Mapping[str, float]            # phase: its share of all step time; empty without timings
    staleness_mean: float | None                 # policy versions the trained trajectories lagged, on average
    event_counts: Mapping[str, int]              # every event other than the evaluations, by name


@dataclass(frozen=True)
class ProbeCurves:
    fractions: tuple[float, ...]                 # where along a trajectory: 0 its start, 1 its end
    correct: tuple[float, ...] | None            # mean probe loss over correct trajectories; None if none
    incorrect: tuple[float, ...] | None
    correct_count: int
    incorrect_count: int
    unusable: int                                # records without a curve to draw (lengths differ, empty)


# ---------------------------------------------------------------- the records, plain


def step_records(records: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The per-step records of metrics.jsonl: those that are not events (and say which step they are)."""
    return [r for r in records if "event" not in r and isinstance(r.get("step"), int)]


def series(steps: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric, leaving out steps where it is missing or not finite."""
    pairs = [(int(r["step"]), float(r[key])) for r in steps if _finite(r.get(key))]
    return [s for s, _ in pairs], [v for _, v in pairs]


def eval_points(records: Iterable[Mapping[str, Any]]) -> list[EvalPoint]:
    points = []
    for r in records:
        name = str(r.get("event", ""))
        if name.startswith("eval_") and _finite(r.get("eval_accuracy")):
            points.append(EvalPoint(int(r.get("step", 0)), name.removeprefix("eval_"), float(r["eval_accuracy"]),
                                    r.get("eval_questions")))
    return points


def run_events(records: Iterable[Mapping[str, Any]]) -> list[RunEvent]:
    """Every event but the held-out evaluations (they have their own figure and rows)."""
    return [RunEvent(int(r.get("step", 0)), str(r["event"]),
                     " ".join(f"{k}={_short(v)}" for k, v in r.items() if k not in ("step", "time", "event")))
            for r in records if "event" in r and not str(r["event"]).startswith("eval_")]


def phase_shares(steps: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Each phase's share of the summed step time, over the steps that carry every timing."""
    timed = [r for r in steps if all(_finite(r.get(f"time_{p}")) for p in (*TIMED, "step"))]
    total = sum(r["time_step"] for r in timed)
    if total <= 0:
        return {}
    phases = [p for p in PHASES if p in TIMED or any(f"time_{p}" in r for r in timed)]
    return {p: sum(r.get(f"time_{p}", 0.0) for r in timed) / total for p in phases}


def summarize(records: Sequence[Mapping[str, Any]]) -> RunSummary:
    steps = step_records(records)
    evals = eval_points(records)
    _, step_seconds = series(steps, "time_step")
    _, staleness = series(steps, "staleness_mean")
    return RunSummary(
        steps=len(steps), last_step=max((int(r["step"]) for r in steps), default=0),
        accuracy_before=_last_accuracy(evals, "before"), accuracy_after=_last_accuracy(evals, "after"),
        median_step_seconds=statistics.median(step_seconds) if step_seconds else None,
        phase_shares=phase_shares(steps), staleness_mean=statistics.fmean(staleness) if staleness else None,
        event_counts=dict(Counter(e.name for e in run_events(records))))


def _last_accuracy(points: list[EvalPoint], label: str) -> float | None:
    found = [p.accuracy for p in points if p.label == label]
    return found[-1] if found else None  # a resumed run may hold several: the last is the run's


# ---------------------------------------------------------------- the inner-loop probe


def mean_probe_curves(records: Iterable[Mapping[str, Any]], points: int = PROBE_GRID_POINTS) -> ProbeCurves:
    """Mean probe curve of the correct and of the incorrect trajectories, on a common fraction grid:
    trajectories differ in length, so each is placed by how far along it the probe was taken."""
    grid = [i / (points - 1) for i in range(points)]
    resampled: dict[bool, list[list[float]]] = {True: [], False: []}
    unusable = 0
    for r in records:
        curve = _probe_curve(r, grid)
        if curve is None:
            unusable += 1
        else:
            resampled[bool(r["correct"])].append(curve)
    mean = {k: tuple(statistics.fmean(column) for column in zip(*v)) if v else None for k, v in resampled.items()}
    return ProbeCurves(tuple(grid), mean[True], mean[False], len(resampled[True]), len(resampled[False]), unusable)


def _probe_curve(record: Mapping[str, Any], grid: list[float]) -> list[float] | None:
    curve, positions = record.get("curve"), record.get("positions")
    if "correct" not in record or not isinstance(curve, list) or not isinstance(positions, list):
        return None
    if not all(_finite(c) for c in curve) or not all(isinstance(p, int) for p in positions):
        return None
    return on_fraction_grid(curve, positions, grid)


def read_probe(run_dir: Path) -> list[dict[str, Any]]:
    """Every probe.jsonl record under RUN_DIR/probe (a line cut short by a kill is not a record)."""
    return [r for path in sorted((run_dir / "probe").rglob("probe.jsonl")) for r in read_jsonl(path)]


# ---------------------------------------------------------------- the page


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the report of a run directory (default RUN_DIR/report.html); returns its path."""
    run_dir = Path(run_dir)
    if not (run_dir / "metrics.jsonl").is_file():
        where = "does not exist" if not run_dir.exists() else "has no metrics.jsonl"
        raise ReportError(f"{run_dir} {where}: give the run directory of an `innerloop train` run "
                          "(it writes metrics.jsonl from its first step on)")
    out = Path(out) if out is not None else run_dir / "report.html"
    if not out.parent.is_dir() or out.is_dir():
        problem = "is a folder" if out.is_dir() else f"the folder {out.parent} does not exist"
        raise ReportError(f"--out {out}: {problem}; give the path of the HTML file to write")
    run = RunDir(run_dir)
    records = run.read_metrics()
    sections = [_summary_section(records, run_dir), _training_section(records), _phases_section(records),
                _probe_section(run_dir), _heatmap_section(run.read_trajectories()), _events_section(records),
                _config_section(run_dir)]
    out.write_text(render_page(f"innerloop run report: {run_dir.resolve().name}", sections))
    return out


def render_page(title: str, sections: Sequence[tuple[str, str]]) -> str:
    """The whole page; `sections` are (heading, body HTML already escaped)."""
    body = "\n".join(f'<section>\n<h2>{html.escape(h)}</h2>\n{b}\n</section>' for h, b in sections)
    return _PAGE.format(title=html.escape(title), body=body)


def _summary_section(records: list[dict[str, Any]], run_dir: Path) -> tuple[str, str]:
    if not records:
        return "Summary", _note("metrics.jsonl is empty: the run has not finished a step yet.")
    s = summarize(records)
    shares = ", ".join(f"{p} {100 * v:.0f}%" for p, v in s.phase_shares.items()) or "no timings logged"
    rows = [("steps logged", f"{s.steps} (last step {s.last_step})"),
            ("held-out accuracy before training", _percent(s.accuracy_before)),
            ("held-out accuracy after training", _percent(s.accuracy_after)),
            *_lenient_rows(records), *_pass_rows(records),
            ("median step time", "-" if s.median_step_seconds is None else f"{s.median_step_seconds:.2f} s"),
            ("share of step time", shares),
            ("mean staleness (policy versions)", "-" if s.staleness_mean is None else f"{s.staleness_mean:.2f}")]
    rows += [(f"events: {name}", str(count)) for name, count in sorted(s.event_counts.items())]
    superseded = len(read_jsonl(run_dir / "superseded.jsonl"))
    if superseded:
        rows.append(("records superseded by resumes", f"{superseded} (see superseded.jsonl)"))
    return "Summary", _table(rows)


def _lenient_rows(records: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """Lenient held-out accuracy (the last number, boxed or not; lens/accuracy.py), where the run logged it."""
    lenient = {r.get("event"): r["eval_lenient_accuracy"] for r in records if _finite(r.get("eval_lenient_accuracy"))}
    return [(f"lenient held-out accuracy {when} training", _percent(lenient.get(f"eval_{when}")))
            for when in ("before", "after") if lenient]


def _pass_rows(records: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """The sampled eval's Pass@K (strict and lenient; lens/sampled_eval.py), where a held-out eval drew it."""
    rows = []
    for r in records:
        ks = sorted(int(k.rpartition("@")[2]) for k in r if k.startswith("eval_pass@") and _finite(r[k]))
        if str(r.get("event", "")).startswith("eval_") and ks:
            when = r["event"].removeprefix("eval_").replace("_", " ")
            rows.append((f"Pass@k {when} ({r.get('eval_sampled_questions')} questions x "
                         f"{r.get('eval_sampled_samples')} samples; strict / lenient)",
                         ", ".join(f"@{k} {_percent(r[f'eval_pass@{k}'])} / {_percent(r.get(f'eval_lenient_pass@{k}'))}"
                                   for k in ks)))
    return rows


def _training_section(records: list[dict[str, Any]]) -> tuple[str, str]:
    steps = step_records(records)
    if not steps:
        return "Reward and accuracy", _note("No step records in metrics.jsonl yet: nothing to plot.")
    metrics = {key: series(steps, key) for key in ("reward_mean", "accuracy", "formatted")}
    return "Reward and accuracy", _img(report_figures.training_curves(metrics, eval_points(records)))


def _phases_section(records: list[dict[str, Any]]) -> tuple[str, str]:
    steps = [r for r in step_records(records) if all(_finite(r.get(f"time_{p}")) for p in TIMED)]
    if not steps:
        return "Time per step", _note("No step in metrics.jsonl carries phase timings (time_generate, "
                                      "time_update, time_sync, time_other).")
    return "Time per step", _img(report_figures.phase_times(steps, PHASES))


def _probe_section(run_dir: Path) -> tuple[str, str]:
    heading = "Inner-loop probe"
    records = read_probe(run_dir) if (run_dir / "probe").is_dir() else []
    if not records:
        return heading, _note("No probe records (RUN_DIR/probe/probe.jsonl): the inner-loop probe has not "
                              "run on this run's trajectories.")
    curves = mean_probe_curves(records)
    if curves.correct is None and curves.incorrect is None:
        return heading, _note(f"None of the {len(records)} probe records has a usable curve (a `correct` flag, "
                              "and `curve` and `positions` of one length).")
    skipped = _note(f"Left out: {curves.unusable} probe records without a usable curve.") if curves.unusable else ""
    return heading, _img(report_figures.probe_curves(curves)) + skipped


def _heatmap_section(trajectories: list[dict[str, Any]]) -> tuple[str, str]:
    heading = "Per-question pass rate"
    if not trajectories:
        return heading, _note("trajectories.jsonl is missing or empty: no trajectory was trained on yet.")
    try:
        histories = history.build_history(trajectories)
        figure = report_figures.heatmap(histories)
    except history.HistoryError as exc:
        return heading, _note(f"trajectories.jsonl cannot be read as a question history: {exc}")
    s = history.summarize(histories)
    counts = (f"{s.questions} questions: {s.solved} solved at their last visit, {s.forgotten} forgotten, "
              f"{s.never_solved} never solved; {s.zero_variance_groups} of {s.visits} visits had all rewards "
              "equal (no learning signal).")
    listing = "<code>innerloop questions RUN_DIR</code> lists them."
    return heading, f"<p>{html.escape(counts)} {listing}</p>\n{_img(figure)}"


def _events_section(records: list[dict[str, Any]]) -> tuple[str, str]:
    events = run_events(records)
    if not events:
        return "Events", _note("No events logged (checkpoints, rollout pool scaling, learner restarts...).")
    shown = events[-MAX_EVENT_ROWS:]
    cut = _note(f"The last {MAX_EVENT_ROWS} of {len(events)} events; all are in metrics.jsonl.") \
        if len(events) > MAX_EVENT_ROWS else ""
    return "Events", cut + _table([(str(e.step), e.name, e.details) for e in shown], ("step", "event", "details"))


def _config_section(run_dir: Path) -> tuple[str, str]:
    path = run_dir / "config.yaml"
    if not path.is_file():
        return "Config", _note("No config.yaml in the run directory.")
    return "Config", f"<pre>{html.escape(path.read_text())}</pre>"


# ---------------------------------------------------------------- small helpers


def _img(figure: Figure) -> str:
    return (f'<figure><img src="{figure.data_uri()}" alt="{html.escape(figure.alt)}">'
            f"<figcaption>{html.escape(figure.title)}</figcaption></figure>")


def _note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def _table(rows: Iterable[tuple[str, ...]], headings: tuple[str, ...] = ()) -> str:
    head = "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in headings) + "</tr>" if headings else ""
    cells = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>\n" for row in rows)
    return f"<table>{head}\n{cells}</table>"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= 120 else text[:117] + "..."


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# The script reports, once everything has loaded, how many images decoded (the browser test reads it).
_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy"
      content="default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<title>{title}</title>
<style>
body {{ font-family: sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }}
table {{ border-collapse: collapse; }}
td, th {{ border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: left; vertical-align: top; }}
img {{ max-width: 100%; }}
pre {{ background: #f4f4f4; padding: 1em; overflow-x: auto; }}
.note {{ color: #735c0f; background: #fff8e1; padding: 0.5em; }}
</style>
</head>
<body>
<h1>{title}</h1>
{body}
<script>
window.addEventListener("load", function () {{
  var images = Array.prototype.slice.call(document.images);
  var loaded = images.filter(function (img) {{ return img.complete && img.naturalWidth > 0; }}).length;
  document.body.setAttribute("data-images-loaded", loaded + "/" + images.length);
}});
</script>
</body>
</html>
"""
