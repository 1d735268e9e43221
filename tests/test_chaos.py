"""The chaos soak (scripts/chaos.py): its schedule and checks in milliseconds, and a short soak on the
real stack with every fault kind once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "scripts"))

import chaos_plan  # noqa: E402
from chaos_plan import Fault, KINDS, plan  # noqa: E402


# ---------------------------------------------------------------- the schedule


def test_the_schedule_holds_every_kind_in_a_seeded_mixed_order():
    faults = plan(seed=3, steps=300, per_kind=2, first_step=11, spacing=12)
    assert sorted(f.kind for f in faults) == sorted(KINDS * 2)
    assert plan(seed=3, steps=300, per_kind=2, first_step=11, spacing=12) == faults  # seeded
    assert [f.kind for f in plan(seed=4, steps=300, per_kind=2, first_step=11, spacing=12)] != [f.kind for f in faults]
    steps = [f.step for f in faults]
    assert steps[0] >= 11 and all(b - a >= 12 for a, b in zip(steps, steps[1:]))
    assert steps[-1] + 12 <= 300  # the last one has room to recover


def test_a_pool_change_is_undone_by_the_next_fault_before_anything_else():
    faults = plan(seed=0, steps=100, per_kind=1, first_step=3, spacing=4)
    kinds = [f.kind for f in faults]
    for first, second in chaos_plan.PAIRS.items():
        assert kinds[kinds.index(first) + 1] == second
    assert len(faults) == len(KINDS)


def test_too_few_steps_for_the_faults_is_an_error_saying_how_many():
    with pytest.raises(ValueError, match="give at least 51 steps"):
        plan(seed=0, steps=50, per_kind=1, first_step=3, spacing=4)
    assert len(plan(seed=0, steps=51, per_kind=1, first_step=3, spacing=4)) == 12


# ---------------------------------------------------------------- the checks can fail


def _run(steps=3, questions=2, group=2):
    metrics = [{"step": s, "time": 10.0 * s, "policy_version": s} for s in range(1, steps + 1)]
    ledger = [{"step": s, "questions": [f"q{s}-{i}" for i in range(questions)]} for s in range(1, steps + 1)]
    trajectories = [{"step": r["step"], "question_id": q, "policy_version": r["step"] - 1}
                    for r in ledger for q in r["questions"] for _ in range(group)]
    return metrics, ledger, trajectories


def test_a_clean_run_passes_every_check():
    metrics, ledger, trajectories = _run()
    assert chaos_plan.steps_problems(metrics, 3) == []
    assert chaos_plan.ledger_problems(ledger, 3, [r["questions"] for r in ledger]) == []
    assert chaos_plan.trajectory_problems(trajectories, ledger, 2) == []


def test_a_step_logged_twice_or_missing_or_a_version_going_back_fails():
    metrics, _, _ = _run()
    assert "steps logged more than once: [2]" in chaos_plan.steps_problems(metrics + [metrics[1]], 3)[0]
    assert "never logged: [3]" in chaos_plan.steps_problems(metrics[:2], 3)[0]
    back = [dict(metrics[0]), dict(metrics[1], policy_version=1), metrics[2]]
    assert any("strictly increase" in p for p in chaos_plan.steps_problems(back, 3))


def test_a_question_consumed_twice_or_skipped_fails_the_ledger():
    _, ledger, _ = _run()
    expected = [r["questions"] for r in ledger]
    again = [*ledger[:2], {"step": 3, "questions": ["q1-0", "q3-1"]}]  # step 3 took a question of step 1 again
    assert chaos_plan.ledger_problems(again, 3, expected) == [
        "steps that did not consume the questions of their turn in the stream: [3]"]
    assert any("not 1..3" in p for p in chaos_plan.ledger_problems(ledger[:2], 3, expected))
    assert any("not 1..3" in p for p in chaos_plan.ledger_problems([*ledger, ledger[2]], 3, expected))


def test_a_trajectory_trained_twice_or_by_stale_weights_fails():
    _, ledger, trajectories = _run()
    assert any("other than 2 trajectories" in p
               for p in chaos_plan.trajectory_problems(trajectories + [trajectories[0]], ledger, 2))
    moved = [dict(trajectories[0], step=2), *trajectories[1:]]
    assert any("did not consume" in p for p in chaos_plan.trajectory_problems(moved, ledger, 2))
    stale = [dict(trajectories[-1], policy_version=0), *trajectories[:-1]]
    assert any("sampled at policy version 0" in p for p in chaos_plan.trajectory_problems(stale, ledger, 2))


def test_memory_growth_is_judged_from_each_process_warm_up_and_fails_past_the_bound():
    samples = [{"step": s, "rss_mib": {"learner 7": 100.0 + 10 * s, "worker 8": 50.0 + (150 if s == 11 else 0)}}
               for s in range(0, 12)]
    samples.append({"step": 12, "rss_mib": {"replacement 9": 80.0}})  # too young to judge
    growth = chaos_plan.memory_growth(samples, warmup_steps=2)
    assert growth["learner 7"]["growth_mib"] == 70.0  # medians of steps 2-4 and 9-11
    assert growth["worker 8"]["growth_mib"] == 0.0 and growth["worker 8"]["peak_mib"] == 200.0  # a swing, no leak
    assert "growth_mib" not in growth["replacement 9"]
    assert chaos_plan.memory_problems(growth, 64.0) == ["learner 7 grew +70.0 MiB after its warm-up (bound 64)"]
    assert chaos_plan.memory_problems(growth, 100.0) == []


def test_the_wall_time_lost_is_the_fault_window_less_normal_steps():
    # Steps 1 s apart; a fault after step 4 (at t=4.5) makes step 5 come at t=12 instead of t=5.
    times = {1: 1, 2: 2, 3: 3, 4: 4, 5: 12, 6: 13, 7: 14, 8: 15}
    final = [{"step": s, "time": float(t)} for s, t in times.items()]
    fired = [{"kind": "learner_killed", "time": 4.5}]
    lost = chaos_plan.lost_by_kind(fired, final, final, window=2)
    assert lost["normal_step_s"] == 1.0
    assert lost["kinds"]["learner_killed"] == {"count": 1, "lost_s": [7.0], "mean_s": 7.0, "total_s": 7.0}
    # A rewound run: the superseded first try of step 4 counts as where the fault struck.
    redone = [{"step": 4, "time": 4.0}, *[{"step": s, "time": float(t)} for s, t in times.items() if s != 4]]
    assert chaos_plan.lost_by_kind(fired, redone + [{"step": 4, "time": 11.0}],
                                   [r for r in final if r["step"] != 4] + [{"step": 4, "time": 11.0}],
                                   window=2)["kinds"]["learner_killed"]["lost_s"] == [7.0]


# ---------------------------------------------------------------- the real stack


@pytest.mark.integration
def test_a_short_chaos_soak_with_every_fault_kind_loses_nothing(tmp_path):
    """Every fault kind once in 52 steps of the tiny model on the real stack (Ray's simulated cluster,
    vLLM, DeepSpeed): chaos.py's own checks all pass, each kind fired, and what the run logged says it
    recovered from each (replacements, the learner restart, the skipped step, the scaled pool)."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "chaos.py"), *SHORT, "--out", str(tmp_path)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-4000:]
    report = json.loads((tmp_path / "chaos.json").read_text())
    assert report["passed"] and not report["missed"]
    assert sorted(f["kind"] for f in report["fired"]) == sorted(KINDS)
    events = report["events"]
    assert events.get("rollout_worker_replaced", 0) >= 2  # mid-generation, mid-sync
    assert events.get("learners_restarted", 0) >= 1 and report["skipped_steps"]
    assert events.get("rollout_worker_dropped", 0) >= 1  # the node that left took its worker
    assert events.get("rollout_workers_scaled", 0) >= 3  # the node's worker, scale up, scale down
    assert events.get("learner_ranks_scaled", 0) >= 2  # 1 -> 2 -> 1
    assert report["drivers"] == 2 and report["reward_errors"] >= 1
    assert all(e["lost_s"] for e in report["lost"]["kinds"].values())


SHORT = ["--steps", "52", "--per-kind", "1", "--spacing", "4", "--window", "2", "--checkpoint-every", "2",
         "--questions", "4", "--group", "4", "--max-tokens", "16", "--warmup-steps", "5"]
