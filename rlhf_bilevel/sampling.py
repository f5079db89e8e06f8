"""The sampled `RolloutSource`: prompts drawn from a set, responses from the policy.

Batch sizes are global. In a run of several processes each one returns its own rows of
the batch (`World.shard`); the prompts of the whole batch are drawn on every process from
the same generator, so every process knows the whole batch and the generators stay in step.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from rlhf_bilevel.collectives import Collectives, World
from rlhf_bilevel.types import Policy, PreferencePairs, Rollout


class SampledRollouts:
    def __init__(self, policy: Policy, prompts: Sequence[Any], generator: torch.Generator, world: Collectives = World()):
        self.policy, self.prompts, self.generator, self.world = policy, list(prompts), generator, world

    def draw_prompts(self, n: int) -> list[Any]:
        index = torch.randint(len(self.prompts), (n,), generator=self.generator)
        return [self.prompts[i] for i in index.tolist()]

    def sample(self, adapter: str, prompts: list[Any]) -> Rollout:
        with self.policy.adapter(adapter):
            if self.world.size == 1:
                return self.policy.sample(prompts, self.generator)
            # only a policy that can draw some rows of a batch runs on several processes (LMPolicy)
            return self.policy.sample(prompts, self.generator, rows=self.world.shard(len(prompts)))

    def rollouts(self, adapter: str, n: int) -> Rollout:
        return self.sample(adapter, self.draw_prompts(n))

    def coupled(self, adapters: Sequence[str], n: int) -> list[Rollout]:
        """n trajectories from each adapter on the same prompts and the same random numbers
        (common random numbers): the policies sample by inverse CDF from uniforms drawn up front,
        so replaying the generator's state replays them. Each rollout is a sample of its own
        policy, as `rollouts` draws it; where two policies are close most rows are one and the
        same trajectory, and an estimate's difference between them keeps little of the noise."""
        prompts = self.draw_prompts(n)
        state = self.generator.get_state()
        drawn = []
        for adapter in adapters:
            # every adapter leaves the generator where one draw leaves it: a shard stays in step too
            self.generator.set_state(state)
            drawn.append(self.sample(adapter, prompts))
        return drawn

    def pairs(self, adapter: str, n: int) -> PreferencePairs:
        """n prompts, two independent responses to each from the same policy (eq. 7); a shard
        holds whole pairs, since it starts at an even row."""
        return consecutive_pairs(self.groups(adapter, n, 2))

    def groups(self, adapter: str, n: int, size: int) -> Rollout:
        """n prompts, `size` independent responses to each: rows size·i … size·i + size − 1 answer prompt i."""
        return self.sample(adapter, [p for p in self.draw_prompts(n) for _ in range(size)])


def consecutive_pairs(rollout: Rollout) -> PreferencePairs:
    """Rows 2i and 2i+1 of a rollout (two responses to one prompt) as pair i, equally weighted."""
    n = len(rollout) // 2
    device = rollout.mask.device
    first = torch.arange(0, 2 * n, 2, device=device)
    return PreferencePairs(rollout=rollout, first=first, second=first + 1, weight=torch.full((n,), 1.0 / n, device=device))
