"""`innerloop report`: the gathered numbers on hand-written records, the page's sections and notes,
the CLI, and the page opened in a real headless browser (Debian's chromium)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from innerloop.distributed import cli

from innerloop.distributed.lens import plotting, report
from innerloop.distributed.records import Trajectory
from innerloop.distributed.state.tracking import RunDir, read_jsonl

PHASE_TIMES = [  # (generate, update, sync, other) seconds of steps 1-4; each step's time_step is their sum
    (6.0, 2.0, 1.0, 1.0), (5.0, 2.0, 1.0, 0.0), (7.0, 3.0, 1.0, 1.0), (6.0, 2.0, 2.0, 2.0)]
PROBE_LINES = [  # correct trajectories fall along the way, incorrect ones stay flat
    {"question_id": "q1", "correct": True, "curve": [4.0, 2.0, 1.0], "positions": [0, 50, 100], "step": 4},
    {"question_id": "q2", "correct": True, "curve": [4.0, 3.0, 0.0], "positions": [0, 10, 20], "step": 4},
    {"question_id": "q3", "correct": False, "curve": [3.0, 3.0, 3.0], "positions": [0, 30, 60], "step": 4},
    {"question_id": "q4", "correct": False, "curve": [1.0, 2.0], "positions": [0, 10, 20], "step": 4},  # unusable
]


def metrics_lines() -> list[dict]:
    """A four-step run: evaluations before, at step 2 and after, checkpoints, a resize and a restart."""
    lines: list[dict] = [{"step": 0, "event": "eval_before", "eval_accuracy": 0.25, "eval_questions": 8}]
    for step, (generate, update, sync, other) in enumerate(PHASE_TIMES, start=1):
        lines.append({"step": step, "reward_mean": -0.5 + 0.25 * step, "accuracy": 0.2 * step, "formatted": 0.9,
                      "loss": 0.1, "grad_norm": 1.0, "staleness_mean": 0.5 * (step % 2),
                      "time_generate": generate, "time_update": update, "time_sync": sync, "time_other": other,
                      "time_step": generate + update + sync + other})
        if step == 2:
            lines += [{"step": 2, "event": "eval_step_2", "eval_accuracy": 0.375, "eval_questions": 8},
                      {"step": 2, "event": "checkpoint", "path": "step-2", "seconds": 1.5}]
        if step == 3:
            lines += [{"step": 3, "event": "rollout_workers_scaled", "from": 2, "to": 4, "seconds": 3.0},
                      {"step": 3, "event": "learners_restarted", "reason": "rank 1 <died>", "restarts": 1}]
    return lines + [{"step": 4, "event": "checkpoint", "path": "step-4", "seconds": 1.0},
                    {"step": 4, "event": "eval_after", "eval_accuracy": 0.5, "eval_questions": 8},
                    {"step": 4, "event": "done", "seconds": 60.0, "accuracy_before": 0.25, "accuracy_after": 0.5}]


def trajectory(question_id: str, reward: float, version: int) -> Trajectory:
    return Trajectory(question_id=question_id, prompt_ids=(1, 2), completion_ids=(3, 4, 5), logprobs=(-0.1,) * 3,
                      finish_reason="stop", text="", reward=reward, correct=reward > 0, formatted=True,
                      policy_version=version)


def write_lines(path: Path, lines: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


@pytest.fixture
def run_dir(tmp_path) -> Path:
    path = tmp_path / "run"
    run = RunDir(path)
    (path / "config.yaml").write_text("model:\n  name: tiny <model> & co\ntrain:\n  steps: 4\n")
    write_lines(run.metrics_file, metrics_lines())
    for step in range(1, 5):
        run.record_trajectories(step, step - 1, [trajectory("q1", float(step > 2), step - 1),
                                                 trajectory("q1", 0.0, step - 1),
                                                 trajectory(f"q{step}", 1.0, step - 1)])
    write_lines(path / "probe" / "probe.jsonl", PROBE_LINES)
    return path


# ---------------------------------------------------------------- the gathered numbers


def test_summary_of_a_known_run():
    s = report.summarize(metrics_lines())
    assert (s.steps, s.last_step) == (4, 4)
    assert (s.accuracy_before, s.accuracy_after) == (0.25, 0.5)
    assert s.median_step_seconds == 11.0  # step times 10, 8, 12, 12
    assert s.phase_shares == pytest.approx({"generate": 24 / 42, "update": 9 / 42, "sync": 5 / 42, "other": 4 / 42})
    assert s.staleness_mean == 0.25
    assert s.event_counts == {"checkpoint": 2, "rollout_workers_scaled": 1, "learners_restarted": 1, "done": 1}


def test_eval_points_keep_their_step_and_label():
    points = report.eval_points(metrics_lines())
    assert [(p.step, p.label, p.accuracy) for p in points] == [(0, "before", 0.25), (2, "step_2", 0.375),
                                                              (4, "after", 0.5)]


def test_phase_shares_leave_out_steps_without_every_timing():
    steps = [{"step": 1, "time_generate": 3.0, "time_update": 1.0, "time_sync": 0.0, "time_other": 0.0,
              "time_step": 4.0},
             {"step": 2, "time_generate": 100.0, "time_step": 100.0}]  # no update/sync/other: not counted
    assert report.phase_shares(steps) == {"generate": 0.75, "update": 0.25, "sync": 0.0, "other": 0.0}
    assert report.phase_shares([]) == {}


def test_series_skips_missing_and_non_finite_values():
    steps = [{"step": 1, "loss": 0.5}, {"step": 2}, {"step": 3, "loss": float("nan")}, {"step": 4, "loss": 0.25}]
    assert report.series(steps, "loss") == ([1, 4], [0.5, 0.25])


def test_a_probe_curve_is_resampled_on_fractions_of_its_trajectory():
    grid = [0.0, 0.25, 0.5, 1.0]
    assert plotting.on_fraction_grid([3.0, 2.0, 1.0], [0, 50, 100], grid) == [3.0, 2.5, 2.0, 1.0]
    assert plotting.on_fraction_grid([3.0, 1.0], [0, 10, 20], grid) is None  # lengths differ
    assert plotting.on_fraction_grid([3.0], [0], grid) is None                # nothing probed past the start


def test_a_line_cut_short_by_a_kill_is_not_a_record(tmp_path):
    path = tmp_path / "probe" / "probe.jsonl"
    path.parent.mkdir()
    path.write_text('{"step": 1}\n[1, 2]\n{"step": 2}\n{"step": 3, "cur')
    assert read_jsonl(path) == [{"step": 1}, {"step": 2}]
    assert report.read_probe(tmp_path) == [{"step": 1}, {"step": 2}]
    assert read_jsonl(tmp_path / "missing.jsonl") == []


def test_mean_probe_curves_split_correct_from_incorrect():
    curves = report.mean_probe_curves(PROBE_LINES, points=3)
    assert curves.fractions == (0.0, 0.5, 1.0)
    assert curves.correct == pytest.approx((4.0, 2.5, 0.5))  # mean of (4, 2, 1) and (4, 3, 0)
    assert curves.incorrect == pytest.approx((3.0, 3.0, 3.0))
    assert (curves.correct_count, curves.incorrect_count, curves.unusable) == (2, 1, 1)


# ---------------------------------------------------------------- the page and the CLI


def test_the_page_holds_every_section_escaped_and_self_contained(run_dir):
    page = report.write_report(run_dir).read_text()
    for heading in ("Summary", "Reward and accuracy", "Time per step", "Inner-loop probe",
                    "Per-question pass rate", "Events", "Config"):
        assert f"<h2>{heading}</h2>" in page
    assert page.count('<img src="data:image/png;base64,') == 4
    assert "tiny &lt;model&gt; &amp; co" in page and "<model>" not in page
    assert "rank 1 &lt;died&gt;" in page
    assert "<td>held-out accuracy after training</td><td>50.0%</td>" in page
    # every input was there: the one note is about the probe line whose curve and positions differ in length
    assert re.findall(r'<p class="note">([^<]*)</p>', page) == ["Left out: 1 probe records without a usable curve."]
    assert not re.search(r'(?:src|href)="(?!data:)', page)  # nothing fetched from anywhere


def test_missing_inputs_leave_notes_not_errors(tmp_path):
    write_lines(tmp_path / "metrics.jsonl", [])
    page = report.write_report(tmp_path, tmp_path / "r.html").read_text()
    assert "metrics.jsonl is empty" in page and "No probe records" in page
    assert "trajectories.jsonl is missing or empty" in page and "No config.yaml" in page
    assert "<img" not in page


def test_trajectories_that_are_no_history_leave_a_note(run_dir):
    write_lines(run_dir / "trajectories.jsonl", [{"step": 1, "question_id": "q1"}])  # not what the driver writes
    page = report.write_report(run_dir).read_text()
    assert "trajectories.jsonl cannot be read as a question history: trajectory record 1 lacks reward" in page
    assert page.count("<img") == 3  # the other figures are still drawn


def test_a_folder_without_metrics_is_refused_with_what_makes_a_run(tmp_path):
    with pytest.raises(report.ReportError, match="has no metrics.jsonl: give the run directory of an `innerloop"):
        report.write_report(tmp_path)
    with pytest.raises(report.ReportError, match="does not exist"):
        report.write_report(tmp_path / "nowhere")


def test_out_must_be_a_file_in_an_existing_folder(run_dir, tmp_path):
    with pytest.raises(report.ReportError, match="is a folder"):
        report.write_report(run_dir, tmp_path)
    with pytest.raises(report.ReportError, match="does not exist"):
        report.write_report(run_dir, tmp_path / "no" / "r.html")


def test_cli_writes_the_report_and_prints_where(run_dir, tmp_path, capsys):
    out = tmp_path / "elsewhere.html"
    assert cli.main(["report", str(run_dir), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"report written to {out}"
    assert out.read_text().startswith("<!DOCTYPE html>")


def test_cli_on_a_folder_that_is_not_a_run_fails_clearly(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "has no metrics.jsonl" in err and "Traceback" not in err


# ---------------------------------------------------------------- in a real browser


def _chromium() -> str:
    found = shutil.which("chromium")
    if found:
        return found
    if os.environ.get("INNERLOOP_REQUIRE_BROWSER"):
        pytest.fail("INNERLOOP_REQUIRE_BROWSER is set but no `chromium` is on PATH (apt-get install chromium)")
    pytest.skip("no `chromium` on PATH (apt-get install chromium; scripts/test.sh installs it)")


def _headless(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    browser = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000"]
    result = subprocess.run([*browser, *args], capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_the_page_renders_in_a_browser_with_every_image_loaded(run_dir, tmp_path):
    page = report.write_report(run_dir)
    dom = _headless(tmp_path, "--dump-dom", page.as_uri()).stdout
    assert "<title>innerloop run report: run</title>" in dom
    assert re.findall(r"<h2>([^<]+)</h2>", dom)[:2] == ["Summary", "Reward and accuracy"]
    # Set by the page's own script on window load: images decoded / images on the page.
    assert 'data-images-loaded="4/4"' in dom


def test_the_page_screenshot_is_not_blank(run_dir, tmp_path):
    from matplotlib.image import imread

    page = report.write_report(run_dir)
    shot = tmp_path / "shot.png"
    _headless(tmp_path, f"--screenshot={shot}", "--window-size=1100,1400", page.as_uri())
    pixels = imread(shot)
    assert pixels.shape[:2] == (1400, 1100)
    # A page of text, tables and plots has many colors; a blank or failed page has one or two.
    distinct = {tuple(p) for p in pixels[::7, ::7].reshape(-1, pixels.shape[2]).round(2).tolist()}
    assert len(distinct) > 50


def test_the_browser_check_tells_a_broken_image_from_a_good_one(run_dir, tmp_path):
    good = re.search(r'<img src="data:[^"]+"[^>]*>', report.write_report(run_dir).read_text()).group(0)
    page = tmp_path / "broken.html"
    broken = '<img src="data:image/png;base64,AAAA" alt="">'  # not a PNG: it cannot decode
    page.write_text(report.render_page("one broken image", [("Good", good), ("Broken", broken)]))
    assert 'data-images-loaded="1/2"' in _headless(tmp_path, "--dump-dom", page.as_uri()).stdout
