"""Where each method comes to rest on the exact problem, and what its policy is worth in gold.

Algorithm 1 converges to the minimiser of the upper objective Φ(φ) = f(φ, λ*(φ)) (up to its σ bias,
docs/theory.md): the reward model whose own optimal policy writes the responses it orders best.
The alternating method refits φ to the pairs of the policy it has, then lets the policy follow: where
it comes to rest, φ is the best fit to its own policy's pairs *holding that policy fixed*,

    φ_alt = argmin_φ f(φ, λ*(φ_alt)) + ρ/2 ‖φ‖²,

the "performatively stable" point of repeated risk minimisation (Perdomo, Zrnic, Mendler-Dünner and
Hardt, "Performative Prediction", ICML 2020), where argmin Φ is their "performatively optimal" one.
Neither objective is gold: Φ rewards a reward model that keeps its policy where it predicts the
oracle well, whatever that policy's gold. `fixed_points` measures both ends on the exact problem,
and the gold E_{τ∼λ*(φ)} R*(τ) and KL(λ*(φ) ‖ π_ref) of each one's policy, beside π_ref and the
policy that is soft-optimal for the gold reward itself (the best any reward model could induce at β).
Each policy's shortfall, the most gold any policy gets at its KL less its own, tells a policy that
moved in a worse direction from one that moved less far along a good one.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch
from torch import Tensor
from torch.nn.utils import parameters_to_vector

from rlhf_bilevel.exact import solve
from rlhf_bilevel.exact.models import ExactReward


class Unsettled(RuntimeError):
    """The alternating method's refits cycle or drift on this problem: it has no resting point to compare."""


@dataclass(frozen=True)
class PolicyValue:
    """An exact policy's worth: its gold, its KL from the reference, and Φ of the reward that induced it."""

    gold: float  # E_x E_{τ∼π(·|x)} R*(τ)
    kl: float  # E_x KL(π(·|x) ‖ π_ref(·|x)), over whole responses
    shortfall: float  # the most gold any policy gets at this KL (`frontier_gold`), less this policy's
    phi: float | None = None  # Φ(φ) (+ ρ/2 ‖φ‖²), where a reward model induced the policy


def gold_and_kl(problem: solve.Problem, logp: Tensor) -> tuple[float, float]:
    """Gold and KL of the policy `logp` ([S, V] log-probabilities), summed exactly over every trajectory."""
    tree = problem.tree
    with torch.no_grad():
        prob = solve.leaf_probs(problem, logp)  # ν(x)·π(τ|x)
        states = tree.path_states(tree.leaf_path)
        log_ratio = (logp - problem.ref)[states].gather(-1, tree.leaf_tokens.unsqueeze(-1)).squeeze(-1)
        log_ratio = (log_ratio * tree.leaf_mask).sum(-1)
        return (prob * problem.gold.leaf_gold).sum().item(), (prob * log_ratio).sum().item()


def frontier_gold(problem: solve.Problem, kl: float, tolerance: float = 1e-9) -> float:
    """The most gold any policy gets within KL `kl` of π_ref: the policy soft-optimal for the undiscounted gold
    reward at the temperature β′ whose KL is `kl` (it maximises gold − β′·KL, so no policy at that KL has
    more gold), β′ found by bisection on log β′ (its KL falls as β′ grows)."""
    undiscounted = replace(problem, gamma=1.0)

    def at(log_beta: float) -> tuple[float, float]:
        logp = solve.soft_optimal(replace(undiscounted, beta=math.exp(log_beta)), problem.gold.node_gold)
        return gold_and_kl(problem, logp)

    low, high = math.log(1e-4), math.log(1e4)  # KL near its largest, and near 0
    nearest = at(high)
    if kl <= nearest[1]:
        return nearest[0]
    while high - low > tolerance:
        middle = (low + high) / 2
        low, high = (middle, high) if at(middle)[1] > kl else (low, middle)
    return at(high)[0]


def policy_value(problem: solve.Problem, logp: Tensor, phi: float | None = None) -> PolicyValue:
    """Gold and KL of the policy `logp` ([S, V] log-probabilities), and how far its gold falls short of the
    most any policy gets at its KL."""
    gold, kl = gold_and_kl(problem, logp)
    return PolicyValue(gold=gold, kl=kl, shortfall=frontier_gold(problem, kl) - gold, phi=phi)


def induced_value(problem: solve.Problem, reward: ExactReward, decay: float) -> PolicyValue:
    """The worth of λ*(φ), the policy that maximises J under the reward model φ."""
    with torch.no_grad():
        logp = solve.soft_optimal(problem, reward.node_rewards())
        phi = solve.phi(problem, reward, decay).item()
    return policy_value(problem, logp, phi)


def stable_point(problem: solve.Problem, reward: ExactReward, decay: float, rounds: int = 100, tolerance: float = 1e-8) -> int:
    """Moves `reward`, in place, to the alternating method's fixed point, by repeated risk minimisation:
    fit φ exactly to the pairs of λ*(φ_prev) (L-BFGS on f + ρ/2 ‖φ‖², the policy held fixed), then let the
    policy follow. Returns the number of refits it took for φ to move less than `tolerance`; raises
    `Unsettled` if `rounds` refits do not get there."""
    previous = parameters_to_vector(reward.parameters()).detach()
    for refit in range(1, rounds + 1):
        with torch.no_grad():
            logp = solve.soft_optimal(problem, reward.node_rewards())
        solve.minimise(reward, lambda r: solve.upper(problem, logp, r.node_rewards()) + solve.weight_decay(r, decay))
        current = parameters_to_vector(reward.parameters()).detach()
        move = (current - previous).norm().item()
        if move < tolerance:
            return refit
        previous = current
    raise Unsettled(f"the alternating refits did not settle in {rounds} rounds (φ's last move {move:.2e})")


def fixed_points(problem: solve.Problem, bilevel: ExactReward, start: ExactReward, decay: float) -> dict:
    """The worth of each method's resting point on `problem`: `bilevel` is argmin Φ (as `Lab.phi_star`
    finds it), the alternating point is reached by `stable_point` from `start` (moved in place)."""
    refits = stable_point(problem, start, decay)
    with torch.no_grad():
        gold_optimal = solve.soft_optimal(problem, problem.gold.node_gold)
    values = {
        "reference": policy_value(problem, problem.ref),
        "bilevel": induced_value(problem, bilevel, decay),
        "alternating": induced_value(problem, start, decay),
        "gold_optimal": policy_value(problem, gold_optimal),
    }
    return {"refits": refits, **{name: asdict(value) for name, value in values.items()}}
