"""The lower level of Algorithm 1 (docs/algorithm.md, steps 2–5): each policy's critic, its ascent
direction, and its step."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch

from rlhf_bilevel import estimators as est
from rlhf_bilevel.config import BilevelConfig
from rlhf_bilevel.nonfinite import BLOCKS, NonFiniteGuard, tensors_in
from rlhf_bilevel.steps import Stepper
from rlhf_bilevel.types import Critic, Policy, RewardModel, Rollout

Penalty = Callable[[torch.Tensor], torch.Tensor]
"""log π ↦ the surrogate f̂ of eq. 17, whose gradient in λ′ is ∇_λ′ f."""


class PolicyAscent:
    """λ's and λ′'s directions under r_φ and their steps (lines 9–10, `policy_step`): each adapter
    of `critics` has its critic (Algorithm 2) and its step rule; `guard` skips non-finite updates."""

    def __init__(self, policy: Policy, reward: RewardModel, critics: dict[str, Critic], cfg: BilevelConfig, guard: NonFiniteGuard):
        self.policy, self.reward, self.critics, self.cfg, self.guard = policy, reward, critics, cfg, guard
        self.policy_steps = {name: Stepper(policy.parameters_of(name), cfg.policy_step, ascend=True) for name in critics}

    def direction(self, adapter: str, rollout: Rollout, penalty: Penalty | None = None) -> tuple[list[torch.Tensor], dict[str, float]]:
        """Critic fit (Algorithm 2), then one adapter's ascent direction: ∇J by eq. 12, or with
        `penalty` d'_k. Returns (direction, diagnostics)."""
        cfg = self.cfg
        with torch.no_grad():
            shaped = est.shaped_rewards(rollout, self.reward.token_rewards(rollout), cfg.beta)
        critic = self.critics[adapter]
        diagnostics = {
            "lower/J": (rollout.weight * est.returns(rollout, shaped, cfg.gamma)).sum().item(),
            "lower/kl": est.kl_to_reference(rollout).item(),
        }

        def objective(log_probs: torch.Tensor) -> torch.Tensor:
            # the critic learns from π(·|s) at every visited state: its expected-SARSA target needs them
            diagnostics.update(self.fit_critic(adapter, rollout, shaped, log_probs.detach()))
            advantage = critic.advantages(rollout, shaped, log_probs)
            surrogate = est.surrogate_J_lambda(log_probs, rollout, advantage, cfg.gamma)
            if penalty is None:
                return surrogate
            # d'_k = ∇J(λ′, φ) − σ ∇f(φ, λ′)  (docs/algorithm.md step 4; erratum 2): linear in the two
            # surrogates, so one backward pass through the trunk gives it rather than two
            (surrogate,) = est.penalised_direction([surrogate], [penalty(log_probs)], cfg.sigma)
            return surrogate

        return self.gradient(adapter, rollout, objective), diagnostics

    def gradient(self, adapter: str, rollout: Rollout, objective: Callable[[torch.Tensor], torch.Tensor]) -> list[torch.Tensor]:
        """∇ of objective(log π(rollout)) in `adapter`'s weights. With `micro_batch`, by the chain rule in
        pieces: ∂objective/∂log π on the whole batch's log π (taken without a graph), then each piece of
        rows backpropagated alone with its share of it, so the trunk holds one piece's activations."""
        params = self.policy.parameters_of(adapter)
        size = self.cfg.micro_batch
        with self.policy.adapter(adapter):
            if size is None or size >= len(rollout):
                # no retained graph: the trunk's activations are freed before the next rollout is drawn
                return list(torch.autograd.grad(objective(self.policy.log_probs(rollout)), params))
            with torch.no_grad():
                log_probs = self.policy.log_probs(rollout)
            (outer,) = torch.autograd.grad(objective(log_probs.requires_grad_()), log_probs)
            total = [torch.zeros_like(p) for p in params]
            for start in range(0, len(rollout), size):
                rows = slice(start, start + size)
                piece = torch.autograd.grad(self.policy.log_probs(rollout.rows(rows)), params, grad_outputs=outer[rows])
                for acc, grad in zip(total, piece):
                    acc.add_(grad)
            return total

    def fit_critic(self, adapter: str, rollout: Rollout, shaped: torch.Tensor, log_probs: torch.Tensor) -> dict[str, float]:
        """Algorithm 2, undone when it leaves the critic's state non-finite (a NaN reward in the
        replay, a diverging TD step). Every process holds the same critic, so all undo it together."""
        critic = self.critics[adapter]
        before = copy.deepcopy(critic.state_dict())
        diagnostics = critic.fit(rollout, shaped, log_probs)
        block = f"critic/{adapter}"
        if all(torch.isfinite(t).all() for t in tensors_in(critic.state_dict())):
            self.guard.passed(block)
        else:
            critic.load_state_dict(before)
            self.guard.skipped(block, f"the critic of {BLOCKS[adapter]}", "its TD fit left non-finite weights")
        return diagnostics

    def step(self, adapter: str, direction: list[torch.Tensor]) -> float:
        """`adapter` moved up `direction` (lines 9–10); returns ‖d‖, NaN when the guard skipped it."""
        return self.guard.step(adapter, self.policy_steps[adapter], direction)

    def relabel(self) -> None:
        """The critics' replay rewarded again by the current r_φ: its rewards were those of the φ before the fit."""
        with torch.no_grad():
            for critic in self.critics.values():
                critic.relabel(lambda rollout: est.shaped_rewards(rollout, self.reward.token_rewards(rollout), self.cfg.beta))

    def state_dict(self) -> dict:
        return {name: step.state_dict() for name, step in self.policy_steps.items()}

    def load_state_dict(self, state: dict) -> None:
        for name, step in self.policy_steps.items():
            step.load_state_dict(state[name])
