"""scripts/probe_pool.py: the probe's comparisons over several runs' probe.jsonl, questions kept apart by run and probe."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from innerloop.distributed.lens import probe_stats

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "scripts"))

import probe_pool  # noqa: E402


def _write_run(run_dir: Path, slopes: dict[str, list[float]]) -> None:
    (run_dir / "probe").mkdir(parents=True)
    lines = []
    for group, values in slopes.items():
        for i, slope in enumerate(values):
            lines.append({"label": "step-4", "question_id": "q1", "group": group, "summary": {"slope": slope},
                          "cut_summary": {"slope": slope / 2} if i else None})
    (run_dir / "probe" / "probe.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


def test_pooled_comparisons_pair_within_each_runs_question(tmp_path):
    _write_run(tmp_path / "seed-0", {"correct": [-2.0, -2.0], "incorrect": [0.0, 0.0]})
    _write_run(tmp_path / "seed-1", {"correct": [-1.0, -1.0], "incorrect": [1.0, 1.0]})
    found = probe_stats_of(tmp_path)
    uncut = next(p for p in found["paired"] if p["b"] == "incorrect" and p["curve"] == "uncut")
    assert uncut["questions"] == 2  # the same question id in two runs is two pairing units
    assert uncut["difference"] == -2.0 and uncut["trajectories_a"] == 4
    cut = next(s for s in found["slopes"] if s["group"] == "correct" and s["curve"] == "cut")
    assert cut["trajectories"] == 2 and cut["mean"] == -0.75  # a trajectory without a cut curve is left out


def probe_stats_of(root: Path) -> dict:
    return probe_stats.comparisons(probe_pool.read_records([root / "seed-0", root / "seed-1"]))


def test_a_run_without_a_probe_file_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="was the run probed"):
        probe_pool.read_records([tmp_path])
