"""One process trains in a run directory at a time: RUN_DIR/.lock names it.

The lock is a file created with O_EXCL, holding the host, pid and process start time of its owner. A
second process is refused at once with a message naming the first. A lock is stale when its owner
ran on this host and that process is gone (or the pid now belongs to a process started at another
time): it is taken over, with a warning. A lock from another host cannot be checked from here: the
message says how to remove it if that machine is known to be down.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path

from innerloop.distributed.config import ConfigError
from innerloop.distributed.errors import RunStopped

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"


class RunDirBusy(RunStopped):
    """Another process is training in this run directory."""


def _start_time(pid: int) -> str | None:
    """The kernel's start time of `pid` (clock ticks since boot), None where it cannot be read."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22; the name in parentheses may hold spaces


def _owner() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "start": _start_time(os.getpid()),
            "since": time.strftime("%Y-%m-%d %H:%M:%S")}


def _is_stale(owner: dict) -> bool:
    if owner.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(owner["pid"]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError, TypeError, KeyError):
        return False
    return owner.get("start") is not None and owner.get("start") != _start_time(int(owner["pid"]))


class RunLock:
    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_NAME
        self._held = False

    def acquire(self) -> None:
        """Take the lock or raise RunDirBusy naming its holder."""
        self.make_folder()
        for _ in range(2):  # a second try only after removing a stale lock
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
            except FileExistsError:
                owner = self._read()
                if not _is_stale(owner):
                    raise RunDirBusy(self._busy_message(owner)) from None
                log.warning("taking over the lock of %s: process %s on this host is gone", self.path.parent,
                            owner.get("pid"))
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as handle:
                json.dump(_owner(), handle)
            self._held = True
            return
        raise RunDirBusy(f"{self.path} was taken by another process while a stale lock was removed; try again")

    def make_folder(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # under a file, no permission, a read-only disk
            raise ConfigError(f"cannot create the run directory {self.path.parent}: {exc.strerror or exc}; "
                              "choose another --run-dir") from None

    def release(self) -> None:
        if self._held and self._read().get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)
        self._held = False

    def holder(self) -> dict | None:
        """Who trains in this run directory now: the lock's owner, unless that lock is stale (one
        held on another host counts: it cannot be checked from here). None: no process does."""
        if not self.path.exists():
            return None
        owner = self._read()
        return None if _is_stale(owner) else owner

    def _read(self) -> dict:
        try:
            owner = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}  # unreadable: treated as held by someone unknown (never stale)
        return owner if isinstance(owner, dict) else {}

    def _busy_message(self, owner: dict) -> str:
        who = (f"process {owner.get('pid')} on {owner.get('host')} (since {owner.get('since')})" if owner
               else "a process whose lock file cannot be read")
        return (f"{self.path.parent} is in use: {who} is training in it. Wait for it to finish or stop it, "
                f"or choose another --run-dir. If that process is known to be gone (its machine is down), "
                f"delete {self.path} and try again.")
