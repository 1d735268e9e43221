"""A run's records call for a warning when its groups carry no signal, and a stop when
train.best_metric names nothing a step logs."""

from __future__ import annotations

import pytest

from innerloop.distributed.config_load import load_config
from innerloop.distributed.errors import RunStopped
from innerloop.distributed.run.health import StepWatch


def grpo(flat: float, **more) -> dict:
    return {"stage": "grpo", "reward_mean": 0.0, "zero_variance_groups": flat, "truncated": 1.0, **more}


def test_groups_that_stay_flat_are_warned_about_once_per_streak(caplog):
    watch = StepWatch(load_config())
    for flat in (1.0, 1.0, 0.5, 1.0, 1.0):
        watch.after_step(grpo(flat))
    assert "advantages are 0" not in caplog.text  # never three in a row
    watch.after_step(grpo(0.95))
    assert caplog.text.count("advantages are 0") == 1 and "truncated 100% this step" in caplog.text
    watch.after_step(grpo(1.0))
    assert caplog.text.count("advantages are 0") == 1


def test_a_best_metric_no_step_logs_stops_at_the_first_grpo_step():
    watch = StepWatch(load_config(None, ["train.best_metric=reward_meen"]))
    watch.after_step({"stage": "sft", "loss": 1.0})  # SFT steps log other names: not judged
    with pytest.raises(RunStopped, match=r"best_metric='reward_meen' .* reward_mean, truncated"):
        watch.after_step(grpo(0.0))


@pytest.mark.parametrize("name", ["reward_mean", "eval_accuracy", "probe_correct_slope"])
def test_logged_and_eval_metrics_are_accepted(name):
    StepWatch(load_config(None, [f"train.best_metric={name}"])).after_step(grpo(0.0))
