"""A learner rank's in-memory snapshot as plain bytes: the files of a DeepSpeed checkpoint written to
scratch space (host memory where the machine has /dev/shm), read back, and the scratch removed.

The bytes go to the driver (Ray's object store holds them, owned by the driver, so they outlive the
rank); a restarted rank writes them back to scratch and loads them as a checkpoint. DeepSpeed's own
save and load are what make the copy exact (model, optimizer, LR schedule, RNG), with no second format.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

SHARED_MEMORY = Path("/dev/shm")


@contextmanager
def scratch_folder() -> Iterator[Path]:
    """A private folder in memory-backed scratch space (a plain temporary folder without /dev/shm),
    removed afterwards, whatever happened."""
    where = SHARED_MEMORY if SHARED_MEMORY.is_dir() and os.access(SHARED_MEMORY, os.W_OK) else None
    with tempfile.TemporaryDirectory(prefix="innerloop-snapshot-", dir=where) as folder:
        yield Path(folder)


def read_files(folder: Path) -> dict[str, bytes]:
    """{path relative to `folder`: contents} of every file under it."""
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def write_files(files: dict[str, bytes], folder: Path) -> None:
    """The inverse of `read_files`; a name that would leave `folder` is refused (never written)."""
    root = folder.resolve()
    for name, data in files.items():
        target = (folder / name).resolve()
        if root not in target.parents:
            raise ValueError(f"snapshot file {name!r} would be written outside its folder")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
