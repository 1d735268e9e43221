"""Token log-probs and entropy from logits, in fp32 blocks: pure torch, memory-aware.

`logprobs[:, t]` is the log-prob of `input_ids[:, t]` given `input_ids[:, :t]` (position 0 is 0), of
logits / temperature so it matches a sampler that used that temperature. Custom autograd functions
work one block of about `chunk_tokens` positions at a time in forward and backward and keep only the
logits (already held by the model's graph) and a [B, T] logsumexp, never a full fp32 [B, T, V] tensor.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch import Tensor

DEFAULT_CHUNK_TOKENS = 1024  # positions per fp32 block: 1024 x 152k vocab x 4 B ~ 0.6 GB


def _blocks(rows: int, cols: int, chunk_tokens: int) -> Iterator[tuple[slice, slice]]:
    """Tiles of a [rows, cols] grid with about chunk_tokens cells each (whole rows when short)."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    if rows == 0 or cols == 0:
        return
    cols_per = min(cols, chunk_tokens)
    rows_per = max(1, chunk_tokens // cols_per)
    for r0 in range(0, rows, rows_per):
        for c0 in range(0, cols, cols_per):
            yield slice(r0, min(r0 + rows_per, rows)), slice(c0, min(c0 + cols_per, cols))


def _forward(ctx, logits: Tensor, temperature: float, chunk_tokens: int,
             value: Callable[[Tensor, Tensor, slice, slice], Tensor]) -> tuple[Tensor, Tensor]:
    """out[:, t] = value(z, lse, rows, columns) of the block that predicts t, where z [b, l, V] is
    logits / temperature in fp32 (fp64 stays) and lse its logsumexp; out[:, 0] = 0. Returns (out, lse)."""
    ctx.temperature, ctx.chunk_tokens = temperature, chunk_tokens
    B, T, _ = logits.shape
    dtype = torch.promote_types(logits.dtype, torch.float32)
    out = torch.zeros(B, T, dtype=dtype, device=logits.device)
    lse = torch.zeros(B, T, dtype=dtype, device=logits.device)  # at the predicting position
    for r, c in _blocks(B, T - 1, chunk_tokens):
        z = logits[r, c].to(dtype) / temperature
        lse[r, c] = torch.logsumexp(z, dim=-1)
        out[r, c.start + 1 : c.stop + 1] = value(z, lse[r, c], r, c)
    return out, lse


def _backward_blocks(ctx, grad_out: Tensor, logits: Tensor, lse: Tensor) -> Iterator[tuple[slice, slice, Tensor, Tensor]]:
    """Per block: its rows and predicting columns, the gradient of the positions they predict [b, l, 1]
    (divided by the temperature), and a fresh log-softmax block [b, l, V] to update in place."""
    B, T, _ = logits.shape
    for r, c in _blocks(B, T - 1, ctx.chunk_tokens):
        g = grad_out[r, c.start + 1 : c.stop + 1].to(lse.dtype).unsqueeze(-1) / ctx.temperature
        yield r, c, g, (logits[r, c].to(lse.dtype) / ctx.temperature).sub_(lse[r, c].unsqueeze(-1))


class _TokenLogprobs(torch.autograd.Function):
    """out[:, t] = log_softmax(logits[:, t-1] / temperature)[input_ids[:, t]]; out[:, 0] = 0."""

    @staticmethod
    def forward(ctx, logits: Tensor, input_ids: Tensor, temperature: float, chunk_tokens: int):
        targets = input_ids[:, 1:].long()  # [B, T-1]
        out, lse = _forward(ctx, logits, temperature, chunk_tokens,
                            lambda z, lse, r, c: z.gather(-1, targets[r, c].unsqueeze(-1)).squeeze(-1) - lse)
        ctx.save_for_backward(logits, targets, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        logits, targets, lse = ctx.saved_tensors
        grad = torch.zeros_like(logits)  # the last position predicts nothing: zero
        for r, c, g, d in _backward_blocks(ctx, grad_out, logits, lse):
            d.exp_().mul_(-g)  # d logp / dz = onehot - softmax
            d.scatter_add_(-1, targets[r, c].unsqueeze(-1), g)
            grad[r, c] = d  # casts back to the logits' dtype
        return grad, None, None, None


class _Entropy(torch.autograd.Function):
    """out[:, t] = entropy of softmax(logits[:, t-1] / temperature); out[:, 0] = 0."""

    @staticmethod
    def forward(ctx, logits: Tensor, temperature: float, chunk_tokens: int):
        # entr(0) = 0: a -inf logit adds nothing.
        out, lse = _forward(ctx, logits, temperature, chunk_tokens,
                            lambda z, lse, r, c: torch.special.entr(torch.exp(z - lse.unsqueeze(-1))).sum(-1))
        ctx.save_for_backward(logits, lse, out)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        logits, lse, entropy = ctx.saved_tensors
        grad = torch.zeros_like(logits)
        for r, c, g, d in _backward_blocks(ctx, grad_out, logits, lse):
            p = d.exp()
            # dH/dz_i = -p_i (log p_i + H); where p_i == 0 (a -inf logit) the term is 0, not NaN.
            d.add_(entropy[r, c.start + 1 : c.stop + 1].unsqueeze(-1)).mul_(p).masked_fill_(p == 0, 0.0).mul_(-g)
            grad[r, c] = d
        return grad, None, None


def token_logprobs(
    logits: Tensor,  # [B, T, V] any float dtype (bf16 fine); computed in fp32 block by block
    input_ids: Tensor,  # [B, T]
    *,
    temperature: float = 1.0,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> Tensor:  # [B, T] fp32 (fp64 for fp64 logits), out[:, 0] = 0
    """Log-prob of each token given its prefix, differentiable w.r.t. logits."""
    if logits.dim() != 3 or logits.shape[:2] != input_ids.shape:
        raise ValueError(f"logits {tuple(logits.shape)} must be [B, T, V] over input_ids {tuple(input_ids.shape)}")
    return _TokenLogprobs.apply(logits, input_ids, float(temperature), int(chunk_tokens))


def entropy_from_logits(
    logits: Tensor,  # [B, T, V]
    *,
    temperature: float = 1.0,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> Tensor:  # [B, T] fp32 (fp64 for fp64 logits): entropy of the distribution that predicted token t; out[:, 0] = 0
    """Per-token entropy aligned with `token_logprobs`, differentiable w.r.t. logits."""
    if logits.dim() != 3:
        raise ValueError(f"logits must be [B, T, V], got {tuple(logits.shape)}")
    return _Entropy.apply(logits, float(temperature), int(chunk_tokens))
