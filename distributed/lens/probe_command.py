"""`innerloop probe MODEL`: inner-loop loss curves of a model on its own trajectories.

It samples trajectories for held-out questions with one in-process rollout worker (as `innerloop eval`
does, with the rollout's sampling settings so that the G samples differ), computes their curves with a
transformers model loaded from the same folder, writes them with `lens/probe.py`'s `write_probe`, and times the
cached computation against the naive one (a full forward per prefix).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from innerloop.distributed.config import DEFAULT_SUFFIX, Config, ConfigError, check_suffix_template
from innerloop.distributed.lens.evaluate import resolve_model_or_checkpoint
from innerloop.distributed.lens.probe import GroupSummary, check_label, summarize_groups, write_probe
from innerloop.distributed.records import Question, Trajectory
from innerloop.learners.probe import (PROBE_BATCH, ProbeItem, ProbeRecord, control_items, items_from_trajectories,
                                      probe_trajectories, suffix_tokens)
from innerloop.learners.probe_summary import DEFAULT_WORDS


@dataclass(frozen=True)
class ProbeCost:
    """The cached probe of one trajectory against an estimate of the naive one (a full forward per prefix)."""

    trajectory_tokens: int  # L of the trajectory timed
    prefixes: int  # curve points computed
    cached_seconds: float
    naive_seconds: float  # estimated: mean of `forwards_timed` full forwards x prefixes
    forwards_timed: int


def measure_cost(model, tokenizer, item: ProbeItem, suffix_template: str = DEFAULT_SUFFIX,
                 every: int = 1, batch_size: int = PROBE_BATCH, forwards_timed: int = 3) -> ProbeCost:
    """Time the cached curve of `item`, and full forwards at `forwards_timed` prefixes spread evenly over
    the probed ones; their mean stands for the average naive forward (the time grows about linearly with
    the prefix, so evenly spread prefixes average out)."""
    import torch

    from innerloop.learners.probe import answer_nll_curve, probe_positions

    suffix_ids, answer_len = suffix_tokens(tokenizer, suffix_template, item.answer)
    started = time.perf_counter()
    answer_nll_curve(model, item.prompt_ids, item.completion_ids, suffix_ids, answer_len, every, batch_size)
    cached = time.perf_counter() - started
    positions = probe_positions(len(item.completion_ids), every)
    picks = sorted({positions[int((k + 0.5) * len(positions) / forwards_timed)] for k in range(forwards_timed)})
    device = next(model.parameters()).device
    started = time.perf_counter()
    with torch.no_grad():
        for i in picks:
            ids = list(item.prompt_ids) + list(item.completion_ids[:i]) + list(suffix_ids[:-1])
            model(input_ids=torch.tensor([ids], device=device), logits_to_keep=answer_len)
    per_forward = (time.perf_counter() - started) / len(picks)
    return ProbeCost(len(item.completion_ids), len(positions), cached, per_forward * len(positions), len(picks))


def format_cost(cost: ProbeCost, all_seconds: float, trajectories: int) -> str:
    return (f"cost: {all_seconds:.2f} s for the curves of {trajectories} trajectories (cached); the longest "
            f"({cost.trajectory_tokens} tokens, {cost.prefixes} prefixes): cached {cost.cached_seconds:.2f} s, "
            f"naive about {cost.naive_seconds:.2f} s ({cost.naive_seconds / max(cost.cached_seconds, 1e-9):.1f}x; "
            f"from {cost.forwards_timed} timed full forwards)")


@dataclass(frozen=True)
class ProbeOptions:
    # The defaults are the config's probe section's (ProbeConfig), which `--set probe.KEY=...` changes.
    out_dir: Path
    label: str
    questions: int
    samples: int
    suffix_template: str
    every: int
    words: tuple[str, ...] = DEFAULT_WORDS
    dtype: str = "float32"  # of the transformers model: "float32", or "auto" for the model config's
    other_question: int = 0  # controls per question: another question's trajectories (probe.other_question)


@dataclass(frozen=True)
class ProbeRun:
    records: tuple[ProbeRecord, ...]
    groups: tuple[GroupSummary, ...]
    cost: ProbeCost
    seconds: float  # the cached curves of every trajectory
    plot: Path


def check_options(options: ProbeOptions) -> None:
    """Bad options fail here, before any engine starts, in the options' own terms."""
    for name in ("questions", "samples", "every"):
        if getattr(options, name) < 1:
            raise ConfigError(f"--{name} must be at least 1, got {getattr(options, name)}")
    if options.other_question < 0:
        raise ConfigError(f"--other-question must be 0 or more, got {options.other_question}")
    if options.other_question and options.questions < 2:
        raise ConfigError("--other-question needs --questions 2 or more: the control reads another question's "
                          "trajectories")
    if not options.words or not all(w.strip() for w in options.words):
        raise ConfigError(f"--words {','.join(options.words)!r}: give one or more non-empty words")
    if options.dtype not in ("float32", "auto"):
        raise ConfigError(f"--dtype {options.dtype!r}: choose float32 or auto")
    if options.out_dir.exists() and not options.out_dir.is_dir():
        raise ConfigError(f"--out {options.out_dir} is a file, not a folder")
    try:
        check_suffix_template(options.suffix_template)
        check_label(options.label)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def run_probe(cfg: Config, model: str, options: ProbeOptions) -> ProbeRun:
    """Sample `samples` trajectories for the first `questions` held-out questions, probe and write them."""
    check_options(options)
    model_path = resolve_model_or_checkpoint(model)
    questions, trajectories = _sample(cfg, model_path, options.questions, options.samples)
    hf_model, tokenizer = _load_transformers(model_path, options.dtype)
    items = items_from_trajectories(trajectories, questions, _end_ids(hf_model, tokenizer))
    items += control_items(items, options.other_question)
    started = time.perf_counter()
    records = probe_trajectories(hf_model, tokenizer, items, options.suffix_template, options.every, options.words)
    seconds = time.perf_counter() - started
    longest = max(items, key=lambda item: len(item.completion_ids))
    cost = measure_cost(hf_model, tokenizer, longest, options.suffix_template, options.every)
    plot = write_probe(records, options.out_dir, options.label)
    return ProbeRun(tuple(records), summarize_groups(records), cost, seconds, plot)


def _sample(cfg: Config, model_path: str, count: int, samples: int) -> tuple[list[Question], tuple[Trajectory, ...]]:
    from innerloop.actors.rollout import generate_in_process
    from innerloop.distributed.run.questions import load_questions

    _, held_out = load_questions(cfg.tasks)
    if count > len(held_out):
        raise ConfigError(f"--questions {count}: the config holds only {len(held_out)} held-out questions "
                         "(raise tasks.eval_count)")
    questions = held_out[:count]
    # Closed before the transformers model loads: the engine's memory is free again.
    return questions, generate_in_process(cfg, model_path, questions, samples, cfg.rollout)


def _load_transformers(model_path: str, dtype: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32 if dtype == "float32" else "auto")
    return model.eval(), AutoTokenizer.from_pretrained(model_path)


def _end_ids(model, tokenizer) -> set[int]:
    """The tokens that end a turn: the tokenizer's and the generation config's (vLLM stops on both)."""
    ends = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ends = set(ends if isinstance(ends, (list, tuple)) else [] if ends is None else [ends])
    return ends | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())
