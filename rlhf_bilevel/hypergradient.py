"""d_t, the direction φ descends (docs/algorithm.md step 6, eq. 14–15, and "The φ update in practice")."""

from __future__ import annotations

import torch

from rlhf_bilevel import estimators as est
from rlhf_bilevel.collectives import Collectives
from rlhf_bilevel.config import BilevelConfig
from rlhf_bilevel.steps import norm
from rlhf_bilevel.types import LAMBDA, LAMBDA_PRIME, PreferencePairs, RewardModel, Rollout


class Hypergradient:
    """d_t = ∇φ f̂ + prior + (∇φĴ(λ) − ∇φĴ(λ′))/σ at the current φ of `reward`, averaged over `world`.

    The alternating method's is ∇φ f̂ + prior alone; `pseudocode: printed` gives the penalty the
    opposite sign (erratum 1). The prior pulls towards φ₀, the weights `reward` has when this is built.
    """

    def __init__(self, reward: RewardModel, cfg: BilevelConfig, world: Collectives):
        self.reward, self.cfg, self.world = reward, cfg, world
        self.anchor = [p.detach().clone() for p in reward.parameters()]  # φ₀, where the fit's prior pulls

    def __call__(
        self, batches: list[PreferencePairs], weights: torch.Tensor, sets: dict[str, list[Rollout]], labels: int
    ) -> tuple[list[torch.Tensor], dict[str, float]]:
        """d_t on the stored `batches` (weighted by `weights`), with the prior of `labels` labels in
        all, and for the bilevel method the penalty on the trajectories of each policy in `sets`."""
        cfg, fit = self.cfg, self.cfg.reward_fit
        phi = self.reward.parameters()
        # each member of an ensemble fits the labels on its own: trained through their mean, they would move together
        grad_f, f_hat = est.grad_f_phi([self.reward.member_rewards(p.rollout) for p in batches], phi, batches, weights, cfg.upper_loss)
        if fit.prior:
            grad_f = [g + p for g, p in zip(grad_f, est.grad_anchor_prior(phi, self.anchor, fit.prior, labels))]
        grad_f = self.world.mean(grad_f)
        (store_loss,) = self.world.mean([f_hat])
        metrics = {"upper/store_loss": store_loss.item(), "upper/grad_f_norm": norm(grad_f).item()}
        if cfg.method != "bilevel":
            return grad_f, metrics
        grad_J, grad_J_prime = (
            self.world.mean(est.grad_J_phi([self.reward.token_rewards(r) for r in sets[name]], phi, sets[name], cfg.gamma))
            for name in (LAMBDA, LAMBDA_PRIME)
        )
        if cfg.pseudocode == "printed":  # erratum 1: the penalty enters with the opposite sign
            grad_J, grad_J_prime = grad_J_prime, grad_J
        # every step of the fit follows the whole penalty: counted once per outer step instead (÷S), the
        # fit's fixed point is L_{Sσ}'s, and the exact lab stalled at a gap that grew with S towards the
        # alternating method's (docs/results.md)
        d_t = est.hypergradient(grad_f, grad_J, grad_J_prime, cfg.sigma)
        penalty = [(a - b) / cfg.sigma for a, b in zip(grad_J, grad_J_prime)]
        metrics.update({"upper/penalty_norm": norm(penalty).item(), "upper/cosine_f_penalty": est.cosine(grad_f, penalty)})
        return d_t, metrics
