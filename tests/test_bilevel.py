"""Algorithm 1 as a whole: λ′ leaves λ, the budget is B·(K+1), and the corrected loop converges
where the printed pseudo-code does not."""

import pytest
import torch

from conftest import flat
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


def test_lambda_draws_responses_per_prompt_in_groups(testbed):
    algorithm = testbed.algorithm(config(responses_per_prompt=2), testbed.reward(seed=3), exact=False)
    algorithm.inner_step(0)
    (rollout,) = algorithm.drawn[LAMBDA]
    assert len(rollout) == 4 and rollout.prompts[0::2] == rollout.prompts[1::2]


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
    stepper = algorithm.reward_fit.reward_step
    directions, step = [], stepper.step
    stepper.step = lambda d_t: directions.append(flat(d_t)) or step(d_t)
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
