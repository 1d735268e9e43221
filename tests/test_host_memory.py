"""return_freed_memory: free heap pages left between live allocations go back to the OS."""

from __future__ import annotations

import platform

import pytest
import torch

from innerloop.learners.host_memory import return_freed_memory


def _rss_mib() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024


@pytest.mark.skipif(platform.system() != "Linux" or not platform.libc_ver()[0] == "glibc", reason="glibc only")
def test_fragmented_free_memory_goes_back():
    block = torch.ones(4 * 2**20)
    del block  # freeing a 16 MiB mmapped block raises glibc's mmap threshold above 1 MiB
    big, pins = [], []
    for _ in range(256):  # 1 MiB tensors from the heap, each followed by a small one that stays alive
        big.append(torch.ones(2**18))
        pins.append(torch.ones(16))
    del big
    before = _rss_mib()
    assert return_freed_memory()
    assert before - _rss_mib() > 128, "the freed 256 MiB between live tensors stayed with the process"
    assert len(pins) == 256
