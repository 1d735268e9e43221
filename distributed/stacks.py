"""Each process's own stack dump: faulthandler on SIGUSR1, into a private file. No Ray here.

Roles (rollout worker, learner) call `install_stack_dump` once at start; the watchdog
(distributed/cluster/watchdog.py) later signals the process on its node and reads what it wrote.
faulthandler writes from C, so a process stuck in a collective, a CUDA call or a lock still answers.

The file sits in a folder made by `mkdtemp` (mode 0700, an unpredictable name), is created with
O_EXCL | O_NOFOLLOW (a planted file or symlink is refused, never followed), and is removed when the
role closes or the process exits normally.
"""

from __future__ import annotations

import atexit
import faulthandler
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import IO

STACK_SIGNAL = signal.SIGUSR1
DUMP_WAIT_S = 5.0  # the handler writes at once; this only covers a loaded machine
LOCAL_NODE = ""  # the node id of a role running in the driver's process, outside Ray (tests)


@dataclass(frozen=True)
class StackLocation:
    """Where a process's stacks can be asked for: its node, its pid, the file it writes them to."""

    node_id: str
    pid: int
    path: str


# The file faulthandler writes into, open for the life of the process: the handler holds only its fd.
_stack_file: IO[str] | None = None
_stack_path = ""


def install_stack_dump() -> StackLocation:
    """Make this process dump its stacks on SIGUSR1; call once in each role's __init__."""
    global _stack_file, _stack_path
    if _stack_file is None:  # once per process: a second registration would leak the first file
        folder = tempfile.mkdtemp(prefix="innerloop-stacks-")
        path = os.path.join(folder, "stacks.txt")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        _stack_file, _stack_path = os.fdopen(fd, "w"), path  # never closed: see _stack_file
        faulthandler.register(STACK_SIGNAL, file=_stack_file, all_threads=True)
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return StackLocation(_ray_node_id(), os.getpid(), _stack_path)


def remove_stack_dump() -> None:
    """Remove this process's stack file and its folder (an actor's close; Ray kills actors unannounced,
    so the exit handler alone would leave them behind)."""
    if _stack_path:
        shutil.rmtree(os.path.dirname(_stack_path), ignore_errors=True)


def _ray_node_id() -> str:
    # Roles never import Ray (tests/test_layout.py); inside a Ray actor the process already has it.
    ray = sys.modules.get("ray")
    return ray.get_runtime_context().get_node_id() if ray is not None and ray.is_initialized() else LOCAL_NODE


def read_stacks(pid: int, path: str, wait_s: float = DUMP_WAIT_S) -> str:
    """Signal process `pid` on this node to dump its stacks into `path` and return them, or one
    line saying why not. Runs on the process's node (a pinned Ray task, or the driver for LOCAL_NODE)."""
    if not _holds_open(pid, path):
        # Checked first: SIGUSR1's default action kills a process that has no handler for it.
        return f"no stacks: process {pid} is gone or never called install_stack_dump ({path})\n"
    before = os.stat(path).st_size
    try:
        os.kill(pid, STACK_SIGNAL)
    except ProcessLookupError:  # exited since the check
        return f"no stacks: process {pid} is gone\n"
    text = _read_new(path, before, wait_s)
    return text or f"no stacks: process {pid} wrote nothing to {path} within {wait_s:.0f} s\n"


def _holds_open(pid: int, path: str) -> bool:
    """Whether `pid` is alive and has `path` open: proof it registered the handler (a stale file of a
    dead process whose pid was reused does not count)."""
    fd_dir = f"/proc/{pid}/fd"
    if not os.path.isdir("/proc/self/fd"):  # no procfs (not Linux): trust the file's existence
        return os.path.exists(path) and _alive(pid)
    try:
        return any(os.path.realpath(os.path.join(fd_dir, fd)) == os.path.realpath(path) for fd in os.listdir(fd_dir))
    except OSError:  # no such process, or not ours to inspect
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def _read_new(path: str, offset: int, wait_s: float) -> str:
    """The text appended to `path` after `offset`, once it stops growing (or after `wait_s`)."""
    deadline = time.monotonic() + wait_s
    size = offset
    while time.monotonic() < deadline:
        time.sleep(0.1)
        grown = os.stat(path).st_size
        if grown > offset and grown == size:
            break  # written, and unchanged for one poll: the handler has finished
        size = grown
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")
