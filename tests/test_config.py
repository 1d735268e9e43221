"""The typed config: every shipped file loads, and every mistake fails with the key named and the fix said."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from innerloop.distributed.config import Config, ConfigError

from innerloop.distributed.config_load import _split_override, load_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
CONFIG_FILES = sorted([*CONFIGS.glob("*.yaml"), *CONFIGS.glob("*.yml")])  # globbed at collection time


def write(tmp_path: Path, text: str, name: str = "exp.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(*overrides: str, path: Path | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, list(overrides))
    return str(info.value)


# ---------------------------------------------------------------- what ships


def test_embedded_defaults_validate():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert cfg == Config()  # no file, no overrides: exactly the embedded defaults
    # The defaults must satisfy the cross-field check they are validated against.
    samples = cfg.rollout.questions_per_step * cfg.rollout.group_size
    assert samples % (cfg.learner.ranks * cfg.learner.micro_batch_size) == 0


def test_empty_file_means_defaults(tmp_path):
    assert load_config(write(tmp_path, "# nothing set\n")) == Config()


@pytest.mark.parametrize("path", CONFIG_FILES, ids=[p.name for p in CONFIG_FILES])
def test_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    # Every key the file sets reaches the resolved config (none is silently dropped or renamed).
    raw = yaml.safe_load(path.read_text()) or {}
    resolved = cfg.model_dump(mode="json")
    for section, values in raw.items():
        for key, value in (values or {}).items():
            got = resolved[section][key]
            want = list(value) if isinstance(value, tuple) else value
            assert got == want or (isinstance(got, float) and got == pytest.approx(float(want))), \
                f"{path.name}: {section}.{key}"


def test_file_values_then_overrides_win(tmp_path):
    path = write(tmp_path, "rollout:\n  temperature: 0.5\n  group_size: 4\n")
    cfg = load_config(path, ["rollout.temperature=0.9"])
    assert cfg.rollout.temperature == 0.9  # override beats file
    assert cfg.rollout.group_size == 4  # file beats default
    assert cfg.rollout.top_p == 1.0  # default where nothing is set


# ---------------------------------------------------------------- mistakes name the key and the fix


def test_unknown_key_names_dotted_key_and_suggests_close_match():
    message = error_of("rollout.temprature=0.8")
    assert "rollout.temprature" in message
    assert "did you mean 'rollout.temperature'" in message


def test_unknown_key_in_file_is_an_error_too(tmp_path):
    message = error_of(path=write(tmp_path, "learner:\n  micro_batch_sise: 8\n"))
    assert "learner.micro_batch_sise" in message and "learner.micro_batch_size" in message
    assert str(tmp_path / "exp.yaml") in message  # says which file


def test_unknown_section_lists_valid_sections():
    message = error_of("optimizer.lr=0.1")
    assert "'optimizer'" in message
    for section in Config.model_fields:
        assert section in message


def test_misspelled_section_suggests_the_section():
    assert "did you mean 'rollout'" in error_of("rolout.temperature=1")


def test_wrong_type_names_the_key():
    message = error_of("rollout.group_size=many")
    assert "rollout.group_size" in message and "'many'" in message


def test_wrong_type_in_file_names_the_key(tmp_path):
    message = error_of(path=write(tmp_path, "learner:\n  gradient_checkpointing: sometimes\n"))
    assert "learner.gradient_checkpointing" in message


def test_out_of_range_value_names_the_key():
    assert "rollout.top_p" in error_of("rollout.top_p=1.5")


@pytest.mark.parametrize("bad", ["rollout.temperature", "=0.8", " =1"])
def test_override_without_key_or_equals_fails_clearly(bad):
    message = error_of(bad)
    assert repr(bad) in message and "section.key=value" in message


def test_override_into_a_value_fails_clearly():
    message = error_of("model.name=foo", "model.name.x=1")
    assert "model.name.x" in message and "not a section" in message


def test_overrides_parse_types_like_yaml():
    assert _split_override("rollout.temperature=0.8") == ("rollout.temperature", 0.8)
    assert _split_override("learner.gradient_checkpointing=true") == ("learner.gradient_checkpointing", True)
    assert _split_override("rollout.stop=[a, b]") == ("rollout.stop", ["a", "b"])
    assert _split_override("tasks.path=null") == ("tasks.path", None)
    assert _split_override(" train.steps = 3") == ("train.steps", 3)
    cfg = load_config(None, ["rollout.temperature=0.8", "learner.gradient_checkpointing=false",
                             "rollout.stop=[a, b]", "train.steps=3"])
    assert cfg.rollout.temperature == 0.8 and isinstance(cfg.rollout.temperature, float)
    assert cfg.learner.gradient_checkpointing is False
    assert cfg.rollout.stop == ["a", "b"]
    assert cfg.train.steps == 3


def test_override_value_may_contain_equals():
    cfg = load_config(None, ["reward.answer_pattern=x=(\\d+)"])
    assert cfg.reward.answer_pattern == "x=(\\d+)"


def test_override_that_is_not_yaml_is_kept_as_a_string():
    assert load_config(None, ["reward.answer_pattern=[0-9]+"]).reward.answer_pattern == "[0-9]+"
    assert load_config(None, ["tasks.prompt_template=Q: {question}"]).tasks.prompt_template == "Q: {question}"


def test_batch_must_divide_into_ranks_times_micro_batch():
    message = error_of("rollout.questions_per_step=3", "rollout.group_size=5",
                       "learner.ranks=2", "learner.micro_batch_size=4")
    assert "= 15 samples" in message and "= 8" in message
    assert "learner.micro_batch_size" in message and "rollout.questions_per_step" in message


def test_dataset_source_needs_a_path():
    message = error_of("tasks.source=dataset")
    assert "tasks.path" in message
    assert load_config(None, ["tasks.source=dataset", "tasks.path=data.jsonl"]).tasks.path == "data.jsonl"


def test_custom_reward_needs_a_function_path():
    message = error_of("reward.kind=custom")
    assert "reward.custom" in message
    cfg = load_config(None, ["reward.kind=custom", "reward.custom=pkg.mod:fn"])
    assert cfg.reward.custom == "pkg.mod:fn"


def test_prompt_template_needs_the_question_placeholder():
    assert "{question}" in error_of("tasks.prompt_template=hello")


def test_missing_file_is_a_config_error(tmp_path):
    message = error_of(path=tmp_path / "nope.yaml")
    assert "nope.yaml" in message and "does not exist" in message


@pytest.mark.parametrize("text", ["- rollout\n- learner\n", "just a string\n", "3\n"])
def test_non_mapping_yaml_is_a_config_error(tmp_path, text):
    assert "mapping" in error_of(path=write(tmp_path, text))


def test_invalid_yaml_is_a_config_error(tmp_path):
    assert "not valid YAML" in error_of(path=write(tmp_path, "rollout: [unclosed\n"))


def test_all_errors_are_reported_at_once():
    message = error_of("rollout.temprature=1", "learner.lr=-1")
    assert "rollout.temprature" in message and "learner.lr" in message


# ---------------------------------------------------------------- fingerprint


def test_fingerprint_stable_for_equal_configs(tmp_path):
    a = load_config()
    default = Config().rollout.temperature
    b = load_config(write(tmp_path, f"rollout:\n  temperature: {default}\n"))  # restates a default
    assert a.fingerprint() == b.fingerprint() == Config().fingerprint()
    assert len(a.fingerprint()) == 12


def test_fingerprint_changes_with_any_value():
    base = load_config().fingerprint()
    changed = {load_config(None, [o]).fingerprint()
               for o in ["rollout.temperature=0.9", "learner.lr=3e-5", "tasks.seed=1", "algorithm.kl_coef=0.01"]}
    assert base not in changed and len(changed) == 4


def test_demo_file_is_exactly_the_embedded_defaults():
    """configs/demo.yaml is the configuration reference: it must not drift from the code."""
    from pathlib import Path

    demo = load_config(Path(__file__).parent.parent / "configs" / "demo.yaml")
    assert demo.model_dump() == Config().model_dump()
