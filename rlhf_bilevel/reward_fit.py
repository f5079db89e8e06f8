"""φ's fit on the preference store (docs/algorithm.md step 7, "The φ update in practice")."""

from __future__ import annotations

import torch

from rlhf_bilevel import estimators as est
from rlhf_bilevel.collectives import Collectives
from rlhf_bilevel.config import BilevelConfig
from rlhf_bilevel.hypergradient import Hypergradient
from rlhf_bilevel.nonfinite import NonFiniteGuard
from rlhf_bilevel.steps import Stepper
from rlhf_bilevel.store import PreferenceStore
from rlhf_bilevel.types import PreferencePairs, RewardModel, Rollout


class RewardFit:
    """`reward_fit.steps` steps of φ down d_t (`reward_step`), each d_t taken at the current φ on the
    labels of `store` (every label so far with `reward_fit.replay`, weighted by age, or a minibatch of
    its batches). `generator` draws the minibatches; `guard` skips non-finite steps."""

    def __init__(
        self,
        reward: RewardModel,
        store: PreferenceStore,
        hypergradient: Hypergradient,
        cfg: BilevelConfig,
        generator: torch.Generator,
        world: Collectives,
        guard: NonFiniteGuard,
    ):
        self.reward, self.store, self.hypergradient, self.cfg = reward, store, hypergradient, cfg
        self.generator, self.world, self.guard = generator, world, guard
        self.reward_step = Stepper(reward.parameters(), cfg.reward_step, ascend=False)
        self.device = hypergradient.anchor[0].device  # where φ lives

    def fit(self, fresh: PreferencePairs, sets: dict[str, list[Rollout]], t: int) -> dict[str, float]:
        """φ's steps at outer step `t` on the store (or the `fresh` pairs alone, without replay) and the
        penalty's trajectories `sets`; returns d_t's diagnostics at the first step, and f̂ after the fit."""
        fit = self.cfg.reward_fit
        batches = self.store.batches if fit.replay else [fresh]
        weights = self.store.weights(t, fit.half_life, self.device) if fit.replay else torch.ones(1, dtype=torch.float64, device=self.device)
        if fit.minibatch is not None and fit.minibatch < len(batches):
            chosen = torch.randperm(len(batches), generator=self.generator)[: fit.minibatch].sort().values
            batches, weights = [batches[i] for i in chosen.tolist()], weights[chosen]
        labels = sum(len(p) for p in batches) * self.world.size  # every process holds an equal share
        metrics = {"upper/labels": float(labels)}
        for step in range(fit.steps):
            d_t, diagnostics = self.hypergradient(batches, weights, sets, labels)
            diagnostics["upper/d_norm"] = self.guard.step("phi", self.reward_step, d_t, loss=diagnostics["upper/store_loss"])
            if step == 0:  # d_t as the theorem's single step sees it
                metrics.update(diagnostics)
        metrics["upper/store_loss_after"] = self.store_loss(batches, weights).item()
        return metrics

    def store_loss(self, batches: list[PreferencePairs], weights: torch.Tensor) -> torch.Tensor:
        """f̂ of the current φ on `batches`, averaged over processes."""
        with torch.no_grad():
            rewards = [self.reward.member_rewards(p.rollout) for p in batches]
        (total,) = self.world.mean([est.store_loss(rewards, batches, weights, self.cfg.upper_loss)])
        return total
