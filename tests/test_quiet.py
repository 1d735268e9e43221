"""The quiet terminal: while a command runs, third-party output (other loggers, warnings, lines Ray
forwards from actors, C++ writes, child processes) goes to the log file and the terminal keeps
innerloop's own lines, its progress bar included; --verbose keeps everything on the terminal."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Run in a child process: the routing moves file descriptors 1 and 2, which pytest captures.
SCRIPT = r"""
import logging, os, subprocess, sys, warnings
from pathlib import Path
from rich.console import Console
from rich.progress import Progress
from innerloop.distributed import cli

cli._setup_logging(False)
with cli._quiet(sys.argv[2] == "verbose", Path(sys.argv[1])):
    logging.getLogger("innerloop.distributed.run.driver").warning("OWN-WARNING")
    logging.getLogger("vllm.engine").warning("THIRD-PARTY-RECORD")
    warnings.warn("THIRD-PARTY-FUTUREWARNING", FutureWarning)
    print("(RolloutWorker pid=1) FORWARDED-STDERR", file=sys.stderr)
    print("(Learner pid=2) FORWARDED-STDOUT")
    os.write(2, b"C-LEVEL-WRITE\n")
    subprocess.run([sys.executable, "-c", "print('CHILD-PROCESS')"], check=True)
    # A live display, as the step display's: its bar and lines on the terminal, others' prints not.
    with Progress(console=Console(stderr=True, force_terminal=True)) as progress:
        progress.add_task("training", total=1)
        progress.console.print("STEP-LINE")
        print("PRINT-DURING-BAR", file=sys.stderr)
print("SUMMARY-LINE")
os.write(2, b"AFTER-THE-COMMAND\n")
"""

OWN = ["OWN-WARNING", "STEP-LINE", "SUMMARY-LINE", "AFTER-THE-COMMAND"]
THIRD_PARTY = ["THIRD-PARTY-RECORD", "THIRD-PARTY-FUTUREWARNING", "FORWARDED-STDERR", "FORWARDED-STDOUT",
               "C-LEVEL-WRITE", "CHILD-PROCESS", "PRINT-DURING-BAR"]


def _run(tmp_path: Path, mode: str) -> tuple[str, Path]:
    log_file = tmp_path / "run" / "output.log"
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "300"}  # rich: no wrapped lines
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(log_file), mode], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr, log_file


def test_third_party_output_goes_to_the_log_and_innerloops_own_to_the_terminal(tmp_path):
    terminal, log_file = _run(tmp_path, "quiet")
    logged = log_file.read_text()
    assert f"third-party output goes to {log_file}" in terminal
    for text in OWN:
        assert text in terminal, f"{text} missing from the terminal:\n{terminal}"
    for text in THIRD_PARTY:
        assert text not in terminal, f"{text} reached the terminal:\n{terminal}"
        assert text in logged, f"{text} missing from the log:\n{logged}"
    assert "OWN-WARNING" in logged  # innerloop's log lines also in the file, as context
    assert "AFTER-THE-COMMAND" not in logged  # the terminal is back once the command is done


def test_verbose_keeps_everything_on_the_terminal(tmp_path):
    terminal, log_file = _run(tmp_path, "verbose")
    for text in OWN + THIRD_PARTY:
        assert text in terminal, f"{text} missing from the terminal:\n{terminal}"
    assert not log_file.exists()


@pytest.mark.parametrize("argv, verbose", [(["eval", "m"], False), (["-v", "eval", "m"], True),
                                           (["eval", "m", "--verbose"], True), (["train", "-v"], True)])
def test_verbose_is_taken_before_or_after_the_command(argv, verbose):
    from innerloop.distributed import cli

    assert cli._parser().parse_args(argv).verbose is verbose
