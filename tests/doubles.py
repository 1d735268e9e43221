"""Test doubles for the integration tests (never used by the product)."""

from __future__ import annotations


def length_reward(completion: str, question) -> float:
    """A reward a random tiny model can earn: more digits, more reward. It gives groups variance,
    so a step on a random model still moves the weights."""
    return float(sum(ch.isdigit() for ch in completion)) / 4.0
