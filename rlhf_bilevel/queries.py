"""Which pair the oracle is asked about: two random responses, or the pair the reward model is least sure of.

With `select: uncertain`, `candidates` responses are drawn per prompt, and the oracle is asked
about the pair whose margin R_φ(τ_i) − R_φ(τ_j) the reward model's ensemble members disagree on
most (the standard deviation of the members' margins; `reward.heads` ≥ 2). That spends the same
labels where they should teach the reward model most, as oat's active exploration does, at the
cost of drawing `candidates` responses per prompt instead of two. Published work finds random
pairs hard to beat, so `compare` runs both at the same budget.

A selected pair is no longer two independent draws of π_λ′: the score-function estimate of
∇_λ′ f (eq. 17) on it estimates the gradient of f under the selection, not under π_λ′ itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from rlhf_bilevel.types import PreferencePairs, RewardModel, Rollout, RolloutSource


@dataclass(frozen=True)
class QueryConfig:
    select: Literal["random", "uncertain"] = field(
        default="random", metadata={"help": "random: two responses per prompt; uncertain: the pair the ensemble disagrees on most"}
    )
    candidates: int = field(
        default=2, metadata={"help": "responses drawn per prompt (≥ 2; ≥ 3 when `select` is uncertain: of 2, the one pair is the random pair)"}
    )



def most_uncertain_pairs(member_rewards: Tensor, rollout: Rollout, candidates: int) -> PreferencePairs:
    """For each prompt (rows c·i … c·i + c − 1 of `rollout` answer prompt i), the pair (j, k), j < k,
    whose ensemble margins R_e(τ_j) − R_e(τ_k) have the largest standard deviation over members e.

    `member_rewards` is [E, N, H], each member's r_φ on the rollout, E ≥ 2. Pairs are equally weighted.
    """
    members = member_rewards.shape[0]
    totals = (member_rewards * rollout.mask).sum(-1).reshape(members, -1, candidates)  # [E, prompts, c]
    margins = totals.unsqueeze(-1) - totals.unsqueeze(-2)  # [E, prompts, c, c]
    spread = margins.std(0)
    upper = torch.triu(torch.ones(candidates, candidates, dtype=torch.bool, device=spread.device), diagonal=1)
    flat = spread.masked_fill(~upper, -1.0).flatten(1).argmax(-1)  # ties: the first pair in row order
    offset = torch.arange(len(flat), device=flat.device) * candidates
    first, second = offset + flat // candidates, offset + flat % candidates
    n = len(flat)
    return PreferencePairs(rollout=rollout, first=first, second=second, weight=torch.full((n,), 1.0 / n, device=flat.device))


class PairQuery:
    """The pairs of an adapter that the oracle is asked about, drawn from `source` as `cfg` selects:
    random, or the most uncertain by `reward`'s ensemble."""

    def __init__(self, source: RolloutSource, reward: RewardModel, cfg: QueryConfig):
        self.source, self.reward, self.cfg = source, reward, cfg

    def __call__(self, adapter: str, n: int) -> PreferencePairs:
        """n pairs of `adapter`: two draws per prompt, or the most uncertain pair of `candidates` draws per prompt."""
        if self.cfg.select == "random":
            return self.source.pairs(adapter, n)
        rollout = self.source.groups(adapter, n, self.cfg.candidates)
        with torch.no_grad():
            return most_uncertain_pairs(self.reward.member_rewards(rollout), rollout, self.cfg.candidates)
