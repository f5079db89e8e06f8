"""Where each method comes to rest on the exact problem: the alternating point is a fixed point of its
refits but not a stationary point of Φ, argmin Φ is no worse on Φ, a policy's gold is what sampling it
gives, and the gold-against-KL frontier is met by the gold-optimal policies and passed by none."""

from dataclasses import replace

import pytest
import torch

from conftest import flat, perturb
from rlhf_bilevel.exact import fixed_points, solve
from rlhf_bilevel.exact.testbed import Testbed, TestbedConfig
from rlhf_bilevel.sampling import SampledRollouts
from rlhf_bilevel.types import LAMBDA

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: conftest.one_thread says why

DECAY = 1e-3


@pytest.fixture(scope="module")
def rest():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    testbed = Testbed(TestbedConfig(prompts=2, vocab=3, horizon=2, reward_hidden=0, seed=1), beta=0.6, gamma=0.9, loss="bt_nll")
    problem = testbed.problem
    bilevel = testbed.reward(seed=5)
    solve.minimise(bilevel, lambda r: solve.phi(problem, r, DECAY))
    alternating = testbed.reward(seed=0)
    result = fixed_points.fixed_points(problem, bilevel, alternating, DECAY)
    yield testbed, bilevel, alternating, result
    torch.set_default_dtype(previous)


def test_alternating_rests_where_a_refit_on_its_own_policy_moves_nothing(rest):
    testbed, _, alternating, result = rest
    policy = solve.soft_optimal(testbed.problem, alternating.node_rewards()).detach()
    fit = solve.upper(testbed.problem, policy, alternating.node_rewards()) + solve.weight_decay(alternating, DECAY)
    assert flat(torch.autograd.grad(fit, alternating.parameters())).norm() < 1e-6
    assert result["refits"] >= 2  # the policy moved after the first fit, so one refit is not the answer


def test_argmin_phi_beats_the_alternating_point_on_phi_which_is_not_stationary_there(rest):
    testbed, bilevel, alternating, result = rest
    assert result["bilevel"]["phi"] < result["alternating"]["phi"]
    at_bilevel, at_alternating = (
        flat(torch.autograd.grad(solve.phi(testbed.problem, r, DECAY), r.parameters())).norm() for r in (bilevel, alternating)
    )
    # the distribution-shift term the alternating method leaves out is what keeps ∇Φ from vanishing there
    assert at_bilevel < 1e-6 < 1e-3 < at_alternating


def test_reference_has_no_kl_and_each_induced_policy_some(rest):
    _, _, _, result = rest
    assert result["reference"]["kl"] == pytest.approx(0, abs=1e-12)
    assert result["bilevel"]["kl"] > 0 and result["alternating"]["kl"] > 0


def test_policy_gold_is_the_mean_gold_of_its_samples(rest):
    """20 000 samples of a policy moved off π_ref: the mean's standard error is about 0.005; 4 of them allowed."""
    testbed = rest[0]
    policy = testbed.new_policy()
    perturb(policy.parameters_of(LAMBDA), 0.5, seed=2)
    with torch.no_grad():
        exact = fixed_points.policy_value(testbed.problem, policy.table())
    assert exact.kl > 0.01
    rollout = SampledRollouts(policy, list(range(testbed.tree.prompts)), torch.Generator().manual_seed(0)).rollouts(LAMBDA, 20000)
    gold = testbed.gold.gold_return(rollout.prompts, rollout.responses)
    assert abs(gold.mean().item() - exact.gold) < 4 * gold.std().item() / 20000**0.5


def test_the_frontier_is_met_by_the_gold_optimal_policy_and_passed_by_none(rest):
    testbed = rest[0]
    problem = testbed.problem
    undiscounted = replace(problem, gamma=1.0)
    for beta in (0.2, 1.0):
        best = solve.soft_optimal(replace(undiscounted, beta=beta), problem.gold.node_gold)
        assert abs(fixed_points.policy_value(problem, best).shortfall) < 1e-6
    policy = testbed.new_policy()
    for seed in range(5):
        perturb(policy.parameters_of(LAMBDA), 0.5, seed=seed)
        with torch.no_grad():
            assert fixed_points.policy_value(problem, policy.table()).shortfall > -1e-9


def test_refits_that_do_not_settle_raise_and_say_how_far_phi_still_moves(rest):
    testbed = rest[0]
    with pytest.raises(fixed_points.Unsettled, match=r"did not settle in 1 rounds \(φ's last move [1-9]"):
        fixed_points.stable_point(testbed.problem, testbed.reward(seed=0), DECAY, rounds=1)
