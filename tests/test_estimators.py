"""Each stochastic estimator of Algorithm 1 against its exact value on the enumerated MDP.

The tolerance is statistical: M independent batch estimates, projected on a fixed
direction u, must have a mean within 4 standard errors of the exact ⟨∇, u⟩ (a false
alarm about once in 15,000 runs), and the exact value must be far from zero so a
wrong sign or a missing factor cannot pass.
"""

import math

import pytest
import torch

from conftest import flat, perturb
from rlhf_bilevel import estimators as est
from rlhf_bilevel.critic import MCCritic, RLOOCritic
from rlhf_bilevel.exact import solve
from rlhf_bilevel.sampling import SampledRollouts
from rlhf_bilevel.types import LAMBDA, LAMBDA_PRIME

BATCHES, BATCH = 60, 64


def agree(samples: list[torch.Tensor], exact: torch.Tensor, seed: int) -> None:
    u = torch.randn(exact.shape, generator=torch.Generator().manual_seed(seed))
    u = u / u.norm()
    projected = torch.stack([s @ u for s in samples])
    mean, se = projected.mean().item(), projected.std().item() / math.sqrt(len(samples))
    target = (exact @ u).item()
    assert abs(target) > 4 * se, "test is not sensitive: exact value within noise of zero"
    assert abs(mean - target) < 4 * se, f"estimate {mean:.5f} ± {se:.5f} vs exact {target:.5f}"


@pytest.fixture
def setup(testbed):
    policy = testbed.new_policy()
    perturb(policy.parameters_of(LAMBDA), 0.3, seed=1)
    reward = testbed.reward(seed=3)
    source = SampledRollouts(policy, [0, 1, 2], torch.Generator().manual_seed(0))
    critic = solve.ExactCritic(testbed.problem, policy, reward, LAMBDA)
    return testbed, policy, reward, source, critic


def label_exactly(testbed, pairs):
    ro = pairs.rollout
    pairs.prob = testbed.gold.compare(
        [ro.prompts[i] for i in pairs.first], [ro.responses[i] for i in pairs.first], [ro.responses[i] for i in pairs.second]
    )
    pairs.label = pairs.prob
    return pairs


def test_policy_gradient_with_critic_matches_exact_grad_J(setup):
    testbed, policy, reward, source, critic = setup
    params = policy.parameters_of(LAMBDA)
    with policy.adapter(LAMBDA):
        exact = flat(torch.autograd.grad(solve.objective(testbed.problem, policy.table(), reward.node_rewards().detach()), params))
    agree(sampled_grad_J(testbed, policy, reward, source, critic), exact, seed=0)


def test_monte_carlo_critic_gives_unbiased_grad_J(setup):
    testbed, policy, reward, source, _ = setup
    params = policy.parameters_of(LAMBDA)
    with policy.adapter(LAMBDA):
        exact = flat(torch.autograd.grad(solve.objective(testbed.problem, policy.table(), reward.node_rewards().detach()), params))
    agree(sampled_grad_J(testbed, policy, reward, source, MCCritic(testbed.problem.gamma)), exact, seed=1)


def test_leave_one_out_per_prompt_gives_unbiased_grad_J(setup):
    testbed, policy, reward, source, _ = setup
    params = policy.parameters_of(LAMBDA)
    with policy.adapter(LAMBDA):
        exact = flat(torch.autograd.grad(solve.objective(testbed.problem, policy.table(), reward.node_rewards().detach()), params))
    agree(sampled_grad_J(testbed, policy, reward, source, RLOOCritic(testbed.problem.gamma), responses_per_prompt=4), exact, seed=1)


def sampled_grad_J(testbed, policy, reward, source, critic, responses_per_prompt=1):
    """BATCHES independent estimates of ∇_λ J by eq. 12 with `critic`'s advantages, each on
    BATCH / `responses_per_prompt` prompts."""
    params = policy.parameters_of(LAMBDA)
    samples = []
    for _ in range(BATCHES):
        rollout = source.groups(LAMBDA, BATCH // responses_per_prompt, responses_per_prompt)
        shaped = est.shaped_rewards(rollout, reward.token_rewards(rollout).detach(), testbed.problem.beta)
        with policy.adapter(LAMBDA):
            log_probs = policy.log_probs(rollout)
        advantage = critic.advantages(rollout, shaped, log_probs)
        samples.append(flat(est.grad_J_lambda(log_probs, params, rollout, advantage, testbed.problem.gamma)))
    return samples


def test_score_function_grad_f_lambda_matches_exact(setup):
    testbed, policy, reward, source, _ = setup
    params = policy.parameters_of(LAMBDA)
    with policy.adapter(LAMBDA):
        exact = flat(torch.autograd.grad(solve.upper(testbed.problem, policy.table(), reward.node_rewards().detach()), params))
    samples = []
    for _ in range(BATCHES):
        pairs = label_exactly(testbed, source.pairs(LAMBDA, BATCH))
        with torch.no_grad():
            losses = est.upper_loss(est.pair_margins(reward.token_rewards(pairs.rollout), pairs), pairs.label, "bt_nll")
        with policy.adapter(LAMBDA):
            log_probs = policy.log_probs(pairs.rollout)
        samples.append(flat(est.grad_f_lambda(log_probs, params, pairs, losses)))
    agree(samples, exact, seed=1)


def test_lemma5_grad_J_phi_matches_exact(setup):
    testbed, policy, reward, source, _ = setup
    phi = reward.parameters()
    with policy.adapter(LAMBDA), torch.no_grad():
        table = policy.table()
    exact = flat(torch.autograd.grad(solve.objective(testbed.problem, table, reward.node_rewards()), phi))
    samples = []
    for _ in range(BATCHES):
        rollout = source.rollouts(LAMBDA, BATCH)
        samples.append(flat(est.grad_J_phi([reward.token_rewards(rollout)], phi, [rollout], testbed.problem.gamma)))
    agree(samples, exact, seed=2)


def test_common_random_numbers_keep_the_penalty_difference_unbiased_and_cut_its_variance(setup):
    """∇φĴ(λ) − ∇φĴ(λ′) of d_t, with λ′ a small step from λ (total variation ≤ 0.13 in every state):
    on coupled draws its mean is the exact difference within 4 standard errors, and its variance
    (trace of the covariance, over BATCHES estimates) is ≥ 5× below that of independent draws
    (measured: 13×); a coupling that shared nothing, or a biased one, fails."""
    testbed, policy, reward, source, _ = setup
    with torch.no_grad():
        for prime, lam in zip(policy.parameters_of(LAMBDA_PRIME), policy.parameters_of(LAMBDA)):
            prime.copy_(lam)
    perturb(policy.parameters_of(LAMBDA_PRIME), 0.05, seed=2)
    phi = reward.parameters()

    def exact(adapter):
        with policy.adapter(adapter), torch.no_grad():
            table = policy.table()
        return flat(torch.autograd.grad(solve.objective(testbed.problem, table, reward.node_rewards()), phi))

    def grad(rollout):
        return flat(est.grad_J_phi([reward.token_rewards(rollout)], phi, [rollout], testbed.problem.gamma))

    coupled, independent = [], []
    for _ in range(BATCHES):
        traj, traj_prime = source.coupled((LAMBDA, LAMBDA_PRIME), BATCH)
        coupled.append(grad(traj) - grad(traj_prime))
        independent.append(grad(source.rollouts(LAMBDA, BATCH)) - grad(source.rollouts(LAMBDA_PRIME, BATCH)))
    agree(coupled, exact(LAMBDA) - exact(LAMBDA_PRIME), seed=4)
    ratio = torch.stack(independent).var(0).sum() / torch.stack(coupled).var(0).sum()
    assert ratio > 5, f"variance only {ratio:.1f}× lower with common random numbers"


def test_coupled_draws_replay_the_random_numbers_of_one_draw(setup):
    """The same adapter twice gives the same trajectories; the generator ends where one draw leaves
    it, so what follows (labels, the next step, another process's shard) is unchanged."""
    _, _, _, source, _ = setup
    start = source.generator.get_state()
    first, again = source.coupled((LAMBDA, LAMBDA), 32)
    assert first.responses == again.responses and first.prompts == again.prompts
    after_coupled = source.generator.get_state()
    source.generator.set_state(start)
    single = source.rollouts(LAMBDA, 32)
    assert single.responses == first.responses
    assert torch.equal(source.generator.get_state(), after_coupled)


@pytest.mark.parametrize("kind", ["bt_nll", "disagreement"])
def test_grad_f_phi_matches_exact(testbed, kind):
    problem = solve.Problem(testbed.tree, testbed.problem.ref, testbed.gold, 0.5, 0.9, kind)
    policy = testbed.new_policy()
    perturb(policy.parameters_of(LAMBDA), 0.3, seed=1)
    reward = testbed.reward(seed=3)
    source = SampledRollouts(policy, [0, 1, 2], torch.Generator().manual_seed(5))
    with policy.adapter(LAMBDA), torch.no_grad():
        table = policy.table()
    exact = flat(torch.autograd.grad(solve.upper(problem, table, reward.node_rewards()), reward.parameters()))
    samples = []
    for _ in range(BATCHES):
        pairs = label_exactly(testbed, source.pairs(LAMBDA, BATCH))
        grad, _ = est.grad_f_phi([reward.token_rewards(pairs.rollout)], reward.parameters(), [pairs], torch.ones(1), kind)
        samples.append(flat(grad))
    agree(samples, exact, seed=3)


def test_enumerated_rollouts_make_every_estimator_exact(setup):
    testbed, policy, reward, _, critic = setup
    source = solve.ExactRollouts(policy)
    params = policy.parameters_of(LAMBDA)
    rollout = source.rollouts(LAMBDA, 0)
    assert rollout.weight.sum().item() == pytest.approx(1.0, abs=1e-12)
    with policy.adapter(LAMBDA):
        log_probs = policy.log_probs(rollout)
        table = policy.table()
    grad = flat(est.grad_J_lambda(log_probs, params, rollout, critic.advantages(rollout, None, log_probs), testbed.problem.gamma))
    exact = flat(torch.autograd.grad(solve.objective(testbed.problem, table, reward.node_rewards().detach()), params))
    torch.testing.assert_close(grad, exact, rtol=1e-6, atol=1e-9)
    rewards = reward.node_rewards().detach()
    value = est.objective_value(rollout, reward.token_rewards(rollout).detach(), testbed.problem.beta, testbed.problem.gamma)
    assert value.item() == pytest.approx(solve.objective(testbed.problem, table.detach(), rewards).item(), rel=1e-9)


def test_upper_losses_by_hand():
    margin = torch.tensor([0.0, 2.0, -1.0])
    label = torch.tensor([1.0, 1.0, 0.0])
    nll = est.upper_loss(margin, label, "bt_nll")
    torch.testing.assert_close(nll, torch.tensor([math.log(2), math.log(1 + math.exp(-2)), math.log(1 + math.exp(-1))]))
    dis = est.upper_loss(margin, label, "disagreement")
    torch.testing.assert_close(dis, torch.tensor([0.5, 1 / (1 + math.exp(2)), 1 / (1 + math.exp(1))]))


def test_leave_one_out_baseline_excludes_own_loss():
    losses = torch.tensor([1.0, 2.0, 6.0])
    baseline = est.leave_one_out_baseline(losses, torch.full((3,), 1 / 3))
    torch.testing.assert_close(baseline, torch.tensor([4.0, 3.5, 1.5]))
    assert est.leave_one_out_baseline(losses, torch.tensor([0.2, 0.3, 0.5])).abs().sum() == 0


def test_hypergradient_is_penalty_gradient_formula():
    gf, gs, gp = [torch.tensor([1.0, 2.0])], [torch.tensor([0.5, 0.0])], [torch.tensor([0.25, 1.0])]
    (d,) = est.hypergradient(gf, gs, gp, sigma=0.5)
    torch.testing.assert_close(d, torch.tensor([1.0 + 0.5, 2.0 - 2.0]))
    (dp,) = est.penalised_direction(gs, gf, sigma=0.5)
    torch.testing.assert_close(dp, torch.tensor([0.0, -1.0]))
