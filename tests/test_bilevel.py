"""Algorithm 1 as a whole: λ′ leaves λ, the budget is B·(K+1), and the corrected loop converges
where the printed pseudo-code does not."""

import copy
from dataclasses import replace

import pytest
import torch

from conftest import flat, perturb
from rlhf_bilevel import estimators as est
from rlhf_bilevel.config import BilevelConfig
from rlhf_bilevel.exact.lab import Lab, TheoryConfig
from rlhf_bilevel.types import LAMBDA, LAMBDA_PRIME


def config(**changes):
    return TheoryConfig.quick().algorithm(inner_steps=3, pairs_per_step=4, trajectories_per_step=4, **changes)


@pytest.mark.parametrize("exact", [True, False])
def test_lambda_prime_leaves_lambda_when_sigma_positive(testbed, exact):
    algorithm = testbed.algorithm(config(labels="sample"), testbed.reward(seed=3), exact=exact)
    algorithm.inner_step(0)
    gap = (flat(algorithm.policy.parameters_of(LAMBDA)) - flat(algorithm.policy.parameters_of(LAMBDA_PRIME))).norm()
    assert gap > 1e-6  # erratum 3: with d_k on line 10, λ′ would stay equal to λ


def test_printed_pseudocode_keeps_lambda_prime_equal_to_lambda(testbed):
    algorithm = testbed.algorithm(config(pseudocode="printed"), testbed.reward(seed=3), exact=True)
    algorithm.outer_step()
    torch.testing.assert_close(flat(algorithm.policy.parameters_of(LAMBDA)), flat(algorithm.policy.parameters_of(LAMBDA_PRIME)))


@pytest.mark.parametrize("crn", [True, False])
def test_common_random_numbers_cancel_the_penalty_when_lambda_prime_is_lambda(testbed, crn):
    """Sampled, printed pseudo-code (λ′ ≡ λ): with common random numbers d_t's two ∇φĴ are taken
    on the same trajectories and cancel exactly; drawn independently they do not."""
    algorithm = testbed.algorithm(config(pseudocode="printed", common_random_numbers=crn), testbed.reward(seed=3), exact=False)
    for k in range(algorithm.cfg.inner_steps):
        algorithm.inner_step(k)
    metrics = algorithm.upper_step()
    assert (metrics["penalty/gap"] == 0) == crn, metrics["penalty/gap"]


@pytest.mark.parametrize("adapter", [LAMBDA, LAMBDA_PRIME])
def test_micro_batches_give_the_whole_batch_direction(testbed, adapter):
    """d_k (λ) and d'_k (λ′, penalty included) taken in pieces of 3 rows of a 10-row batch (pieces that
    split pairs) equal the directions taken at once; a piece given the wrong share of ∂/∂log π fails."""
    algorithm = testbed.algorithm(config(), testbed.reward(seed=3), exact=False)
    perturb(algorithm.policy.parameters_of(adapter), 0.3, seed=5)
    pairs = algorithm.label(algorithm.source.pairs(adapter, 5), 0)
    losses = torch.rand(len(pairs), generator=torch.Generator().manual_seed(1))
    penalty = (lambda lp: est.surrogate_f_lambda(lp, pairs, losses)) if adapter == LAMBDA_PRIME else None
    critic, directions = algorithm.critics[adapter], []
    critic_state, random_state = copy.deepcopy(critic.state_dict()), algorithm.generator.get_state()
    for micro_batch in (None, 3):
        critic.load_state_dict(copy.deepcopy(critic_state))  # the same critic fit both times
        algorithm.generator.set_state(random_state)
        algorithm.cfg = replace(algorithm.cfg, micro_batch=micro_batch)
        directions.append(flat(algorithm.ascent(adapter, pairs.rollout, penalty)[0]))
    assert directions[0].norm() > 1e-3
    torch.testing.assert_close(directions[1], directions[0], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("method", ["bilevel", "alternating"])
def test_oracle_budget_is_B_times_K_plus_one(testbed, method):
    cfg = config(method=method, labels="sample")
    seen = []
    algorithm = testbed.algorithm(cfg, testbed.reward(seed=3), exact=False)
    algorithm.on_pairs = lambda pairs, where: seen.append(len(pairs))
    metrics = algorithm.outer_step()
    algorithm.outer_step()
    assert metrics["oracle/pairs"] == cfg.pairs_per_outer_step == 4 * 4
    assert algorithm.oracle_pairs == sum(seen) == 2 * cfg.pairs_per_outer_step


def test_reward_descends_and_policies_ascend(testbed):
    """One exact outer step lowers L_σ's linearisation: φ moves against d_t."""
    reward = testbed.reward(seed=3)
    algorithm = testbed.algorithm(config(), reward, exact=True)
    before = flat(reward.parameters()).clone()
    directions, step = [], algorithm.reward_step.step
    algorithm.reward_step.step = lambda d_t: directions.append(flat(d_t)) or step(d_t)
    algorithm.upper_step()
    assert len(directions) == 1
    assert torch.dot(flat(reward.parameters()) - before, directions[0]) < 0


@pytest.fixture(scope="module")
def lab():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    lab = Lab(TheoryConfig(inner_steps=10))
    yield lab, lab.phi_star()["phi_star"]
    torch.set_default_dtype(previous)


def test_corrected_loop_drives_phi_to_phi_star_and_printed_does_not(lab):
    lab, phi_star = lab
    corrected = lab.run(phi_star, exact=True, outer_steps=150)["gap_sq"]
    printed = lab.run(phi_star, exact=True, outer_steps=150, pseudocode="printed")["gap_sq"]
    assert max(corrected[-15:]) < 0.1 * max(corrected[:15])  # (Φ_t − Φ*)² fell tenfold
    assert max(corrected[-15:]) < 0.25 * min(printed[-15:])
    assert min(printed[-15:]) > min(printed[:15])  # the printed loop moves away from Φ*
