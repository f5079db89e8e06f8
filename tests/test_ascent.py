"""λ's and λ′'s directions and steps: micro-batches change nothing, and a non-finite critic fit or direction is not applied."""

import copy
import math
from dataclasses import replace

import pytest
import torch

from conftest import flat, perturb
from rlhf_bilevel import estimators as est
from rlhf_bilevel.nonfinite import tensors_in
from rlhf_bilevel.exact.lab import TheoryConfig
from rlhf_bilevel.types import LAMBDA, LAMBDA_PRIME


def sampled(testbed):
    cfg = TheoryConfig.quick().algorithm(inner_steps=3, pairs_per_step=4, trajectories_per_step=4)
    return testbed.algorithm(cfg, testbed.reward(seed=3), exact=False)


@pytest.mark.parametrize("adapter", [LAMBDA, LAMBDA_PRIME])
def test_micro_batches_give_the_whole_batch_direction(testbed, adapter):
    """d_k (λ) and d'_k (λ′, penalty included) taken in pieces of 3 rows of a 10-row batch (pieces that
    split pairs) equal the directions taken at once; a piece given the wrong share of ∂/∂log π fails."""
    algorithm = sampled(testbed)
    ascent = algorithm.ascent
    perturb(algorithm.policy.parameters_of(adapter), 0.3, seed=5)
    pairs = algorithm.label(algorithm.source.pairs(adapter, 5), 0)
    losses = torch.rand(len(pairs), generator=torch.Generator().manual_seed(1))
    penalty = (lambda lp: est.surrogate_f_lambda(lp, pairs, losses)) if adapter == LAMBDA_PRIME else None
    critic, directions = ascent.critics[adapter], []
    critic_state, random_state = copy.deepcopy(critic.state_dict()), algorithm.generator.get_state()
    for micro_batch in (None, 3):
        critic.load_state_dict(copy.deepcopy(critic_state))  # the same critic fit both times
        algorithm.generator.set_state(random_state)
        ascent.cfg = replace(ascent.cfg, micro_batch=micro_batch)
        directions.append(flat(ascent.direction(adapter, pairs.rollout, penalty)[0]))
    assert directions[0].norm() > 1e-3
    torch.testing.assert_close(directions[1], directions[0], atol=1e-6, rtol=1e-5)


def test_a_critic_fit_on_nan_rewards_is_undone_and_counted(testbed):
    algorithm = sampled(testbed)
    ascent, rollout = algorithm.ascent, algorithm.source.rollouts(LAMBDA_PRIME, 4)
    with torch.no_grad(), algorithm.policy.adapter(LAMBDA_PRIME):
        log_probs = algorithm.policy.log_probs(rollout)
    critic = ascent.critics[LAMBDA_PRIME]
    before = copy.deepcopy(critic.state_dict())
    ascent.fit_critic(LAMBDA_PRIME, rollout, torch.full((4, rollout.horizon), math.nan, dtype=log_probs.dtype), log_probs)
    assert all(torch.equal(a, b) for a, b in zip(tensors_in(before), tensors_in(critic.state_dict()), strict=True))
    assert algorithm.guard.bad_in_a_row == {"critic/lambda_prime": 1} and algorithm.guard.nonfinite_steps == 1
    ascent.fit_critic(LAMBDA_PRIME, rollout, torch.zeros(4, rollout.horizon, dtype=log_probs.dtype), log_probs)
    assert algorithm.guard.bad_in_a_row == {"critic/lambda_prime": 0}
    assert not all(torch.equal(a, b) for a, b in zip(tensors_in(before), tensors_in(critic.state_dict())))


def test_a_step_moves_only_its_adapter_and_a_nan_step_moves_nothing(testbed):
    algorithm = sampled(testbed)
    ascent = algorithm.ascent
    lam, lam_prime = (flat(algorithm.policy.parameters_of(name)).clone() for name in (LAMBDA, LAMBDA_PRIME))
    nan = [torch.full_like(p, math.nan) for p in algorithm.policy.parameters_of(LAMBDA)]
    assert math.isnan(ascent.step(LAMBDA, nan))
    assert torch.equal(flat(algorithm.policy.parameters_of(LAMBDA)), lam)
    ones = [torch.ones_like(p) for p in algorithm.policy.parameters_of(LAMBDA)]
    assert ascent.step(LAMBDA, ones) == pytest.approx(math.sqrt(len(lam)))
    assert (flat(algorithm.policy.parameters_of(LAMBDA)) > lam).all()  # ascent: up the direction
    assert torch.equal(flat(algorithm.policy.parameters_of(LAMBDA_PRIME)), lam_prime)
    assert ascent.state_dict()[LAMBDA]["count"] == 1 and ascent.state_dict()[LAMBDA_PRIME]["count"] == 0
