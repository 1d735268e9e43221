"""Loading checkpoint state without running code: pickles are read as tensors and plain data only.

The learner (learners/learner.py) passes the few types DeepSpeed's own state files hold; anything else
in a file means it was not written by innerloop, and it is refused by name before it is opened.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from innerloop.distributed.errors import UntrustedCheckpoint


def refuse_unsafe_files(folder: Path, allowed_types: list[type]) -> None:
    """Read every state file's pickle without running it; one that names any callable or class beyond
    `allowed_types` is refused, naming the file (a tampered checkpoint never gets to load)."""
    allowed = {f"{t.__module__}.{t.__qualname__}" for t in allowed_types}
    for path in sorted(folder.rglob("*.pt")):
        try:
            unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(path)) - allowed
        except Exception as exc:  # not a torch zip file at all: as untrusted as a foreign pickle
            unsafe = {f"an unreadable file ({type(exc).__name__})"}
        if unsafe:
            raise UntrustedCheckpoint(
                f"checkpoint file {path} holds {', '.join(sorted(unsafe))}, not only tensors and plain data, so "
                "it was not written by innerloop or was changed since; it was refused without being loaded. "
                f"Delete {folder.parent.parent} and resume from an older checkpoint")


@contextlib.contextmanager
def weights_only_loads(allowed_types: list[type]):
    """Every torch.load inside, DeepSpeed's and its universal converter's included (which pass
    weights_only=False), loads tensors and plain data only, plus `allowed_types`: torch's
    documented switch TORCH_FORCE_WEIGHTS_ONLY_LOAD overrides the callers' argument."""
    saved = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(allowed_types):
            yield
    finally:
        if saved is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = saved
