"""Every gradient estimator of Algorithm 1, each a named function (docs/algorithm.md, steps 3–6).

Each one is a weighted sum over a batch: with sample weights 1/N it is the stochastic
estimator of the paper; with the exact trajectory probabilities as weights (an
enumerated rollout) the very same expression is the exact gradient, because
Σ_τ p(τ) ∇log p(τ) g(τ) = ∇ Σ_τ p(τ) g(τ). Gradients are lists of tensors, one per
parameter, as `torch.autograd.grad` returns them.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from rlhf_bilevel.types import PreferencePairs, Rollout, Transitions

Grads = list[Tensor]
UpperLoss = Literal["bt_nll", "disagreement"]


def discounts(horizon: int, gamma: float, like: Tensor) -> Tensor:
    """γ^h for h = 0 … H−1 (the time index: erratum 5 of eq. 15), in `like`'s dtype and on its device."""
    return (gamma ** torch.arange(horizon, dtype=torch.float64, device=like.device)).to(like.dtype)


def taken_log_probs(log_probs: Tensor, rollout: Rollout) -> Tensor:
    """[N, H] log π(a_h|s_h) of the taken tokens, zero after EOS."""
    return log_probs.gather(-1, rollout.tokens.unsqueeze(-1)).squeeze(-1) * rollout.mask


def shaped_rewards(rollout: Rollout, rewards: Tensor, beta: float) -> Tensor:
    """r̃ = r_φ(s,a) − β log(π(a|s)/π_ref(a|s)), the per-token reward of J (eq. 2)."""
    return (rewards - beta * (rollout.logp - rollout.ref_logp)) * rollout.mask


def returns(rollout: Rollout, rewards: Tensor, gamma: float) -> Tensor:
    """[N] Σ_h γ^h r_h per trajectory."""
    return (rewards * rollout.mask * discounts(rollout.horizon, gamma, rewards)).sum(-1)


def objective_value(rollout: Rollout, rewards: Tensor, beta: float, gamma: float) -> Tensor:
    """Ĵ(λ, φ): the weighted mean discounted shaped return (eq. 2)."""
    return (rollout.weight * returns(rollout, shaped_rewards(rollout, rewards, beta), gamma)).sum()


def kl_to_reference(rollout: Rollout) -> Tensor:
    """Σ_h log(π/π_ref) along the trajectory, averaged: the sequence-level KL estimate."""
    return (rollout.weight * ((rollout.logp - rollout.ref_logp) * rollout.mask).sum(-1)).sum()


def pair_margins(rollout_rewards: Tensor, pairs: PreferencePairs) -> Tensor:
    """R_φ(τ0) − R_φ(τ1) with R_φ(τ) = Σ_h r_φ(s_h, a_h) (eq. 8, undiscounted): [B] from rewards
    [N, H], or [E, B] from an ensemble's [E, N, H]."""
    totals = (rollout_rewards * pairs.rollout.mask).sum(-1)
    return totals[..., pairs.first] - totals[..., pairs.second]


def upper_loss(margins: Tensor, label: Tensor, kind: UpperLoss) -> Tensor:
    """ℓ(φ; τ0, τ1, y) per pair; y = 1 means τ0 preferred. Both forms are linear in y.

    `disagreement` is the paper's U (eq. 7): the BT probability of the ordering the
    oracle rejected. `bt_nll` is the usual reward-model loss (eq. 1, κ = −log sigmoid).
    """
    if kind == "bt_nll":
        return -(label * F.logsigmoid(margins) + (1 - label) * F.logsigmoid(-margins))
    if kind == "disagreement":
        return label * torch.sigmoid(-margins) + (1 - label) * torch.sigmoid(margins)
    raise ValueError(f"unknown upper loss {kind!r}")


def advantages(taken: Tensor, values: Tensor, rollout: Rollout) -> Tensor:
    """[N, H] A(s,a) = Q(s,a) − V(s) of the taken tokens (eq. 12), from `taken` Q(s_h, a_h) and
    `values` V(s_h) = Σ_a π(a|s_h) Q(s_h, a), the baseline docs/algorithm.md asks to be exact."""
    return (taken - values) * rollout.mask


def q_advantages(q_values: Tensor, log_probs: Tensor, rollout: Rollout) -> Tensor:
    """`advantages` from a table of Q(s_h, ·) over every action."""
    values = (log_probs.detach().exp() * q_values).sum(-1)
    return advantages(q_values.gather(-1, rollout.tokens.unsqueeze(-1)).squeeze(-1), values, rollout)


def surrogate_J_lambda(log_probs: Tensor, rollout: Rollout, advantage: Tensor, gamma: float) -> Tensor:
    """The scalar whose gradient in λ is eq. 12: E_τ Σ_h γ^h log π_λ(a_h|s_h) · A(s_h, a_h), A detached."""
    weighted = discounts(rollout.horizon, gamma, advantage) * advantage.detach()
    return (rollout.weight * (taken_log_probs(log_probs, rollout) * weighted).sum(-1)).sum()


def grad_J_lambda(log_probs: Tensor, params: list[Tensor], rollout: Rollout, advantage: Tensor, gamma: float) -> Grads:
    """∇_λ J by the critic (eq. 12): E_τ Σ_h γ^h ∇_λ log π_λ(a_h|s_h) · A(s_h, a_h).

    Summed over h and averaged over trajectories, so it is unbiased for ∇J itself (not
    ∇J / H); the scale matters where it is combined with σ∇f in d'_k. The KL term of J
    needs no extra score term: E_a[∇ log π(a|s)] = 0, and Q is that of the shaped reward.
    """
    return list(torch.autograd.grad(surrogate_J_lambda(log_probs, rollout, advantage, gamma), params, retain_graph=True))


def rewards_to_go(rollout: Rollout, shaped: Tensor, gamma: float) -> Tensor:
    """[N, H] G_h = Σ_{h' ≥ h} γ^(h'−h) r̃_h': the Monte-Carlo estimate of Q(s_h, a_h)."""
    masked = shaped * rollout.mask
    out = torch.zeros_like(masked)
    running = torch.zeros_like(masked[:, 0])
    for h in reversed(range(rollout.horizon)):
        running = masked[:, h] + gamma * running
        out[:, h] = running
    return out * rollout.mask


def leave_one_out_baseline(losses: Tensor, weight: Tensor, total: Tensor | None = None, count: int | None = None) -> Tensor:
    """b_i = mean of the other pairs' losses: independent of pair i, so the estimator stays unbiased.

    When `losses` are one process's shard of a batch, `total` and `count` are the sum and
    number of the losses of the whole batch, so that b_i is the one of the whole batch.
    With exact (enumerated) weights there is no sampling noise to reduce and the
    baseline is zero.
    """
    n = losses.shape[0]
    if total is None or count is None:
        total, count = losses.sum(), n
    if count < 2 or not torch.allclose(weight, weight.new_full((n,), 1.0 / n)):
        return torch.zeros_like(losses)
    return (total - losses) / (count - 1)


def surrogate_f_lambda(log_probs: Tensor, pairs: PreferencePairs, losses: Tensor, total: Tensor | None = None, count: int | None = None) -> Tensor:
    """The scalar whose gradient in λ is eq. 17: E[(ℓ − b) · (log π_λ(τ0) + log π_λ(τ1))], ℓ and b detached."""
    losses = losses.detach()
    centred = losses - leave_one_out_baseline(losses, pairs.weight, total, count)
    sequence = taken_log_probs(log_probs, pairs.rollout).sum(-1)
    return (pairs.weight * centred * (sequence[pairs.first] + sequence[pairs.second])).sum()


def grad_f_lambda(
    log_probs: Tensor, params: list[Tensor], pairs: PreferencePairs, losses: Tensor, total: Tensor | None = None, count: int | None = None
) -> Grads:
    """∇_λ f by the score function (eq. 17), both responses carrying score terms.

    ∇_λ f = E[(ℓ − b) · (Σ_h ∇ log π_λ(τ0) + Σ_h ∇ log π_λ(τ1))]; ℓ does not depend on λ,
    only the sampling distribution does. `losses` are the per-pair ℓ (detached); `total`
    and `count` as in `leave_one_out_baseline`.
    """
    return list(torch.autograd.grad(surrogate_f_lambda(log_probs, pairs, losses, total, count), params))


def store_loss(rewards: list[Tensor], batches: list[PreferencePairs], weights: Tensor, kind: UpperLoss) -> Tensor:
    """f̂(φ) on the preference store: Σ_b w_b Σ_i p_bi ℓ(φ; τ0, τ1, y)_bi / Σ_b w_b, differentiable in φ.

    `rewards[b]` is r_φ on batch b's rollout, [N, H], or an ensemble's [E, N, H] (then f̂ is the mean of
    the members' own); p_bi its pair weights (1/B for samples); w_b the batch's weight (recency). With
    one batch it is the theorem's f̂(φ, λ′) of step 6 (docs/algorithm.md, "Every label counts"); with
    every batch of a run, older ones were drawn from older policies.
    """
    weights = weights.to(rewards[0].device, rewards[0].dtype)
    terms = [
        (pairs.weight * upper_loss(pair_margins(r, pairs), pairs.label, kind)).sum(-1).mean() for r, pairs in zip(rewards, batches)
    ]
    return (torch.stack(terms) * weights).sum() / weights.sum()


def pooled_reward_return(rewards: list[Tensor], rollouts: list[Rollout], gamma: float) -> Tensor:
    """Σ_h γ^h r_φ(s_h, a_h), averaged over every trajectory of several rollouts of one policy: the
    φ-dependent part of Ĵ(λ, φ), whose gradient is Lemma 5's ∇φĴ (eq. 14–15) on the pooled sample.
    Each rollout counts in proportion to its size (its weights sum to one)."""
    sizes = torch.tensor([len(r) for r in rollouts], dtype=rewards[0].dtype, device=rewards[0].device)
    means = torch.stack([(rollout.weight * returns(rollout, r, gamma)).sum() for r, rollout in zip(rewards, rollouts)])
    return (means * sizes).sum() / sizes.sum()


def grad_J_phi(rewards: list[Tensor], params: list[Tensor], rollouts: list[Rollout], gamma: float) -> Grads:
    """∇_φ J(λ, φ) by Lemma 5 (eq. 14–15): E_τ∼π_λ Σ_h γ^h ∇_φ r_φ(s_h, a_h), on every trajectory of
    `rollouts`, all drawn from π_λ (`pooled_reward_return`).

    `rewards[i]` is r_φ on `rollouts[i]`, differentiable in φ; the KL term does not depend on φ.
    """
    return list(torch.autograd.grad(pooled_reward_return(rewards, rollouts, gamma), params))


def grad_f_phi(rewards: list[Tensor], params: list[Tensor], batches: list[PreferencePairs], weights: Tensor, kind: UpperLoss) -> tuple[Grads, Tensor]:
    """∇_φ f̂ = E[∇_φ ℓ(φ; τ0, τ1, y)] on labelled batches (`store_loss`); returns (gradient, f̂ detached)."""
    loss = store_loss(rewards, batches, weights, kind)
    return list(torch.autograd.grad(loss, params)), loss.detach()


def grad_anchor_prior(params: list[Tensor], anchor: list[Tensor], strength: float, labels: int) -> Grads:
    """∇_φ (c/N)‖φ − φ₀‖² = (2c/N)(φ − φ₀): the prior of φ's multi-step fit, fading as the labels N
    grow (docs/algorithm.md, "Several steps per outer iteration")."""
    scale = 2 * strength / max(labels, 1)
    return [scale * (p.detach() - a) for p, a in zip(params, anchor)]


def cosine(a: Grads, b: Grads) -> float:
    """cos∠(a, b) of two gradients; NaN where either is zero."""
    dot = sum((x.double() * y.double()).sum() for x, y in zip(a, b))
    norms = torch.sqrt(sum((x.double() ** 2).sum() for x in a) * sum((y.double() ** 2).sum() for y in b))
    return (dot / norms).item() if norms > 0 else float("nan")


def hypergradient(grad_f: Grads, grad_J_lambda_star: Grads, grad_J_lambda_sigma: Grads, sigma: float) -> Grads:
    """d_t = ∇_φ f(φ, λ') + (∇_φ J(λ, φ) − ∇_φ J(λ', φ)) / σ  (docs/algorithm.md step 6; eq. 11 corrected).

    The gradient of the penalty objective L_σ; φ descends it.
    """
    return [gf + (gs - gp) / sigma for gf, gs, gp in zip(grad_f, grad_J_lambda_star, grad_J_lambda_sigma)]


def penalised_direction(grad_J: Grads, grad_f: Grads, sigma: float) -> Grads:
    """d'_k = ∇_λ' J(λ', φ) − σ ∇_λ' f(φ, λ'): ascent on J − σ f (docs/algorithm.md step 4, erratum 2).

    Linear, so it may as well combine the two surrogates ([Ĵ], [f̂]) before one backward pass.
    """
    return [gj - sigma * gf for gj, gf in zip(grad_J, grad_f)]


def transitions(rollout: Rollout, features: Tensor, shaped: Tensor, policy: Tensor) -> Transitions:
    """The (s, a, r̃, s', a', π(·|s'), done) tuples of a rollout, for the critic's replay (Algorithm 2).

    a' is the token the policy actually sampled at s' (on-policy, Algorithm 2 line 4); `policy`
    [N, H, k] summarises π(·|s_h) for the expected target Σ_a' π(a'|s') Q(s', a'), whose variance
    does not include the draw of a'.
    """
    n, horizon = rollout.tokens.shape
    valid = rollout.mask.bool()
    next_valid = torch.zeros_like(valid)
    next_valid[:, :-1] = valid[:, 1:]
    next_action = torch.zeros_like(rollout.tokens)
    next_action[:, :-1] = rollout.tokens[:, 1:]
    next_policy = torch.zeros_like(policy)  # s_H, past the horizon, is terminal: its π is never read
    next_policy[:, :-1] = policy[:, 1:]
    return Transitions(
        state=features[:, :horizon][valid],
        action=rollout.tokens[valid],
        reward=shaped.detach()[valid],
        next_state=features[:, 1:][valid],
        next_action=next_action[valid],
        next_policy=next_policy[valid],
        done=(~next_valid)[valid].float(),
    )
