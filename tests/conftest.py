"""Shared test setup. The markers (`integration`, `gpu`) are registered in pyproject.toml."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config, items):
    """`gpu` tests skip where torch sees no CUDA device (checked once, only if any are collected)."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in gpu_items:
        item.add_marker(skip)
