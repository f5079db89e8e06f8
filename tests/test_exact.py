"""The exact solutions: λ* maximises J, enumeration matches sampling, and L_σ → Φ as σ → 0."""

import pytest
import torch

from conftest import flat
from rlhf_bilevel.config import BilevelConfig
from rlhf_bilevel.exact import solve
from rlhf_bilevel.sampling import SampledRollouts
from rlhf_bilevel.types import LAMBDA

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: conftest.one_thread says why


def test_soft_optimal_policy_is_the_maximiser_of_J(testbed):
    reward = testbed.reward(seed=3)
    rewards = reward.node_rewards().detach()
    logits = solve.soft_optimal(testbed.problem, rewards).clone().requires_grad_(True)
    value = solve.objective(testbed.problem, torch.log_softmax(logits, -1), rewards)
    (grad,) = torch.autograd.grad(value, logits)
    assert grad.abs().max() < 1e-10
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        other = torch.log_softmax(logits.detach() + 0.3 * torch.randn(logits.shape, generator=generator), -1)
        assert solve.objective(testbed.problem, other, rewards) < value


def test_sampled_trajectory_frequencies_match_enumeration(testbed):
    policy = testbed.new_policy()
    rollout = SampledRollouts(policy, [0], torch.Generator().manual_seed(0)).rollouts(LAMBDA, 20000)
    exact = solve.ExactRollouts(policy).rollouts(LAMBDA, 0)
    counts = {}
    for r in rollout.responses:
        counts[r] = counts.get(r, 0) + 1
    for prompt, response, weight in zip(exact.prompts, exact.responses, exact.weight.tolist()):
        if prompt != 0:
            continue
        p = weight * testbed.tree.prompts
        freq = counts.get(response, 0) / 20000
        assert abs(freq - p) < 4 * (p * (1 - p) / 20000) ** 0.5 + 1e-4


def test_penalty_gradient_bias_shrinks_in_proportion_to_sigma(testbed):
    reward = testbed.reward(seed=3)
    true = flat(torch.autograd.grad(solve.phi(testbed.problem, reward), reward.parameters()))
    errors = []
    for sigma in (0.2, 0.1, 0.05):
        value = solve.penalty_value(testbed.problem, reward, sigma)
        errors.append((flat(torch.autograd.grad(value, reward.parameters())) - true).norm().item())
    # |∇L_σ − ∇Φ| = O(σ): halving σ halves the error, up to higher-order terms
    for big, small in zip(errors, errors[1:]):
        assert 1.6 < big / small < 2.5, errors
    assert errors[-1] < 0.1 * true.norm()


def test_penalty_value_tends_to_phi(testbed):
    reward = testbed.reward(seed=3)
    phi = solve.phi(testbed.problem, reward).item()
    gaps = [abs(solve.penalty_value(testbed.problem, reward, s).item() - phi) for s in (0.2, 0.1, 0.05)]
    assert gaps[0] > gaps[1] > gaps[2]


def test_building_the_testbed_and_its_models_leaves_the_global_random_stream_alone(testbed):
    before = torch.get_rng_state()
    policy, again = testbed.new_policy(), testbed.new_policy()
    reward = testbed.reward(seed=3)
    testbed.algorithm(BilevelConfig(inner_steps=1, trajectories_per_step=4, pairs_per_step=2), reward, exact=False)
    assert torch.equal(torch.get_rng_state(), before)
    assert all(torch.equal(a, b) for a, b in zip(policy.parameters(), again.parameters(), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(reward.parameters(), testbed.reward(seed=3).parameters(), strict=True))
