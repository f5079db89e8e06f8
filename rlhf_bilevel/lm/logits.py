"""log π(·|s) from the trunk's hidden states through the frozen output layer, a few tokens at a time.

The logits of 8 rows × 32 tokens over SmolLM2's 49,152-token vocabulary take 50 MB in
float32, and autograd's log_softmax keeps several such copies alive into the backward
pass: the logits, their softmax, the gradient of each. Here the output layer is applied
to `CHUNK_BYTES` of logits at a time, the backward pass recomputes each chunk's softmax
from the one full-size tensor that has to exist anyway (the log-probabilities returned),
and the reference pass, which needs only the log-probability of each drawn token, never
holds more than a chunk.
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

CHUNK_BYTES = 16 * 2**20
"""The float32 logits one chunk computes at most."""


def token_chunks(tokens: int, vocab: int) -> Iterator[slice]:
    """Slices of `tokens` rows whose float32 logits over `vocab` take at most CHUNK_BYTES."""
    size = max(1, CHUNK_BYTES // (4 * vocab))
    return (slice(start, start + size) for start in range(0, tokens, size))


def chunked_log_softmax(flat: Tensor, head: nn.Linear) -> Iterator[tuple[slice, Tensor]]:
    """(rows, float32 log softmax(head(flat[rows]))) for the chunks of `flat` [T, d]."""
    for rows in token_chunks(len(flat), head.out_features):
        yield rows, F.log_softmax(head(flat[rows]).float(), -1)


def chosen_log_probs(hidden: Tensor, head: nn.Linear, tokens: Tensor) -> Tensor:
    """log π(a_h|s_h) [N, H] of the `tokens` [N, H] from the hidden states of s_h [N, H, d], in
    float32, without the [N, H, V] log-probabilities (no gradient)."""
    flat, chosen = hidden.reshape(-1, hidden.shape[-1]), tokens.reshape(-1, 1)
    out = torch.empty(chosen.shape[0], dtype=torch.float32, device=hidden.device)
    with torch.no_grad():
        for rows, log_probs in chunked_log_softmax(flat, head):
            out[rows] = log_probs.gather(-1, chosen[rows]).squeeze(-1)
    return out.view(tokens.shape)


def log_softmax_head(hidden: Tensor, head: nn.Linear) -> Tensor:
    """log softmax(head(hidden)) [.., V] in float32, differentiable in `hidden` [.., d].

    The head must be frozen (the base's output embedding): its weights get no gradient. Only
    `hidden` and the result are kept for the backward pass, which computes the gradient chunk
    by chunk, ∂/∂h = (g − softmax · Σ g) W, so the softmax is never whole.
    """
    if any(p.requires_grad for p in head.parameters()):
        raise ValueError("log_softmax_head: the output layer must be frozen (adapters.target_modules must not adapt lm_head)")
    return HeadLogSoftmax.apply(hidden, head)


class HeadLogSoftmax(torch.autograd.Function):
    """`log_softmax_head`'s forward and backward pass."""

    @staticmethod
    def forward(ctx, hidden: Tensor, head: nn.Linear) -> Tensor:
        flat = hidden.reshape(-1, hidden.shape[-1])
        out = torch.empty(len(flat), head.out_features, dtype=torch.float32, device=hidden.device)
        for rows, log_probs in chunked_log_softmax(flat, head):
            out[rows] = log_probs
        ctx.head = head
        # autocast reaches this forward's ops but not the backward's: it is recorded to apply it there
        ctx.autocast = torch.is_autocast_enabled(hidden.device.type)
        ctx.save_for_backward(hidden, out)  # `out` is what is returned: keeping it costs nothing
        return out.view(*hidden.shape[:-1], head.out_features)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        hidden, out = ctx.saved_tensors
        weight = ctx.head.weight
        grad = grad.reshape(out.shape)
        grad_hidden = torch.empty(out.shape[0], hidden.shape[-1], dtype=hidden.dtype, device=hidden.device)
        with torch.autocast(hidden.device.type, torch.bfloat16, enabled=ctx.autocast):
            for rows in token_chunks(len(out), len(weight)):
                g = grad[rows]
                grad_logits = g - out[rows].exp() * g.sum(-1, keepdim=True)
                grad_hidden[rows] = grad_logits.to(weight.dtype) @ weight
        return grad_hidden.view(hidden.shape), None
