"""The inner-loop loss curve: how well the model predicts the reference answer after each prefix of a
trajectory (PAPER.md, "Inner-loop loss curve").

For prefix length i = 0..L of a completion y, the model reads prompt + y[:i] + suffix, where the suffix
is a lead-in ("\\n\\n**Final Answer**\\n\\boxed{") followed by the reference answer's tokens, and the
curve value is the mean negative log-likelihood (nats) of those answer tokens. Along a trajectory that
adapts the model to the question (an inner loop), the curve should fall.

Cost. A forward per prefix costs O(L) tokens each, O(L^2) in all. Here the prompt and completion are
read once with a KV cache; each prefix reuses the cache cut to its length and only the suffix is read.
Several prefixes share one batched forward: each row keeps the cache up to the batch's longest prefix
and masks out the cached positions past its own prefix, so every row sees exactly its own context.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from innerloop.distributed.config import ANSWER_SLOT, DEFAULT_SUFFIX, check_suffix_template
from innerloop.distributed.records import Question, Trajectory
from innerloop.learners.probe_summary import (DEFAULT_WORDS, Attribution, CurveSummary, answer_position, attribute,
                                              summarize_curve, summarize_cut, word_spans)

# What a probed trajectory is, for the comparisons (distributed/lens/probe_stats.py): its own question's
# trajectory, right or wrong, or the control: another question's trajectory read after this question's
# prompt and scored against this question's answer (a curve that falls there is not adapting to the question).
CORRECT, INCORRECT, OTHER_QUESTION = "correct", "incorrect", "other_question"

PROBE_BATCH = 8  # prefixes per batched suffix forward (memory grows with it times the sequence length)


@dataclass(frozen=True)
class ProbeCurve:
    positions: tuple[int, ...]  # [K] prefix lengths probed, ascending, from 0 to L
    values: tuple[float, ...]  # [K] mean answer-token NLL (nats) after each of those prefixes


def probe_positions(completion_length: int, every: int = 1) -> tuple[int, ...]:
    """0, every, 2*every, ... and always L itself, so the curve ends where the trajectory ends."""
    if every < 1:
        raise ValueError(f"every must be at least 1 (probe every token), got {every}")
    if completion_length < 0:
        raise ValueError(f"a completion cannot have {completion_length} tokens")
    positions = list(range(0, completion_length + 1, every))
    if positions[-1] != completion_length:
        positions.append(completion_length)
    return tuple(positions)


@torch.no_grad()
def answer_nll_curve(model, prompt_ids: Sequence[int], completion_ids: Sequence[int], suffix_ids: Sequence[int],
                     answer_len: int, every: int = 1, batch_size: int = PROBE_BATCH) -> ProbeCurve:
    """The curve at `probe_positions(len(completion_ids), every)`.

    suffix_ids: the lead-in tokens then the answer tokens; the last `answer_len` of them are scored.
    batch_size: prefixes per batched suffix forward (see PROBE_BATCH).
    """
    _check_inputs(prompt_ids, suffix_ids, answer_len, batch_size)
    device = next(model.parameters()).device
    context = torch.tensor([list(prompt_ids) + list(completion_ids)], device=device)
    # Logits of the context are not needed, only its keys and values: keep one position's logits.
    cache = model(input_ids=context, use_cache=True, logits_to_keep=1).past_key_values
    layers = [(keys, values) for keys, values, *_ in cache]
    _check_full_attention(cache)
    positions = probe_positions(len(completion_ids), every)
    values: list[float] = []
    for start in range(0, len(positions), batch_size):
        chunk = positions[start : start + batch_size]
        values += _suffix_nll(model, layers, len(prompt_ids), chunk, suffix_ids, answer_len)
    return ProbeCurve(positions, tuple(values))


def _suffix_nll(model, layers, prompt_len: int, prefixes: Sequence[int], suffix_ids: Sequence[int],
                answer_len: int) -> list[float]:
    """Mean answer NLL for each prefix length in `prefixes`, in one forward over the suffix tokens."""
    from transformers import DynamicCache

    rows, width = len(prefixes), prompt_len + max(prefixes)
    device = layers[0][0].device
    # A fresh cache per call: the forward appends the suffix to it, the full context cache stays intact.
    cache = DynamicCache([(k[:, :, :width].expand(rows, -1, -1, -1), v[:, :, :width].expand(rows, -1, -1, -1))
                          for k, v in layers])
    # The last answer token predicts nothing that is scored, so it is not fed.
    fed = torch.tensor(list(suffix_ids[:-1]), device=device).expand(rows, -1)
    context_len = torch.tensor([prompt_len + i for i in prefixes], device=device)
    mask = torch.ones(rows, width + fed.shape[1], dtype=torch.long, device=device)
    mask[:, :width] = (torch.arange(width, device=device) < context_len[:, None]).long()  # hide y[i:]
    # Each row's suffix sits right after its own prefix, as in a forward over that prefix alone.
    position_ids = context_len[:, None] + torch.arange(fed.shape[1], device=device)
    logits = model(input_ids=fed, attention_mask=mask, position_ids=position_ids, past_key_values=cache,
                   use_cache=True, logits_to_keep=answer_len).logits
    targets = torch.tensor(list(suffix_ids[-answer_len:]), device=device).expand(rows, -1)
    nll = -torch.log_softmax(logits.float(), dim=-1).gather(-1, targets[..., None]).squeeze(-1)
    return nll.mean(dim=-1).tolist()


def _check_inputs(prompt_ids: Sequence[int], suffix_ids: Sequence[int], answer_len: int, batch_size: int) -> None:
    if not prompt_ids:
        raise ValueError("the prompt is empty: the probe needs at least one prompt token before the trajectory")
    if answer_len < 1:
        raise ValueError(f"answer_len must be at least 1 (the answer's token count), got {answer_len}")
    if len(suffix_ids) <= answer_len:
        raise ValueError(f"the suffix has {len(suffix_ids)} tokens but the answer alone has {answer_len}: "
                         "the suffix needs a lead-in (such as '\\boxed{') before the answer")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")


def _check_full_attention(cache) -> None:
    # A sliding-window layer keeps only its last W positions: cutting it to a prefix would be wrong.
    if any(getattr(layer, "is_sliding", False) for layer in getattr(cache, "layers", ())):
        raise ValueError("the model uses sliding-window attention layers; the cached probe supports only "
                         "full-attention models")


@dataclass(frozen=True)
class ProbeItem:
    """One trajectory to probe and the reference answer of its question."""

    question_id: str
    prompt_ids: tuple[int, ...]  # [P] chat-templated prompt
    completion_ids: tuple[int, ...]  # [L] the trajectory, without a trailing end-of-turn token
    answer: str
    correct: bool  # the trajectory answers its own question right (a control: its own question)
    trajectory_of: str = ""  # a control's: the question that trajectory was sampled for ("": question_id)

    @property
    def group(self) -> str:
        if self.trajectory_of and self.trajectory_of != self.question_id:
            return OTHER_QUESTION
        return CORRECT if self.correct else INCORRECT


@dataclass(frozen=True)
class ProbeRecord:
    question_id: str  # whose prompt and answer were read and scored
    correct: bool
    completion_tokens: int  # L
    positions: tuple[int, ...]  # [K] prefix lengths probed
    curve: tuple[float, ...]  # [K] mean answer NLL (nats) after each prefix
    summary: CurveSummary
    attribution: Attribution
    group: str = CORRECT  # correct | incorrect | other_question (the control)
    answer_at: int | None = None  # the token where the reference answer first appears (None: never)
    cut_summary: CurveSummary | None = None  # over the prefixes before answer_at (None: < 2 points there)
    trajectory_of: str = ""  # the control's: the question its trajectory was sampled for

    def to_dict(self, label: str) -> dict:
        return {"label": label, "question_id": self.question_id, "correct": self.correct, "group": self.group,
                "trajectory_of": self.trajectory_of or self.question_id,
                "completion_tokens": self.completion_tokens, "positions": list(self.positions),
                "curve": list(self.curve), "summary": self.summary.to_dict(), "answer_at": self.answer_at,
                "cut_summary": None if self.cut_summary is None else self.cut_summary.to_dict(),
                "attribution": self.attribution.to_dict()}


def items_from_trajectories(trajectories: Sequence[Trajectory], questions: Sequence[Question],
                            end_ids: Sequence[int]) -> list[ProbeItem]:
    """Pair trajectories with their reference answers. A trailing end-of-turn token is dropped: the
    suffix continues the trajectory's text, not a closed turn."""
    answers = {q.question_id: q.answer for q in questions}
    items = []
    for t in trajectories:
        if t.question_id not in answers:
            raise ValueError(f"trajectory of question {t.question_id} has no question with a reference answer")
        completion = t.completion_ids
        while completion and completion[-1] in end_ids:
            completion = completion[:-1]
        items.append(ProbeItem(t.question_id, t.prompt_ids, completion, answers[t.question_id], t.correct))
    return items


def control_items(items: Sequence[ProbeItem], per_question: int) -> list[ProbeItem]:
    """Up to `per_question` controls per question: the next question's trajectories (in order of
    first appearance, the last question taking the first's; right ones first, so they read like a
    solution), each after this question's prompt and scored against this question's answer."""
    if per_question < 0:
        raise ValueError(f"control trajectories per question must be >= 0, got {per_question}")
    by_question: dict[str, list[ProbeItem]] = {}
    for item in items:
        if item.group != OTHER_QUESTION:
            by_question.setdefault(item.question_id, []).append(item)
    ids = list(by_question)
    if len(ids) < 2 or per_question == 0:
        return []
    controls = []
    for index, question_id in enumerate(ids):
        own, donor = by_question[question_id][0], ids[(index + 1) % len(ids)]
        donated = sorted(by_question[donor], key=lambda item: not item.correct)[:per_question]
        controls += [ProbeItem(question_id, own.prompt_ids, item.completion_ids, own.answer, False, donor)
                     for item in donated]
    return controls


def suffix_tokens(tokenizer, suffix_template: str, answer: str) -> tuple[list[int], int]:
    """(lead-in + answer token ids, answer token count). The lead-in and the answer are tokenized apart,
    so the scored tokens are exactly the answer's; text after {answer} (the closing brace) is not fed:
    under causal attention it cannot change the answer tokens' NLL."""
    check_suffix_template(suffix_template)
    if not answer.strip():
        raise ValueError("a question has an empty reference answer: nothing to score")
    lead_ids = tokenizer.encode(suffix_template.split(ANSWER_SLOT)[0], add_special_tokens=False)
    answer_ids = tokenizer.encode(answer, add_special_tokens=False)
    return lead_ids + answer_ids, len(answer_ids)


def probe_trajectories(model, tokenizer, items: Sequence[ProbeItem], suffix_template: str = DEFAULT_SUFFIX,
                       every: int = 1, words: Sequence[str] = DEFAULT_WORDS,
                       batch_size: int = PROBE_BATCH) -> list[ProbeRecord]:
    """One record per item. `model`: a transformers causal LM (full attention) in eval mode, whose
    whole weights this process holds (gradients are not tracked)."""
    records = []
    for item in items:
        suffix_ids, answer_len = suffix_tokens(tokenizer, suffix_template, item.answer)
        curve = answer_nll_curve(model, item.prompt_ids, item.completion_ids, suffix_ids, answer_len, every,
                                 batch_size)
        texts = [tokenizer.decode([t]) for t in item.completion_ids]
        answer_at, length = answer_position(texts, item.answer), len(item.completion_ids)
        records.append(ProbeRecord(
            item.question_id, item.correct, length, curve.positions, curve.values,
            summarize_curve(curve.positions, curve.values, length),
            attribute(curve.positions, curve.values, word_spans(texts, words), words), item.group, answer_at,
            summarize_cut(curve.positions, curve.values, length, answer_at), item.trajectory_of))
    return records
