"""Algorithm 2 against exact Q on the enumerated MDP, and its projection."""

import pytest
import torch

from conftest import perturb
from rlhf_bilevel import estimators as est
from rlhf_bilevel.checkpoint import load_checkpoint, save_checkpoint
from rlhf_bilevel.critic import CriticConfig, MCCritic, QHead, RLOOCritic, TDCritic, project_to_ball
from rlhf_bilevel.exact import solve
from rlhf_bilevel.sampling import SampledRollouts
from rlhf_bilevel.types import LAMBDA, Rollout

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: conftest.one_thread says why


def test_td_critic_matches_exact_q(testbed):
    policy = testbed.new_policy()
    perturb(policy.parameters_of(LAMBDA), 0.3, seed=1)
    reward = testbed.reward(seed=3)
    generator = torch.Generator().manual_seed(0)
    source = SampledRollouts(policy, [0, 1, 2], generator)
    cfg = CriticConfig(hidden=0, lr=0.05, blocks=8, target_every=100, batch_size=128, replay_capacity=20000)
    head = QHead(policy.inputs.shape[1], testbed.tree.vocab, cfg.hidden, torch.Generator().manual_seed(0))
    critic = TDCritic(policy.state_features, head, testbed.problem.gamma, cfg, generator)
    for _ in range(6):
        rollout = source.rollouts(LAMBDA, 512)
        shaped = est.shaped_rewards(rollout, reward.token_rewards(rollout).detach(), testbed.problem.beta)
        with policy.adapter(LAMBDA), torch.no_grad():
            log_probs = policy.log_probs(rollout)
        critic.fit(rollout, shaped, log_probs)
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


def test_rloo_baselines_each_response_against_the_others_to_its_prompt():
    # prompts a, a, a, b: row 2 ends after one step; b's row has no other response to its prompt
    mask = torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    shaped = torch.tensor([[1.0, 2.0], [0.0, 4.0], [3.0, 0.0], [5.0, 1.0]])
    zeros = torch.zeros(4, 2)
    rollout = Rollout(["a", "a", "a", "b"], [None] * 4, torch.zeros(4, 2, dtype=torch.long), mask, zeros, zeros, torch.full((4,), 0.25))
    # rewards to go (γ = 1): a: (3, 2), (4, 4), (3, 0); b: (6, 1)
    expected = torch.tensor([
        [3 - (4 + 3) / 2, 2 - 4],  # at h = 1 the prompt's only other response still running is row 1
        [4 - (3 + 3) / 2, 4 - 2],
        [3 - (3 + 4) / 2, 0],
        # alone: the batch's leave-one-out baseline, as MCCritic's
        [6 - (3 + 4 + 3) / 3, 1 - (2 + 4) / 2],
    ])
    torch.testing.assert_close(RLOOCritic(1.0).advantages(rollout, shaped, None), expected)
    torch.testing.assert_close(MCCritic(1.0).advantages(rollout, shaped, None)[3], expected[3])


def test_transitions_stop_at_eos(testbed):
    policy = testbed.new_policy()
    rollout = SampledRollouts(policy, [0, 1, 2], torch.Generator().manual_seed(0)).rollouts(LAMBDA, 200)
    shaped = torch.ones_like(rollout.mask) * rollout.mask
    with policy.adapter(LAMBDA), torch.no_grad():
        probs = policy.log_probs(rollout).exp()
    tr = est.transitions(rollout, policy.state_features(rollout), shaped, probs)
    assert len(tr) == int(rollout.mask.sum())
    # π(·|s′) of the expected target is the policy at the next state of the same trajectory
    following = torch.zeros_like(probs)
    following[:, :-1] = probs[:, 1:]
    torch.testing.assert_close(tr.next_policy, following[rollout.mask.bool()])
    ended = rollout.mask.sum(-1)
    # exactly one terminal transition per trajectory: at EOS or at the horizon
    assert int(tr.done.sum()) == len(rollout)
    assert (ended < rollout.horizon).any(), "no trajectory hit EOS: the test would not check absorption"


def test_a_critic_relabels_its_replay_and_warms_up_once(testbed, tmp_path):
    """`relabel` gives every replayed transition the reward of now (r_φ has changed) and keeps the rest;
    the replay keeps the newest `replay_capacity` transitions; the first fit runs `warmup_blocks` more
    blocks than later ones; a critic restored from a checkpoint replays and relabels the same."""
    policy = testbed.new_policy()
    generator = torch.Generator().manual_seed(0)
    source = SampledRollouts(policy, [0, 1, 2], generator)
    cfg = CriticConfig(hidden=0, blocks=1, target_every=3, batch_size=8, warmup_blocks=2, replay_capacity=40)
    critic = TDCritic(policy.state_features, QHead(policy.inputs.shape[1], testbed.tree.vocab, 0, torch.Generator().manual_seed(0)), 0.9, cfg, generator)
    steps = []
    original = critic.optimizer.step

    def counted(*args, **kwargs):
        steps.append(1)
        return original(*args, **kwargs)

    critic.optimizer.step = counted
    held = []
    for _ in range(3):
        rollout = source.rollouts(LAMBDA, 16)
        with policy.adapter(LAMBDA), torch.no_grad():
            log_probs = policy.log_probs(rollout)
        critic.fit(rollout, rollout.mask.clone(), log_probs)
        held.append(int(rollout.mask.sum()))
        assert len(critic.replay) == min(sum(held), cfg.replay_capacity)
    assert len(steps) == (1 + 2) * 3 + 2 * 1 * 3
    assert len(critic.sources) < 3, "a rollout none of whose transitions are replayed is still kept"
    states = critic.replay.state.clone()
    critic.relabel(lambda rollout: 2 * rollout.mask)
    assert torch.equal(critic.replay.reward, torch.full((cfg.replay_capacity,), 2.0)) and torch.equal(critic.replay.state, states)

    save_checkpoint(tmp_path, 1, {"critic": critic.state_dict()})
    resumed = TDCritic(policy.state_features, QHead(policy.inputs.shape[1], testbed.tree.vocab, 0, torch.Generator().manual_seed(0)), 0.9, cfg, generator)
    resumed.load_state_dict(load_checkpoint(tmp_path / "checkpoint-000001")["critic"])
    assert resumed.fits == 3 and torch.equal(resumed.replay.reward, critic.replay.reward)
    resumed.relabel(lambda rollout: 3 * rollout.mask)
    assert torch.equal(resumed.replay.reward, torch.full((cfg.replay_capacity,), 3.0))
