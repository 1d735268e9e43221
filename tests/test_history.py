"""Per-question history: definitions on hand-written trajectories, JSON, the heatmap, the CLI, checkpoints."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest

from innerloop.distributed import cli

from innerloop.distributed.lens import history

from innerloop.distributed.state import checkpoints
from innerloop.distributed.state.checkpoints import DriverState
from innerloop.distributed.lens.history import HistoryError, Visit
from innerloop.distributed.records import Trajectory
from innerloop.distributed.state.tracking import RunDir


def group(step: int, question_id: str, rewards, tokens=(10,), version: int | None = None) -> list[dict]:
    """One visit's trajectories.jsonl records: correct when the reward is positive."""
    tokens = list(tokens) * len(rewards) if len(tokens) == 1 else list(tokens)
    return [{"step": step, "question_id": question_id, "reward": float(r), "correct": r > 0, "formatted": True,
             "completion_tokens": n, "finish_reason": "stop",
             "policy_version": step - 1 if version is None else version, "staleness": 0}
            for r, n in zip(rewards, tokens)]


def visits(*groups: list[dict]) -> list[dict]:
    return [record for g in groups for record in g]


# ---------------------------------------------------------------- definitions


def test_first_solved_step_is_the_first_visit_with_any_correct_trajectory():
    built = history.build_history(visits(group(1, "q", [0, 0, 0, 0]), group(4, "q", [0, 0, 1, 0]),
                                          group(7, "q", [1, 1, 1, 0])))
    q = built["q"]
    assert q.steps == (1, 4, 7) and q.attempts == 12
    assert q.pass_rates == {1: 0.0, 4: 0.25, 7: 0.75}
    assert q.first_solved_step == 4  # one correct of four is enough: pass@G > 0
    assert (q.status, q.forgetting_events) == ("solved", ())


def test_each_drop_from_solved_to_unsolved_is_one_forgetting_event():
    built = history.build_history(visits(
        group(2, "f", [1, 0]), group(3, "f", [1, 1]), group(5, "f", [0, 0]), group(6, "f", [0, 0]),
        group(8, "f", [0, 1]), group(9, "f", [0, 0]),
        group(1, "back", [1, 0]), group(4, "back", [0, 0]), group(7, "back", [1, 0])))
    assert built["f"].forgetting_events == ((3, 5), (8, 9))
    assert built["f"].status == "forgotten" and built["f"].first_solved_step == 2
    # forgotten once, then solved again at its last visit: solved, with the event kept
    assert built["back"].forgetting_events == ((1, 4),) and built["back"].status == "solved"


def test_never_solved():
    q = history.build_history(visits(group(1, "n", [0, -1]), group(2, "n", [-1, -1])))["n"]
    assert q.status == "never_solved" and q.first_solved_step is None and q.forgetting_events == ()
    assert q.pass_rates == {1: 0.0, 2: 0.0}


def test_zero_variance_groups_count_visits_whose_rewards_are_all_equal():
    q = history.build_history(visits(
        group(1, "z", [1, 1, 1]),      # all right: zero variance, solved
        group(2, "z", [0, 0, 0]),      # all wrong alike: zero variance
        group(3, "z", [0, -1, 0]),     # all wrong, but rewards differ (format): a learning signal
        group(4, "z", [1, 0, 0])))["z"]
    assert [v.zero_variance for v in q.visits] == [True, True, False, False]
    assert q.zero_variance_groups == 2


def test_mean_completion_tokens_and_policy_versions():
    q = history.build_history(visits(group(3, "m", [1, 0], tokens=(10, 30), version=1),
                                     group(5, "m", [0, 0], tokens=(50, 70), version=4)))["m"]
    assert q.mean_completion_tokens == pytest.approx(40.0)
    assert q.policy_versions == (1, 4)
    assert [v.completion_tokens for v in q.visits] == [40, 120]


def test_records_in_any_order_and_a_question_taken_twice_in_one_step():
    records = visits(group(5, "b", [0, 1]), group(2, "a", [1, 1]), group(2, "b", [0, 0]), group(2, "b", [1, 0]))
    built = history.build_history(records)
    assert list(built) == ["a", "b"]  # by first visit, then id
    assert built["b"].visits == (Visit(step=2, trajectories=4, correct=1, zero_variance=False,
                                       completion_tokens=40, policy_versions=(1,)),
                                 Visit(step=5, trajectories=2, correct=1, zero_variance=False,
                                       completion_tokens=20, policy_versions=(4,)))


def test_a_record_without_a_needed_field_is_named():
    records = group(1, "q", [1, 0])
    del records[1]["correct"]
    with pytest.raises(HistoryError, match="trajectory record 2 lacks correct"):
        history.build_history(records)


def test_summary_counts_each_status():
    built = history.build_history(visits(group(1, "s", [1, 0]), group(1, "n", [0, 0]), group(1, "f", [1, 1]),
                                         group(2, "f", [0, 0]), group(2, "s2", [1, 1])))
    assert history.summarize(built) == history.HistorySummary(
        questions=4, solved=2, forgotten=1, never_solved=1, visits=5, zero_variance_groups=4, trajectories=10,
        last_step=2)


# ---------------------------------------------------------------- storing


def test_json_round_trip_keeps_every_visit_and_writes_the_derived_figures(tmp_path):
    built = history.build_history(visits(group(1, "a", [1, 0], tokens=(3, 9)), group(2, "a", [0, 0]),
                                         group(2, "b", [0, 0], version=7)))
    path = tmp_path / "h.json"
    history.save(built, path)
    assert history.load(path) == built
    written = {q["question_id"]: q for q in json.loads(path.read_text())["questions"]}
    assert written["a"]["status"] == "forgotten" and written["a"]["forgetting_events"] == [[1, 2]]
    assert written["b"]["policy_versions"] == [7] and written["b"]["first_solved_step"] is None


def test_loading_something_else_says_how_to_rebuild(tmp_path):
    path = tmp_path / "h.json"
    path.write_text('{"format": 99, "questions": []}')
    with pytest.raises(HistoryError, match="format 99 is not 1"):
        history.load(path)
    path.write_text('{"format": 1, "questions": [{"question_id": "a", "vis')  # cut short
    with pytest.raises(HistoryError, match="not a readable question history.*innerloop questions"):
        history.load(path)


# ---------------------------------------------------------------- the heatmap


def many_questions(count: int) -> dict[str, history.QuestionHistory]:
    """Question i is visited at steps 1..i+1 and solved from step i+1 on (q000 is solved at its only visit)."""
    records = [r for i in range(count) for step in range(1, i + 2)
               for r in group(step, f"q{i:03d}", [1 if step == i + 1 else 0, 0])]
    return history.build_history(records)


def test_heatmap_rows_cap_to_the_most_visited_and_say_so():
    built = many_questions(5)
    rows, title = history.heatmap_rows(built, max_rows=3)
    assert [h.question_id for h in rows] == ["q002", "q003", "q004"]  # most visited; ordered by first solved
    assert title == "pass rate per question and step: the 3 most visited of 5 questions"
    rows, title = history.heatmap_rows(built, max_rows=10)
    assert len(rows) == 5 and title.endswith("all 5 questions")


def test_pass_rate_grid_is_blank_where_a_question_was_not_visited():
    built = history.build_history(visits(group(1, "a", [1, 0]), group(3, "a", [1, 1]), group(2, "b", [0, 0])))
    grid = history.pass_rate_grid(list(built.values()))
    assert grid.shape == (2, 3)
    assert grid[0].tolist()[0] == 0.5 and grid[0, 2] == 1.0 and grid[1, 1] == 0.0
    assert [bool(x) for x in (grid != grid)[0]] == [False, True, False]  # NaN: not visited at step 2
    assert bool(grid[1, 0] != grid[1, 0]) and bool(grid[1, 2] != grid[1, 2])


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", "not a PNG file"
    return struct.unpack(">II", data[16:24])


def test_heatmap_is_a_png_and_grows_with_its_rows(tmp_path):
    built = many_questions(40)
    history.write_heatmap(built, tmp_path / "capped.png", max_rows=5)
    history.write_heatmap(built, tmp_path / "all.png", max_rows=40)
    capped, full = png_size(tmp_path / "capped.png"), png_size(tmp_path / "all.png")
    assert capped[0] > 0 and capped[1] > 0
    assert full[1] > capped[1]  # 40 rows draw taller than 5


def test_heatmap_of_nothing_is_an_error(tmp_path):
    with pytest.raises(HistoryError, match="empty"):
        history.write_heatmap({}, tmp_path / "h.png")


# ---------------------------------------------------------------- the CLI


def write_run(run_dir: Path) -> None:
    """A run directory written by the driver's own writer: q-solved, q-forgotten, q-never."""
    run = RunDir(run_dir)

    def trajectories(question_id: str, rewards, version: int) -> list[Trajectory]:
        return [Trajectory(question_id=question_id, prompt_ids=(1,), completion_ids=(2,) * 4, logprobs=(-0.1,) * 4,
                           finish_reason="stop", text="", reward=r, correct=r > 0, formatted=True,
                           policy_version=version) for r in rewards]

    run.record_trajectories(1, 0, trajectories("q-solved", [0.0, 0.0], 0) + trajectories("q-forgotten", [1.0, 0.0], 0))
    run.record_trajectories(2, 1, trajectories("q-never", [0.0, 0.0], 1) + trajectories("q-forgotten", [0.0, 0.0], 1))
    run.record_trajectories(3, 2, trajectories("q-solved", [1.0, 1.0], 2) + trajectories("q-never", [0.0, 0.0], 2))


def test_cli_summarizes_lists_and_writes_json_and_heatmap(tmp_path, capsys):
    write_run(tmp_path / "run")
    out_json, out_png = tmp_path / "h.json", tmp_path / "h.png"
    code = cli.main(["questions", str(tmp_path / "run"), "--forgotten", "--never-solved",
                     "--json", str(out_json), "--heatmap", str(out_png)])
    out = capsys.readouterr().out
    assert code == 0
    assert "3 questions, 12 trajectories trained on, steps 1-3" in out
    assert "solved             1" in out and "forgotten          1" in out and "never solved       1" in out
    assert "zero-variance groups: 5 of 6 visits" in out
    assert "forgotten (1):\nq-forgotten  visits 2  first solved 1  forgot 1->2  pass rate 1:0.50 2:0.00" in out
    assert "never solved (1):\nq-never  visits 2  first solved -" in out
    assert "solved (1):\nq-solved" not in out  # --solved was not asked for
    assert set(history.load(out_json)) == {"q-solved", "q-forgotten", "q-never"}
    assert png_size(out_png)[0] > 0


def test_cli_without_trajectories_names_the_command_that_writes_them(tmp_path, capsys):
    missing = tmp_path / "not-a-run"
    assert cli.main(["questions", str(missing)]) == 2
    err = capsys.readouterr().err
    assert "has no trajectories.jsonl" in err and "innerloop train" in err and "Traceback" not in err
    assert not missing.exists()  # asking must not create the folder


# ---------------------------------------------------------------- stored in each checkpoint


class FakeFleet:
    def save_learners(self, folder: Path, tag: str) -> None:
        (folder / tag).mkdir(parents=True)
        (folder / tag / "weights.pt").write_text("weights")

    def export(self, folder: Path) -> None:
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")


def test_checkpoint_stores_the_history_under_its_manifest(tmp_path, capsys):
    records = visits(group(1, "a", [1, 0]), group(2, "a", [0, 0]), group(2, "b", [1, 1]))
    state = DriverState(step=2, policy_version=2, question_position=4, config_fingerprint="abc")
    saved = checkpoints.save(tmp_path, state, FakeFleet(), keep=2, extra_files=history.checkpoint_files(records))
    stored = saved / history.CHECKPOINT_FILE
    described = json.loads((saved / "manifest.json").read_text())["files"][history.CHECKPOINT_FILE]
    assert described == {"bytes": stored.stat().st_size, "sha256": hashlib.sha256(stored.read_bytes()).hexdigest()}
    assert checkpoints.verify(saved) == []
    assert history.history_of_run(saved) == history.build_history(records)
    assert cli.main(["questions", str(saved)]) == 0  # the CLI reads a checkpoint folder too
    assert "2 questions, 6 trajectories trained on, steps 1-2" in capsys.readouterr().out
    stored.write_text(stored.read_text().replace('"correct": 1', '"correct": 2'))
    assert checkpoints.verify(saved) == [f"{history.CHECKPOINT_FILE}: checksum mismatch"]


@pytest.mark.parametrize("name", ["state.json", "model/extra.json", "../outside.json", "/abs.json", ""])
def test_checkpoint_extra_files_may_not_clobber_or_escape(tmp_path, name):
    state = DriverState(step=1, policy_version=1, question_position=1, config_fingerprint="abc")
    with pytest.raises(ValueError, match="extra checkpoint file"):
        checkpoints.save(tmp_path / "ckpt", state, FakeFleet(), keep=2, extra_files={name: b"{}"})
    assert not (tmp_path / "ckpt").exists()
