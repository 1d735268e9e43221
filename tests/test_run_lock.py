"""A run directory is locked by the process training in it; a second one is refused naming the first."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from innerloop.distributed.state.lock import RunDirBusy, RunLock


def test_a_second_process_is_refused_naming_the_first(tmp_path):
    lock = RunLock(tmp_path / "run")
    lock.acquire()
    holder = json.loads((tmp_path / "run" / ".lock").read_text())
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    code = ("import sys; from innerloop.distributed.state.lock import RunLock, RunDirBusy\n"
            f"try:\n    RunLock({str(tmp_path / 'run')!r}).acquire()\nexcept RunDirBusy as e:\n    print(e); sys.exit(3)")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert other.returncode == 3, other.stderr
    assert f"process {os.getpid()} on {socket.gethostname()}" in other.stdout and "is training in it" in other.stdout
    lock.release()
    assert not (tmp_path / "run" / ".lock").exists()


def test_a_lock_whose_process_is_gone_is_taken_over(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(timeout=30)
    (tmp_path / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "start": "1"}))
    lock = RunLock(tmp_path)
    lock.acquire()
    assert "is gone" in caplog.text and json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()


def test_a_reused_pid_does_not_keep_a_stale_lock(tmp_path):
    # This very process, but recorded with another start time: the pid was reused by someone else.
    (tmp_path / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "start": "1"}))
    RunLock(tmp_path).acquire()


@pytest.mark.parametrize("content", [json.dumps({"host": "elsewhere", "pid": 1, "since": "then"}), "garbage"])
def test_a_lock_from_another_host_or_unreadable_is_never_taken_over(tmp_path, content):
    (tmp_path / ".lock").write_text(content)
    with pytest.raises(RunDirBusy, match="delete .*\\.lock and try again"):
        RunLock(tmp_path).acquire()
