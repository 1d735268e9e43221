"""Several weighted rewards: innerloop's kinds beside TRL's built-ins and TRL-signature functions,
None handled as TRL does, a failing part costing only itself, and each part logged per step."""

from __future__ import annotations

import pytest

from innerloop.actors.reward_mix import Component, trl_arguments
from innerloop.actors.rewards import RewardConfigError, build_reward_fn, reward_fn_for
from innerloop.actors.scoring import GuardedScorer
from innerloop.distributed.config import ConfigError
from innerloop.distributed.config_load import load_config
from innerloop.distributed.records import Question, Trajectory
from innerloop.distributed.run.step_record import reward_components

HERE = __name__  # the scoring process imports these functions by path, as a user's would be
Q = Question("q-25", "What is 20 + 5?", "25", columns=(("difficulty", 3),))
RIGHT, WRONG = "20 + 5 = 25. The answer is \\boxed{25}.", "The answer is \\boxed{24}."


def length_over_100(completions, **kwargs):
    return [len(c[0]["content"]) / 100 for c in completions]


def skips_everything(completions, **kwargs):
    return [None for _ in completions]


def raises(completions, **kwargs):
    raise RuntimeError("the judge is down")


def two_values(completions, **kwargs):
    return [1.0, 2.0]


def words(completions, **kwargs):
    return ["good"]


def reads_columns(completions, solution, difficulty, prompts, completion_ids, **kwargs):
    return [float(solution[0]) + difficulty[0] + len(completion_ids[0]) + (prompts[0][-1]["role"] == "user")]


def scaled(factor):
    def reward(completions, **kwargs):
        return [factor for _ in completions]
    return reward


def mix(*components: Component, failure_reward: float = -1.0):
    return build_reward_fn("four_way", functions=components, failure_reward=failure_reward)


def test_a_kind_and_trls_accuracy_reward_add_up_with_their_weights():
    fn = mix(Component("four_way"), Component("trl:accuracy_reward", weight=0.5))
    right, wrong = fn(RIGHT, Q), fn(WRONG, Q)
    assert right.reward == 1.5 and right.components == (("four_way", 1.0, ""), ("accuracy_reward", 1.0, ""))
    assert wrong.reward == 0.0 and not wrong.correct and wrong.formatted  # four_way 0, accuracy 0
    assert right.correct and right.formatted  # innerloop's verifier decides, whatever the mix


def test_a_none_leaves_the_completion_out_of_that_part_only():
    result = mix(Component("four_way"), Component(f"{HERE}:skips_everything", weight=5.0))(RIGHT, Q)
    assert result.reward == 1.0 and result.components[1] == ("skips_everything", None, "") and not result.error


@pytest.mark.parametrize("bad, message", [("raises", "RuntimeError: the judge is down"),
                                          ("two_values", "a TRL reward returns a list with one value"),
                                          ("words", "rewards must be finite numbers or None")])
def test_a_failing_part_takes_the_failure_reward_and_the_others_still_count(bad, message):
    result = mix(Component("four_way"), Component(f"{HERE}:{bad}", weight=2.0), failure_reward=-1.0)(RIGHT, Q)
    name, value, error = result.components[1]
    assert (name, value) == (bad, -1.0) and message in error and message in result.error
    assert result.reward == 1.0 + 2.0 * -1.0


def test_a_factory_is_made_with_its_args_and_reads_the_completion_ids():
    fn = mix(Component("trl:get_soft_overlong_punishment",
                       args=(("max_completion_len", 10), ("soft_punish_cache", 5))))
    assert fn(RIGHT, Q, tuple(range(8))).reward == pytest.approx(-0.6)  # 3 tokens into the 5-token cache
    assert mix(Component(f"{HERE}:scaled", args=(("factor", 0.25),)))(RIGHT, Q).reward == 0.25


def test_trl_style_functions_get_the_rows_columns_prompts_and_ids():
    assert mix(Component(f"{HERE}:reads_columns"))(RIGHT, Q, (7, 8)).reward == 25 + 3 + 2 + 1
    chat = Question("c", "hi", "4", messages=(("system", "Be brief."), ("user", "2 + 2?")), columns=(("solution", "4"),))
    arguments = trl_arguments("\\boxed{4}", chat, (1,))
    assert arguments["prompts"] == [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2 + 2?"}]]
    assert arguments["solution"] == ["4"] and arguments["answer"] == ["4"]
    assert arguments["completions"] == [[{"role": "assistant", "content": "\\boxed{4}"}]]


@pytest.mark.parametrize("component, message", [
    (Component("trl:no_such_reward"), r"TRL has no reward 'trl:no_such_reward'; its rewards: .*accuracy_reward"),
    (Component("no_module_here:fn"), r"module 'no_module_here' could not be imported"),
    (Component(f"{HERE}:missing"), r"has no attribute 'missing'"),
    (Component("four_way", args=(("x", 1),)), r"one of innerloop's reward kinds, which take no args"),
    (Component(f"{HERE}:scaled", args=(("wrong", 1),)), r"could not be made with args \{'wrong': 1\}"),
    (Component("fourway"), r"must be a reward kind, 'trl:NAME' or 'package.module:function'"),
])
def test_a_bad_entry_is_refused_at_build_time_naming_it(component, message):
    with pytest.raises(RewardConfigError, match=rf"reward.functions: .*{message}"):
        mix(component)


def test_the_config_names_functions_and_weights_and_checks_they_match():
    cfg = load_config(None, ["reward.functions=[four_way, trl:accuracy_reward]", "reward.weights=[1.0, 0.5]"])
    assert [(f.name, f.weight) for f in cfg.reward.weighted] == [("four_way", 1.0), ("trl:accuracy_reward", 0.5)]
    assert reward_fn_for(cfg.reward)(RIGHT, Q).reward == 1.5
    with pytest.raises(ConfigError, match=r"reward.weights has 1 values for 2 reward.functions"):
        load_config(None, ["reward.functions=[four_way, format]", "reward.weights=[1.0]"])
    with pytest.raises(ConfigError, match=r"reward.functions replaces reward.kind"):
        load_config(None, ["reward.functions=[four_way]", "reward.kind=custom", "reward.custom=x:y"])


def test_the_mix_runs_in_the_scoring_process_with_the_completion_ids():
    fn = mix(Component("four_way"), Component("trl:get_soft_overlong_punishment",
                                              args=(("max_completion_len", 10), ("soft_punish_cache", 5))))
    with GuardedScorer(fn, timeout_s=30.0, failure_reward=-1.0) as scorer:
        results = scorer.score([(RIGHT, Q, tuple(range(8))), (WRONG, Q, (1,))])
    assert [r.reward for r in results] == [pytest.approx(0.4), 0.0]


def _trajectory(components) -> Trajectory:
    return Trajectory("q", (1,), (2,), (0.0,), "stop", "", 0.0, False, False, 0, reward_components=components)


def test_each_part_is_logged_per_step_as_its_mean_and_its_failures():
    logged = reward_components([_trajectory((("a", 1.0, ""), ("b", None, ""))),
                                _trajectory((("a", 0.0, ""), ("b", -1.0, "b raised")))])
    assert logged == {"reward/a": 0.5, "reward/a_failed": 0, "reward/b": -1.0, "reward/b_failed": 1}
    assert reward_components([_trajectory(())]) == {}
