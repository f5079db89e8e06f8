"""Drawing responses token by token from a causal LM, exactly and with common random numbers.

Every token is drawn from π itself (temperature 1, no top-k or top-p), so the score-function
estimators see the distribution they differentiate, and from a uniform of its own row and step
(`inverse_cdf`), so a row's response does not depend on the rows it is batched with.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from peft import PeftModel
from torch import Tensor
from transformers import Cache, DynamicCache

from rlhf_bilevel.lm.trunk import positions


def decode(model: PeftModel, prompt_ids: Tensor, prompt_mask: Tensor, past: Cache | None, uniforms: Tensor, eos: int, pad: int) -> tuple[Tensor, Tensor]:
    """Up to H tokens per row from `model` as it is set (adapter, autocast), token h of row i drawn by
    `inverse_cdf` at uniforms[i, h], with the KV cache (`past` holds all of each prompt but its last
    token, or is None). A row leaves the batch, and its cache, at its EOS: each step computes only the
    rows still running, where generate() would carry finished rows to the end (a fifth of the steps'
    rows in a default run). Returns the tokens [N, H] (`pad` after EOS) and log π of each drawn token
    [N, H] (0 after EOS), in float64."""
    n, horizon = uniforms.shape
    device = uniforms.device
    tokens = torch.full((n, horizon), pad, dtype=torch.long, device=device)
    taken = torch.zeros(n, horizon, dtype=torch.float64, device=device)
    running = torch.arange(n, device=device)  # the rows the cache holds, in its order
    inputs, mask = (prompt_ids, prompt_mask) if past is None else (prompt_ids[:, -1:], prompt_mask)
    cache = DynamicCache() if past is None else past
    for h in range(horizon):
        out = model(input_ids=inputs, attention_mask=mask, position_ids=positions(mask, inputs.shape[1]),
                    cache=cache, use_cache=True, logits_to_keep=1)
        token, logp = inverse_cdf(out.logits[:, -1], uniforms[running, h])
        tokens[running, h], taken[running, h] = token, logp
        going = token != eos
        if not going.all():
            if not going.any():
                break
            keep = going.nonzero().squeeze(-1)
            cache.batch_select_indices(keep)
            running, token, mask = running[keep], token[keep], mask[keep]
        mask = torch.cat([mask, mask.new_ones(len(running), 1)], 1)
        inputs = token.unsqueeze(-1)
    return tokens, taken


def through_eos(tokens: Tensor, eos: int) -> Tensor:
    """[N, H] 1 up to and including each row's first EOS, then 0: EOS is absorbing."""
    is_eos = tokens == eos
    return ((is_eos.long().cumsum(-1) - is_eos.long()) == 0).float()


def inverse_cdf(logits: Tensor, uniforms: Tensor) -> tuple[Tensor, Tensor]:
    """One token per row of `logits` [N, V], drawn from their softmax by inverting its CDF at the
    row's uniform u [N]: token k where cdf(k − 1) ≤ u·cdf(V) < cdf(k), which has probability π(k)
    exactly (up to float64 rounding). Returns the tokens [N] and their log π [N].

    One uniform per row and step, drawn up front, rather than a multinomial on a stream shared
    by the batch: a row's tokens depend on its own logits and uniforms only, not on which
    other rows it is batched with (nor on which of them have finished).
    """
    log_probs = F.log_softmax(logits.double(), -1)
    cdf = log_probs.exp().cumsum(-1)
    token = torch.searchsorted(cdf, (uniforms * cdf[:, -1]).unsqueeze(-1), right=True).clamp(max=logits.shape[-1] - 1)
    return token.squeeze(-1), log_probs.gather(-1, token).squeeze(-1)
