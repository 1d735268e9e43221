"""Checkpoints: atomic writes, manifest and checksums, pruning (last N + best), damage and disk-full handling."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging
from pathlib import Path

import pytest

from innerloop.distributed.state import checkpoints
from innerloop.distributed.state.checkpoints import CheckpointError, DriverState


class FakeFleet:
    """Writes a few small files where the learners would; `full_after` files in, the disk is full."""

    def __init__(self, full_after: int | None = None):
        self.full_after = full_after
        self.written = 0
        self.loaded = None

    def _write(self, path: Path, text: str) -> None:
        if self.full_after is not None and self.written >= self.full_after:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        self.written += 1

    def save_learners(self, folder: Path, tag: str) -> None:
        self._write(folder / tag / "mp_rank_00_model_states.pt", "weights" * 100)
        self._write(folder / tag / "optim_states.pt", "moments" * 100)
        self._write(folder / "latest", tag)

    def export(self, folder: Path) -> None:
        self._write(folder / "config.json", "{}")
        self._write(folder / "model.safetensors", "tensors" * 100)

    def load_learners(self, folder: Path, tag: str, saved_ranks: int | None = None) -> None:
        self.loaded = (folder, tag)


def state_at(step: int, metric: float | None = None) -> DriverState:
    return DriverState(step=step, policy_version=step, question_position=16 * step, config_fingerprint="abc123",
                       rng={"python": [3, [1, 2, 3], None], "torch": [7, 8]}, metric=metric,
                       extra={"watchdog": {"update": [1.5, 2.0]}})


def steps_in(root: Path) -> list[int]:
    return [c.step for c in checkpoints.list_checkpoints(root)]


def test_round_trip_restores_every_field_and_the_learners(tmp_path):
    state = state_at(10, metric=0.5)
    saved = checkpoints.save(tmp_path, state, FakeFleet(), keep=2)
    assert saved == tmp_path / "step-000010"
    assert checkpoints.latest(tmp_path) == checkpoints.latest_good(tmp_path) == saved
    fleet = FakeFleet()
    assert checkpoints.load(saved, fleet) == state
    assert fleet.loaded == (saved / "deepspeed", "state")
    assert checkpoints.saved_model(tmp_path, 10) == saved / "model"
    assert checkpoints.saved_model(tmp_path, 20) is None
    assert checkpoints.model_folder(saved) == saved / "model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000010"]  # no partial left behind


def test_manifest_records_the_run_and_every_file_checksum(tmp_path):
    saved = checkpoints.save(tmp_path, state_at(3, metric=0.25), FakeFleet(), keep=2, best_mode="min")
    manifest = json.loads((saved / "manifest.json").read_text())
    assert manifest["format"] == 1
    assert (manifest["step"], manifest["policy_version"], manifest["config_fingerprint"]) == (3, 3, "abc123")
    assert manifest["metric"] == 0.25 and manifest["best_mode"] == "min"
    assert manifest["created"].startswith("20")
    assert set(manifest["packages"]) == {"innerloop", "torch", "deepspeed", "vllm", "ray", "transformers"}
    assert manifest["packages"]["torch"]  # installed here, so a version string
    on_disk = sorted(p.relative_to(saved).as_posix() for p in saved.rglob("*") if p.is_file())
    assert sorted(manifest["files"]) == [n for n in on_disk if n != "manifest.json"]
    assert "state.json" in manifest["files"] and "deepspeed/state/optim_states.pt" in manifest["files"]
    for name, described in manifest["files"].items():
        data = (saved / name).read_bytes()
        assert described == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def test_verify_catches_a_flipped_byte_and_a_missing_file(tmp_path):
    saved = checkpoints.save(tmp_path, state_at(1), FakeFleet(), keep=2)
    assert checkpoints.verify(saved) == []
    weights = saved / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[5] ^= 0x01
    weights.write_bytes(bytes(data))
    (saved / "deepspeed" / "latest").unlink()
    assert checkpoints.verify(saved) == ["deepspeed/latest: missing", "model/model.safetensors: checksum mismatch"]
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        checkpoints.load(saved, FakeFleet())


def test_verify_catches_a_truncated_file(tmp_path):
    saved = checkpoints.save(tmp_path, state_at(1), FakeFleet(), keep=2)
    (saved / "model" / "config.json").write_text("")
    assert checkpoints.verify(saved) == ["model/config.json: 0 bytes, expected 2"]


def test_latest_good_skips_a_damaged_newest_with_a_warning(tmp_path, caplog):
    good = checkpoints.save(tmp_path, state_at(1), FakeFleet(), keep=3)
    damaged = checkpoints.save(tmp_path, state_at(2), FakeFleet(), keep=3)
    (damaged / "deepspeed" / "state" / "optim_states.pt").write_text("moments" * 99 + "xxxxxxx")
    assert checkpoints.latest(tmp_path) == damaged  # complete, but not good
    with caplog.at_level(logging.WARNING, logger=checkpoints.__name__):
        assert checkpoints.latest_good(tmp_path) == good
    assert "step-000002" in caplog.text and "optim_states.pt: checksum mismatch" in caplog.text
    # resuming from the good one and saving step 2 again replaces the damaged folder
    checkpoints.save(tmp_path, state_at(2), FakeFleet(), keep=3)
    assert checkpoints.latest_good(tmp_path) == damaged and checkpoints.verify(damaged) == []


def test_keeps_the_last_n_plus_the_best(tmp_path):
    for step, metric in enumerate([0.1, 0.9, 0.2, 0.3, 0.4], start=1):
        checkpoints.save(tmp_path, state_at(step, metric), FakeFleet(), keep=2, keep_best=1)
    assert steps_in(tmp_path) == [2, 4, 5]  # 0.9 is best; 0.3 and 0.4 are the newest two
    assert checkpoints.best(tmp_path) == tmp_path / "step-000002"
    assert [c.metric for c in checkpoints.list_checkpoints(tmp_path)] == [0.9, 0.3, 0.4]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000002", "step-000004", "step-000005"]


def test_best_by_min_ignores_missing_metrics_and_the_newest_is_never_pruned(tmp_path):
    for step, metric in enumerate([0.5, None, 0.1, 0.7, None], start=1):
        checkpoints.save(tmp_path, state_at(step, metric), FakeFleet(), keep=1, keep_best=2, best_mode="min")
    assert steps_in(tmp_path) == [1, 3, 5]  # lowest two (0.1, 0.5) + the newest, whose metric is None
    assert checkpoints.best(tmp_path) == tmp_path / "step-000003"


def test_best_is_none_without_metrics(tmp_path):
    assert checkpoints.best(tmp_path) is None
    checkpoints.save(tmp_path, state_at(1), FakeFleet(), keep=2, keep_best=1)
    assert checkpoints.best(tmp_path) is None


def test_a_leftover_partial_is_ignored_and_cleaned_at_the_next_save(tmp_path):
    checkpoints.save(tmp_path, state_at(1), FakeFleet(), keep=2)
    leftover = tmp_path / ".partial-step-000002"
    (leftover / "deepspeed").mkdir(parents=True)
    (leftover / "manifest.json").write_text("{}")  # even with a manifest, a .partial- folder is not a checkpoint
    trash = tmp_path / ".trash-step-000000"
    trash.mkdir()
    assert checkpoints.latest(tmp_path) == tmp_path / "step-000001"
    assert steps_in(tmp_path) == [1]
    checkpoints.save(tmp_path, state_at(2), FakeFleet(), keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000001", "step-000002"]


def test_a_full_disk_names_the_intact_previous_checkpoint_and_leaves_no_partial(tmp_path):
    previous = checkpoints.save(tmp_path, state_at(10), FakeFleet(), keep=2)
    with pytest.raises(CheckpointError) as failed:
        checkpoints.save(tmp_path, state_at(20), FakeFleet(full_after=3), keep=2)
    message = str(failed.value)
    assert "step 20" in message and "the disk is full" in message and "No space left on device" in message
    assert "step-000010 is intact" in message and "--run-dir" in message and "keep_checkpoints" in message
    assert str(tmp_path / ".partial-step-000020") in message
    assert isinstance(failed.value.__cause__, OSError)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000010"]
    assert checkpoints.latest_good(tmp_path) == previous and checkpoints.verify(previous) == []


def test_a_full_disk_on_the_first_checkpoint_says_there_is_none(tmp_path):
    with pytest.raises(CheckpointError, match="no earlier checkpoint") as failed:
        checkpoints.save(tmp_path, state_at(1), FakeFleet(full_after=0), keep=2)
    assert "the disk is full" in str(failed.value)
    assert list(tmp_path.iterdir()) == []


def test_other_errors_pass_through_unchanged_and_leave_no_partial(tmp_path):
    class Broken(FakeFleet):
        def export(self, folder: Path) -> None:
            raise ValueError("a bug, not the disk")

    with pytest.raises(ValueError, match="a bug"):
        checkpoints.save(tmp_path, state_at(1), Broken(), keep=2)
    assert list(tmp_path.iterdir()) == []


def test_a_checkpoint_without_a_manifest_is_listed_but_never_trusted(tmp_path):
    old = tmp_path / "step-000007"
    (old / "deepspeed").mkdir(parents=True)
    (old / "state.json").write_text(json.dumps(
        {"step": 7, "policy_version": 7, "question_position": 112, "config_fingerprint": "old"}))
    assert checkpoints.latest(tmp_path) == old and checkpoints.latest_good(tmp_path) is None
    assert "no manifest.json" in checkpoints.verify(old)[0] and "not trusted" in checkpoints.verify(old)[0]
    with pytest.raises(checkpoints.CheckpointError, match="not trusted"):
        checkpoints.load(old, FakeFleet())
    assert checkpoints.list_checkpoints(tmp_path) == [checkpoints.CheckpointInfo(7, None, old)]


@pytest.mark.parametrize("manifest, reason", [
    (b"{not json", "unreadable"),
    (b"\xff\xfe", "unreadable"),
    (b"[1, 2]", "is malformed"),
    (b'{"files": {"state.json": {"bytes": "12", "sha256": "x"}}}', "is malformed"),
    (b'{"files": {"../../outside": {"bytes": 1, "sha256": "x"}}}', "is malformed"),
])
def test_a_malformed_manifest_is_damage_with_its_reason(tmp_path, manifest, reason, capsys):
    from innerloop.distributed import cli

    saved = checkpoints.save(tmp_path / "checkpoints", state_at(2), FakeFleet(), keep=2)
    (saved / "manifest.json").write_bytes(manifest)
    assert reason in checkpoints.verify(saved)[0]
    assert checkpoints.latest_good(tmp_path / "checkpoints") is None
    assert checkpoints.best(tmp_path / "checkpoints") is None  # no metric to rank by, and no crash
    assert cli.main(["checkpoints", str(tmp_path), "--verify"]) == 1
    assert f"step-000002  metric        -  DAMAGED: manifest.json {reason}" in capsys.readouterr().out


def test_a_file_the_manifest_does_not_list_is_damage(tmp_path):
    saved = checkpoints.save(tmp_path, state_at(2), FakeFleet(), keep=2)
    (saved / "deepspeed" / "state" / "planted.pt").write_bytes(b"pickle")
    (saved / "model" / "link").symlink_to(saved / "state.json")
    assert checkpoints.verify(saved) == ["deepspeed/state/planted.pt: not in the manifest",
                                         "model/link: not in the manifest"]


def test_steps_past_six_digits_sort_by_number(tmp_path):
    checkpoints.save(tmp_path, state_at(999_999), FakeFleet(), keep=5)
    checkpoints.save(tmp_path, state_at(1_000_000), FakeFleet(), keep=5)
    assert checkpoints.latest(tmp_path) == tmp_path / "step-1000000"


def test_a_hand_edited_driver_state_is_refused_naming_it(tmp_path):
    saved = checkpoints.save(tmp_path, state_at(2), FakeFleet(), keep=2)
    (saved / "state.json").write_text('{"step": 2, "surprise": true}')
    manifest = json.loads((saved / "manifest.json").read_text())
    manifest["files"] = checkpoints._describe_files(saved)
    (saved / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(checkpoints.CheckpointError, match=r"state.json is not a driver state innerloop wrote"):
        checkpoints.load(saved, FakeFleet())


def test_an_interrupt_mid_checkpoint_leaves_no_partial_folder_and_a_true_message(tmp_path):
    from innerloop.distributed.cli import _interrupted

    class Interrupted(FakeFleet):
        def export(self, folder: Path) -> None:
            raise KeyboardInterrupt  # Ctrl-C, or SIGTERM's grace running out, while the model is written

    root = tmp_path / "checkpoints"
    with pytest.raises(KeyboardInterrupt):
        checkpoints.save(root, state_at(1), Interrupted(), keep=2)
    assert list(root.iterdir()) == []
    assert "before the first checkpoint; `innerloop train --resume" in _interrupted(tmp_path, KeyboardInterrupt())
    checkpoints.save(root, state_at(2), FakeFleet(), keep=2)
    with pytest.raises(KeyboardInterrupt):
        checkpoints.save(root, state_at(3), Interrupted(), keep=2)
    assert [p.name for p in root.iterdir()] == ["step-000002"]
    assert "checkpoint step-000002 in" in _interrupted(tmp_path, KeyboardInterrupt()) and "is intact" in \
        _interrupted(tmp_path, KeyboardInterrupt())
