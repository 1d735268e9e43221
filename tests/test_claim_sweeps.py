"""The sweep files for the paper's claims (configs/sweeps/): each validates cell by cell, runs at least
3 seeds, says its time, and sets up what its claim needs."""

from __future__ import annotations

from pathlib import Path

import pytest

from innerloop.distributed.run import sweep

SWEEPS = Path(__file__).resolve().parent.parent / "configs" / "sweeps"
CLAIMS = ("update-subset.yaml", "sft-cold-start.yaml", "probe-controls.yaml", "sft-k.yaml")
DEMO_TASK = ("probe-controls.yaml", "sft-k.yaml")  # they need correct samples: the demo task (their files say why)


def _configs(name: str):
    plan = sweep.read_sweep(SWEEPS / name)
    sweep.validate(plan)
    return plan, {cell.name: sweep.cell_config(plan, cell, plan.seeds[0]) for cell in plan.cells}


@pytest.mark.parametrize("name", CLAIMS)
def test_a_claim_sweep_validates_runs_three_seeds_on_the_harder_task_and_says_its_time(name):
    plan, configs = _configs(name)
    assert len(plan.seeds) >= 3
    text = (SWEEPS / name).read_text()
    assert "Time on the 2-core CPU machine" in text and "TIME_" not in text and "TASK_" not in text
    for cfg in configs.values():
        assert cfg.model.dtype == "float32"
        if name not in DEMO_TASK:
            assert (cfg.tasks.kind, cfg.tasks.difficulty) != ("arithmetic", 1)  # the harder task: docs/evaluation.md


def test_update_subset_sweeps_m_of_a_group_of_eight():
    _, configs = _configs("update-subset.yaml")
    assert sorted(c.algorithm.update_subset for c in configs.values()) == [1, 2, 4, 8]
    assert {c.rollout.group_size for c in configs.values()} == {8}


def test_sft_cold_start_is_matched_in_updates_and_samples_per_update():
    _, configs = _configs("sft-cold-start.yaml")
    grpo, sft = configs["grpo"], configs["sft-then-grpo"]
    assert grpo.total_steps == sft.total_steps and grpo.sft.steps == 0 and sft.sft.steps > 0
    grpo_batch = grpo.rollout.questions_per_step * grpo.rollout.group_size
    assert sft.sft.questions_per_step * sft.sft.rows_per_question == grpo_batch
    assert grpo.eval.sampled.in_training == sft.eval.sampled.in_training == "after"


def test_the_probe_sweep_probes_whole_groups_with_controls():
    _, configs = _configs("probe-controls.yaml")
    [cfg] = configs.values()
    assert cfg.probe.every_steps and cfg.probe.other_question > 0
    assert cfg.probe.questions == cfg.rollout.questions_per_step and cfg.probe.samples == cfg.rollout.group_size
    assert cfg.eval.sampled.in_training == "after" and cfg.sft.steps > 0
    grpo_steps = range(cfg.sft.steps, cfg.total_steps)
    assert sum(step % cfg.probe.every_steps == 0 for step in grpo_steps) >= 2  # probes at two GRPO steps


def test_the_sft_k_sweep_changes_only_the_diversity():
    _, configs = _configs("sft-k.yaml")
    assert sorted(c.sft.distinct for c in configs.values()) == [1, 4]
    assert {c.sft.rows_per_question for c in configs.values()} == {4}  # the same R rows: the same volume
    assert {c.sft.source for c in configs.values()} == {"teacher"}  # the generator writes one solution a question
    assert len({(c.sft.steps, c.sft.questions_per_step, c.train.steps) for c in configs.values()}) == 1
