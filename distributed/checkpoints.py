"""Checkpoints on a cadence: model + optimizer (DeepSpeed), an HF model folder, and the driver's state.

checkpoints/step-000010/
  deepspeed/      every rank's model, optimizer and LR-schedule state
  model/          a Hugging Face folder (for `innerloop eval` and for people)
  state.json      step, policy version, position in the question stream, config fingerprint

A checkpoint is written under a temporary name and renamed only when complete, so the latest
complete one is never a half-written folder.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

_PREFIX = "step-"


@dataclass(frozen=True)
class DriverState:
    step: int
    policy_version: int
    question_position: int
    config_fingerprint: str


def _folder(root: Path, step: int) -> Path:
    return root / f"{_PREFIX}{step:06d}"


def save(root: Path, state: DriverState, fleet, keep: int) -> Path:
    final = _folder(root, state.step)
    partial = root / f".partial-{final.name}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    fleet.save_learners(partial / "deepspeed", tag="state")
    fleet.export(partial / "model")
    (partial / "state.json").write_text(json.dumps(asdict(state), indent=2))
    shutil.rmtree(final, ignore_errors=True)
    partial.rename(final)
    _prune(root, keep)
    return final


def _complete(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith(_PREFIX) and (p / "state.json").is_file())


def _prune(root: Path, keep: int) -> None:
    for old in _complete(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def latest(root: Path) -> Path | None:
    found = _complete(root)
    return found[-1] if found else None


def load(path: Path, fleet) -> DriverState:
    """Restore every learner rank from `path`; returns the driver's state to continue from."""
    state = DriverState(**json.loads((path / "state.json").read_text()))
    fleet.load_learners(path / "deepspeed", tag="state")
    return state


def saved_model(root: Path, step: int) -> Path | None:
    """The Hugging Face folder of the complete checkpoint of `step`, if there is one."""
    folder = _folder(root, step)
    return folder / "model" if (folder / "state.json").is_file() else None


def model_folder(path: Path) -> Path:
    """The Hugging Face folder inside a checkpoint, or `path` itself if it is one."""
    return path / "model" if (path / "model" / "config.json").is_file() else path
