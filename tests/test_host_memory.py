"""return_freed_memory: free heap pages that malloc kept go back to the OS.

The measurement runs in a fresh interpreter with glibc's thresholds fixed by environment variables.
Left to glibc's defaults, whether a free returns memory by itself depends on the process's history
(the mmap threshold rises after large frees, and free() trims the heap's top past twice that), so an
in-process test passed on one machine and failed on another.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

_MEASURE = """
import json, torch
from innerloop.learners.host_memory import return_freed_memory

def rss_mib():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024

big = [torch.ones(2**18) for _ in range(256)]  # 256 MiB in 1 MiB tensors, from malloc's heap
del big  # free() keeps it: the trim threshold is set above it
before = rss_mib()
trimmed = return_freed_memory()
print(json.dumps({"before": before, "after": rss_mib(), "trimmed": trimmed}))
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_freed_heap_memory_goes_back():
    env = dict(os.environ)
    env["MALLOC_MMAP_THRESHOLD_"] = str(64 * 2**20)  # 1 MiB tensors come from the heap, never mmap
    env["MALLOC_TRIM_THRESHOLD_"] = str(2**40)  # free() never trims by itself; only malloc_trim does
    env["MALLOC_ARENA_MAX"] = "1"
    out = subprocess.run([sys.executable, "-c", _MEASURE], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert figures["trimmed"]
    freed = figures["before"] - figures["after"]
    assert freed > 192, f"only {freed:.0f} MiB of the freed 256 MiB went back to the OS: {figures}"


def test_without_glibc_nothing_is_claimed(monkeypatch):
    from innerloop.learners import host_memory

    monkeypatch.setattr(host_memory, "_glibc", lambda: None)
    assert host_memory.return_freed_memory() is False
