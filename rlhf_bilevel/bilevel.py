"""Algorithm 1 (corrected, ALGORITHM.md): the outer loop on φ and the inner loops on λ and λ′.

Written once against the protocols of `types.py`: it runs on the exact token MDP and on a
Hugging Face model alike. `method="alternating"` is the standard online RLHF it is
compared with; `pseudocode="printed"` reproduces the paper's slips (errata 1–4) so that
tests can show they matter.
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from rlhf_bilevel import estimators as est
from rlhf_bilevel.config import BilevelConfig
from rlhf_bilevel.steps import Stepper
from rlhf_bilevel.types import LAMBDA, LAMBDA_PRIME, Critic, Oracle, Policy, PreferencePairs, RewardModel, Rollout, RolloutSource

PairsCallback = Callable[[PreferencePairs, dict], None]
InnerCallback = Callable[[int, dict], None]


class Bilevel:
    def __init__(
        self,
        policy: Policy,
        reward: RewardModel,
        source: RolloutSource,
        oracle: Oracle,
        make_critic: Callable[[str], Critic],
        cfg: BilevelConfig,
        generator: torch.Generator,
        on_pairs: PairsCallback | None = None,
        on_inner: InnerCallback | None = None,
    ):
        self.policy, self.reward, self.source, self.oracle, self.cfg = policy, reward, source, oracle, cfg
        self.generator = generator
        self.on_pairs = on_pairs
        self.on_inner = on_inner
        self.bilevel = cfg.method == "bilevel"
        self.printed = cfg.pseudocode == "printed"
        adapters = (LAMBDA, LAMBDA_PRIME) if self.bilevel else (LAMBDA,)
        self.critics = {name: make_critic(name) for name in adapters}
        self.policy_steps = {name: Stepper(policy.parameters_of(name), cfg.policy_step, ascend=True) for name in adapters}
        self.reward_step = Stepper(reward.parameters(), cfg.reward_step, ascend=False)
        self.t = 0  # outer iterations done
        self.oracle_pairs = 0

    # -- oracle -----------------------------------------------------------------------------------
    def label(self, pairs: PreferencePairs, inner_step: int) -> PreferencePairs:
        """Asks the oracle once per pair; every labelled pair is counted and handed to `on_pairs`."""
        rollout = pairs.rollout
        prompts = [rollout.prompts[i] for i in pairs.first.tolist()]
        first = [rollout.responses[i] for i in pairs.first.tolist()]
        second = [rollout.responses[i] for i in pairs.second.tolist()]
        pairs.prob = self.oracle.compare(prompts, first, second).float()
        if self.cfg.labels == "sample":
            pairs.label = torch.bernoulli(pairs.prob, generator=self.generator)
        else:
            pairs.label = pairs.prob
        self.oracle_pairs += len(pairs)
        if self.on_pairs is not None:
            self.on_pairs(pairs, {"outer_step": self.t, "inner_step": inner_step, "policy": rollout.adapter})
        return pairs

    # -- the lower level -------------------------------------------------------------------------
    def ascent_on_J(self, adapter: str, rollout: Rollout) -> tuple[list[torch.Tensor], torch.Tensor, dict[str, float]]:
        """Critic fit (Algorithm 2) then ∇J by eq. 12, for one adapter. Returns (∇J, log π, diagnostics)."""
        cfg = self.cfg
        with torch.no_grad():
            shaped = est.shaped_rewards(rollout, self.reward.token_rewards(rollout), cfg.beta)
        critic = self.critics[adapter]
        diagnostics = critic.fit(rollout, shaped)
        diagnostics["lower/J"] = (rollout.weight * est.returns(rollout, shaped, cfg.gamma)).sum().item()
        diagnostics["lower/kl"] = est.kl_to_reference(rollout).item()
        with self.policy.adapter(adapter):
            log_probs = self.policy.log_probs(rollout)
        advantage = critic.advantages(rollout, shaped, log_probs)
        params = self.policy.parameters_of(adapter)
        return est.grad_J_lambda(log_probs, params, rollout, advantage, cfg.gamma), log_probs, diagnostics

    def inner_step(self, k: int) -> dict[str, float]:
        """Step k of the inner loop; its metrics come from the rollouts it drew anyway."""
        cfg = self.cfg
        rollout = self.source.rollouts(LAMBDA, cfg.trajectories_per_step)
        d_k, _, metrics = self.ascent_on_J(LAMBDA, rollout)
        metrics["lower/d_norm"] = self.policy_steps[LAMBDA].step(d_k)
        if not self.bilevel:
            return metrics
        pairs = self.label(self.source.pairs(LAMBDA_PRIME, cfg.pairs_per_step), k)
        if self.printed:
            d_prime = d_k  # erratum 3: line 10 steps λ′ along d_k, so λ′ ≡ λ
        else:
            # d'_k = ∇J(λ′, φ) − σ ∇f(φ, λ′)  (ALGORITHM.md step 4; erratum 2)
            grad_J, log_probs, diagnostics = self.ascent_on_J(LAMBDA_PRIME, pairs.rollout)
            metrics["lower/J_prime"] = diagnostics["lower/J"]
            with torch.no_grad():
                rewards = self.reward.token_rewards(pairs.rollout)
                losses = est.upper_loss(est.pair_margins(rewards, pairs), pairs.label, cfg.upper_loss)
            grad_f = est.grad_f_lambda(log_probs, self.policy.parameters_of(LAMBDA_PRIME), pairs, losses)
            d_prime = est.penalised_direction(grad_J, grad_f, cfg.sigma)
        metrics["lower/d_prime_norm"] = self.policy_steps[LAMBDA_PRIME].step(d_prime)
        return metrics

    # -- the upper level -------------------------------------------------------------------------
    def hypergradient(self) -> tuple[list[torch.Tensor], dict[str, float]]:
        cfg = self.cfg
        phi = self.reward.parameters()
        budget = cfg.pairs_per_step if self.bilevel else cfg.pairs_per_outer_step
        f_adapter = LAMBDA_PRIME if self.bilevel and cfg.f_at == "lambda_prime" and not self.printed else LAMBDA
        pairs = self.label(self.source.pairs(f_adapter, budget), cfg.inner_steps)
        grad_f, losses = est.grad_f_phi(self.reward.token_rewards(pairs.rollout), phi, pairs, cfg.upper_loss)
        metrics = {"upper/loss": (pairs.weight * losses).sum().item()}
        traj = self.source.rollouts(LAMBDA, cfg.trajectories_per_step)
        rewards = self.reward.token_rewards(traj)
        metrics["lower/J"] = est.objective_value(traj, rewards.detach(), cfg.beta, cfg.gamma).item()
        metrics["lower/kl"] = est.kl_to_reference(traj).item()
        if not self.bilevel:
            return grad_f, metrics
        grad_J = est.grad_J_phi(rewards, phi, traj, cfg.gamma)
        traj_prime = pairs.rollout if f_adapter == LAMBDA_PRIME else self.source.rollouts(LAMBDA_PRIME, cfg.trajectories_per_step)
        rewards_prime = self.reward.token_rewards(traj_prime)
        grad_J_prime = est.grad_J_phi(rewards_prime, phi, traj_prime, cfg.gamma)
        J_prime = est.objective_value(traj_prime, rewards_prime.detach(), cfg.beta, cfg.gamma).item()
        metrics["penalty/gap"] = metrics["lower/J"] - J_prime
        if self.printed:  # erratum 1: the penalty enters with the opposite sign
            grad_J, grad_J_prime = grad_J_prime, grad_J
        return est.hypergradient(grad_f, grad_J, grad_J_prime, cfg.sigma), metrics

    def outer_step(self) -> dict[str, float]:
        """One outer iteration t: K inner steps on λ (and λ′), then one step of φ along d_t."""
        start = time.perf_counter()
        metrics: dict[str, float] = {}
        for k in range(self.cfg.inner_steps):
            inner = self.inner_step(k)
            inner["oracle/pairs"] = float(self.oracle_pairs)
            if self.on_inner is not None:
                self.on_inner(k, inner)
        d_t, upper = self.hypergradient()
        metrics.update(upper)
        metrics["upper/d_norm"] = self.reward_step.step(d_t)
        self.t += 1
        metrics["oracle/pairs"] = float(self.oracle_pairs)
        metrics["time/outer_s"] = time.perf_counter() - start
        return metrics

    def state_dict(self) -> dict:
        return {
            "t": self.t,
            "oracle_pairs": self.oracle_pairs,
            "policy_steps": {k: s.state_dict() for k, s in self.policy_steps.items()},
            "reward_step": self.reward_step.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.t = state["t"]
        self.oracle_pairs = state["oracle_pairs"]
        for name, step in self.policy_steps.items():
            step.load_state_dict(state["policy_steps"][name])
        self.reward_step.load_state_dict(state["reward_step"])
