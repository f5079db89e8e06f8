"""Algorithm 2 against exact Q on the enumerated MDP, and its projection."""

import pytest
import torch

from conftest import perturb
from rlhf_bilevel import estimators as est
from rlhf_bilevel.critic import CriticConfig, MCCritic, QHead, TDCritic, project_to_ball
from rlhf_bilevel.exact import solve
from rlhf_bilevel.sampling import SampledRollouts
from rlhf_bilevel.types import LAMBDA

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: conftest.one_thread says why


def test_td_critic_matches_exact_q(testbed):
    policy = testbed.new_policy()
    perturb(policy.parameters_of(LAMBDA), 0.3, seed=1)
    reward = testbed.reward(seed=3)
    generator = torch.Generator().manual_seed(0)
    source = SampledRollouts(policy, [0, 1, 2], generator)
    cfg = CriticConfig(hidden=0, lr=0.05, blocks=8, target_every=100, batch_size=128, replay_capacity=20000)
    head = QHead(policy.inputs.shape[1], testbed.tree.vocab, cfg.hidden)
    critic = TDCritic(policy.state_features, head, testbed.problem.gamma, cfg, generator)
    for _ in range(6):
        rollout = source.rollouts(LAMBDA, 512)
        shaped = est.shaped_rewards(rollout, reward.token_rewards(rollout).detach(), testbed.problem.beta)
        critic.fit(rollout, shaped)
    exact = solve.ExactCritic(testbed.problem, policy, reward, LAMBDA)
    rollout = source.rollouts(LAMBDA, 2000)
    taken = rollout.tokens.unsqueeze(-1)
    learned = critic.q_values(rollout).gather(-1, taken).squeeze(-1)
    truth = exact.q_values(rollout).gather(-1, taken).squeeze(-1)
    error = ((learned - truth).abs() * rollout.mask).sum() / rollout.mask.sum()
    spread = ((truth - truth[rollout.mask.bool()].mean()).abs() * rollout.mask).sum() / rollout.mask.sum()
    # on-policy visitation-weighted error: well under the spread of Q itself
    assert error < 0.05, f"mean |Q_θ − Q| = {error:.3f} (spread of Q: {spread:.3f})"
    assert spread > 4 * error
    # its advantages take V(s) from the head's expectation: the same as from its table of Q(s, ·)
    with policy.adapter(LAMBDA):
        log_probs = policy.log_probs(rollout)
    advantage = critic.advantages(rollout, shaped, log_probs)
    assert advantage.abs().max() > 0.05
    torch.testing.assert_close(advantage, est.q_advantages(critic.q_values(rollout), log_probs, rollout))


def test_projection_onto_ball():
    centre = [torch.zeros(3), torch.zeros(2)]
    params = [torch.tensor([3.0, 0.0, 0.0]), torch.tensor([0.0, 4.0])]
    project_to_ball(params, centre, radius=1.0)
    norm = torch.sqrt(sum((p**2).sum() for p in params))
    assert abs(norm.item() - 1.0) < 1e-6
    torch.testing.assert_close(params[1], torch.tensor([0.0, 0.8]))
    inside = [torch.tensor([0.1, 0.0, 0.0]), torch.tensor([0.0, 0.1])]
    project_to_ball(inside, centre, radius=1.0)
    torch.testing.assert_close(inside[0], torch.tensor([0.1, 0.0, 0.0]))


def test_transitions_stop_at_eos(testbed):
    policy = testbed.new_policy()
    rollout = SampledRollouts(policy, [0, 1, 2], torch.Generator().manual_seed(0)).rollouts(LAMBDA, 200)
    shaped = torch.ones_like(rollout.mask) * rollout.mask
    tr = est.transitions(rollout, policy.state_features(rollout), shaped)
    assert len(tr) == int(rollout.mask.sum())
    ended = rollout.mask.sum(-1)
    # exactly one terminal transition per trajectory: at EOS or at the horizon
    assert int(tr.done.sum()) == len(rollout)
    assert (ended < rollout.horizon).any(), "no trajectory hit EOS: the test would not check absorption"
