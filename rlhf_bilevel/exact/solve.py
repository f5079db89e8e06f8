"""Exact quantities on the enumerated tree: J, f, Q, λ*(φ), λ_σ(φ), Φ(φ), L_σ(φ), ∇Φ, ∇L_σ, Φ*.

Policies here are tables of log-probabilities [S, V] over every state (policy space), so
λ*(φ) has a closed form (soft backward induction, β > 0) through which autograd gives
the true hypergradient ∇Φ; λ_σ(φ) is found by ascent on J − σ f in that space.
Also the exact `RolloutSource` and critic, so Algorithm 1 can run on exact gradients.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from rlhf_bilevel.estimators import UpperLoss, q_advantages, upper_loss
from rlhf_bilevel.exact.models import ExactPolicy, ExactReward, GoldOracle
from rlhf_bilevel.exact.tree import TokenTree
from rlhf_bilevel.types import PreferencePairs, Rollout


@dataclass(frozen=True)
class Problem:
    """Everything that defines the bilevel problem besides φ and the policy."""

    tree: TokenTree
    ref: Tensor  # [S, V] log π_ref
    gold: GoldOracle
    beta: float
    gamma: float
    loss: UpperLoss


def q_values(problem: Problem, logp: Tensor, rewards: Tensor) -> tuple[Tensor, Tensor]:
    """Q^π(s, a) and V^π(s) of the shaped reward r − β log(π/π_ref), by backward induction."""
    tree = problem.tree
    shaped = rewards[tree.child] - problem.beta * (logp - problem.ref)
    value = torch.zeros(tree.num_nodes, dtype=logp.dtype)
    q = torch.zeros_like(logp)
    for at in reversed(tree.states_at_depth):
        cont = (~tree.child_terminal[at]).to(logp.dtype)
        q_h = shaped[at] + problem.gamma * cont * value[tree.child[at]]
        q = q.index_put((at,), q_h)
        value = value.index_put((tree.state_nodes[at],), (logp[at].exp() * q_h).sum(-1))
    return q, value


def soft_optimal(problem: Problem, rewards: Tensor) -> Tensor:
    """log π*(·|s) ∝ log π_ref + Q*/β: the unique maximiser of J(·, φ) when β > 0 (λ*(φ))."""
    tree = problem.tree
    value = torch.zeros(tree.num_nodes, dtype=rewards.dtype)
    logp = torch.zeros_like(problem.ref)
    for at in reversed(tree.states_at_depth):
        cont = (~tree.child_terminal[at]).to(rewards.dtype)
        q_h = rewards[tree.child[at]] + problem.gamma * cont * value[tree.child[at]]
        logits = problem.ref[at] + q_h / problem.beta
        logp = logp.index_put((at,), torch.log_softmax(logits, -1))
        value = value.index_put((tree.state_nodes[at],), problem.beta * torch.logsumexp(logits, -1))
    return logp


def objective(problem: Problem, logp: Tensor, rewards: Tensor) -> Tensor:
    """J(π, φ) = E_x V^π(x) with the uniform prompt distribution ν."""
    _, value = q_values(problem, logp, rewards)
    return value[problem.tree.roots].mean()


def leaf_probs(problem: Problem, logp: Tensor) -> Tensor:
    """ν(x)·π(τ|x) for every complete trajectory τ."""
    tree = problem.tree
    states = tree.path_states(tree.leaf_path)
    taken = logp[states].gather(-1, tree.leaf_tokens.unsqueeze(-1)).squeeze(-1) * tree.leaf_mask
    return taken.sum(-1).exp() / tree.prompts


def upper(problem: Problem, logp: Tensor, rewards: Tensor) -> Tensor:
    """f(φ, π) = E_x E_{τ0,τ1∼π} E_y ℓ(φ; τ0, τ1, y), summed exactly over every pair."""
    tree = problem.tree
    prob = leaf_probs(problem, logp)
    score = (rewards[tree.leaf_path[:, 1:]] * tree.leaf_mask).sum(-1)
    first, second = tree.leaf_pairs
    gold = problem.gold.leaf_gold
    label = torch.sigmoid((gold[first] - gold[second]) / problem.gold.temperature)
    weight = prob[first] * prob[second] * tree.prompts
    return (weight * upper_loss(score[first] - score[second], label, problem.loss)).sum()


def weight_decay(reward: ExactReward, decay: float) -> Tensor:
    """ρ/2 ‖φ‖²: the term the reward's step adds to the upper objective (StepConfig.weight_decay)."""
    return decay / 2 * sum((p**2).sum() for p in reward.parameters())


def phi(problem: Problem, reward: ExactReward, decay: float = 0.0) -> Tensor:
    """Φ(φ) = f(φ, λ*(φ)) (+ ρ/2 ‖φ‖²), differentiable in φ through the soft-optimal policy."""
    rewards = reward.node_rewards()
    return upper(problem, soft_optimal(problem, rewards), rewards) + weight_decay(reward, decay)


def penalty_policy(problem: Problem, rewards: Tensor, sigma: float, start: Tensor | None = None, steps: int = 300) -> Tensor:
    """λ_σ(φ) = argmax_π J(π, φ) − σ f(φ, π), by L-BFGS on the logits from `start` (log π; π*(φ) if None)."""
    rewards = rewards.detach()
    start = soft_optimal(problem, rewards) if start is None else start
    logits = start.detach().clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS([logits], lr=1, max_iter=steps, tolerance_grad=1e-12, tolerance_change=1e-14, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        logp = torch.log_softmax(logits, -1)
        loss = -(objective(problem, logp, rewards) - sigma * upper(problem, logp, rewards))
        loss.backward()
        return loss

    optimizer.step(closure)
    return torch.log_softmax(logits.detach(), -1)


class PenaltyValue:
    """φ ↦ L_σ(φ) = f(φ, λ_σ) + (J*(φ) − J(λ_σ, φ)) / σ (+ ρ/2 ‖φ‖²) (docs/algorithm.md, penalty reformulation).

    λ* and λ_σ enter detached: both maximise in λ, so by the envelope theorem the gradient in
    φ of this expression is ∇L_σ itself.

    Called again at a nearby φ (as `minimise` does), the search for λ_σ starts from the last
    λ_σ rather than from π*(φ): on the lab's problem a quarter of the evaluations, and it stops
    as near the maximiser as from π* does (both within 1e-5 in π of a Newton-polished one; the
    least curvature there, 3e-4, lets L-BFGS's tolerances get no nearer from either start).
    """

    def __init__(self, problem: Problem, sigma: float, decay: float = 0.0):
        self.problem, self.sigma, self.decay = problem, sigma, decay
        self.lam_sigma: Tensor | None = None

    def __call__(self, reward: ExactReward) -> Tensor:
        problem, sigma = self.problem, self.sigma
        rewards = reward.node_rewards()
        star = soft_optimal(problem, rewards.detach())
        self.lam_sigma = penalty_policy(problem, rewards, sigma, start=self.lam_sigma)
        return (
            upper(problem, self.lam_sigma, rewards)
            + (objective(problem, star, rewards) - objective(problem, self.lam_sigma, rewards)) / sigma
            + weight_decay(reward, self.decay)
        )


def penalty_value(problem: Problem, reward: ExactReward, sigma: float, decay: float = 0.0) -> Tensor:
    """L_σ(φ) at one φ, its λ_σ searched from π*(φ) (`PenaltyValue`)."""
    return PenaltyValue(problem, sigma, decay)(reward)


def minimise(reward: ExactReward, loss: Callable[[ExactReward], Tensor], max_iter: int = 1000) -> float:
    """Exact L-BFGS on the reward's weights, in place, from where they are; returns the final loss."""
    optimizer = torch.optim.LBFGS(
        reward.parameters(), lr=1, max_iter=max_iter, tolerance_grad=1e-12, tolerance_change=1e-15, line_search_fn="strong_wolfe"
    )

    def closure() -> Tensor:
        optimizer.zero_grad()
        value = loss(reward)
        value.backward()
        return value

    optimizer.step(closure)
    with torch.no_grad():
        return loss(reward).item()


class ExactRollouts:
    """A `RolloutSource` that enumerates: every trajectory, and every prompt-matched pair,
    weighted by its exact probability. Fed to Algorithm 1, it gives exact gradients."""

    def __init__(self, policy: ExactPolicy):
        self.policy = policy

    @torch.no_grad()
    def rollouts(self, adapter: str, n: int) -> Rollout:
        tree, policy = self.policy.tree, self.policy
        with policy.adapter(adapter):
            table = policy.table()
        with policy.adapter(None):
            ref_table = policy.table()
        prompts = tree.leaf_prompt.tolist()
        weight = torch.zeros(len(prompts))
        rollout = policy.rollout(prompts, tree.leaf_tokens, tree.leaf_mask, tree.leaf_path, table, ref_table, weight)
        rollout.weight = (rollout.logp.sum(-1)).exp() / tree.prompts
        rollout.adapter = adapter
        return rollout

    def coupled(self, adapters: Sequence[str], n: int) -> list[Rollout]:
        """Enumerations have no noise to share: each adapter's, exactly."""
        return [self.rollouts(adapter, n) for adapter in adapters]

    def pairs(self, adapter: str, n: int) -> PreferencePairs:
        rollout = self.rollouts(adapter, n)
        prob = rollout.weight * rollout.weight.new_tensor(self.policy.tree.prompts)
        first, second = self.policy.tree.leaf_pairs
        weight = prob[first] * prob[second] / self.policy.tree.prompts
        return PreferencePairs(rollout=rollout, first=first, second=second, weight=weight)


class ExactCritic:
    """Q^π_φ by backward induction: the critic with no approximation error (for exact runs)."""

    def __init__(self, problem: Problem, policy: ExactPolicy, reward: ExactReward, adapter: str):
        self.problem, self.policy, self.reward, self.adapter = problem, policy, reward, adapter

    def fit(self, rollout: Rollout, shaped: Tensor, log_probs: Tensor) -> dict[str, float]:
        return {}


    def relabel(self, shaped_of) -> None:
        pass  # Q is recomputed from the policy and the reward at every use
    def state_dict(self) -> dict:  # nothing is learnt: Q is recomputed from the policy each time
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def advantages(self, rollout: Rollout, shaped: Tensor, log_probs: Tensor) -> Tensor:
        return q_advantages(self.q_values(rollout), log_probs, rollout)

    @torch.no_grad()
    def q_values(self, rollout: Rollout) -> Tensor:
        with self.policy.adapter(self.adapter):
            q, _ = q_values(self.problem, self.policy.table(), self.reward.node_rewards())
        return q[self.policy.tree.path_states(rollout.context)]
