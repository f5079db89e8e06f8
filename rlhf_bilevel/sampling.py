"""The sampled `RolloutSource`: prompts drawn from a set, responses from the policy."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from rlhf_bilevel.types import Policy, PreferencePairs, Rollout


class SampledRollouts:
    def __init__(self, policy: Policy, prompts: Sequence[Any], generator: torch.Generator):
        self.policy, self.prompts, self.generator = policy, list(prompts), generator

    def draw_prompts(self, n: int) -> list[Any]:
        index = torch.randint(len(self.prompts), (n,), generator=self.generator)
        return [self.prompts[i] for i in index.tolist()]

    def rollouts(self, adapter: str, n: int) -> Rollout:
        with self.policy.adapter(adapter):
            return self.policy.sample(self.draw_prompts(n), self.generator)

    def pairs(self, adapter: str, n: int) -> PreferencePairs:
        """n prompts, two independent responses to each from the same policy (eq. 7)."""
        prompts = [p for p in self.draw_prompts(n) for _ in range(2)]
        with self.policy.adapter(adapter):
            return consecutive_pairs(self.policy.sample(prompts, self.generator))


def consecutive_pairs(rollout: Rollout) -> PreferencePairs:
    """Rows 2i and 2i+1 of a rollout (two responses to one prompt) as pair i, equally weighted."""
    n = len(rollout) // 2
    first = torch.arange(0, 2 * n, 2)
    return PreferencePairs(rollout=rollout, first=first, second=first + 1, weight=torch.full((n,), 1.0 / n))
