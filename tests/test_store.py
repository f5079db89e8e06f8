"""The preference store: recency weighs, the store loss is the weighted mean of its batches, resume restores."""

import pytest
import torch

from rlhf_bilevel import estimators as est
from rlhf_bilevel.checkpoint import load_checkpoint, save_checkpoint
from rlhf_bilevel.exact.lab import TheoryConfig
from rlhf_bilevel.steps import StepConfig
from rlhf_bilevel.store import PreferenceStore, RewardFitConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: conftest.one_thread says why


def config(**fit):
    return TheoryConfig.quick().algorithm(
        method="alternating", inner_steps=2, pairs_per_step=4, trajectories_per_step=4, labels="sample",
        reward_step=StepConfig(rule="adam", lr=0.05, schedule="constant"), reward_fit=RewardFitConfig(**fit),
    )


def test_store_loss_is_the_weighted_mean_of_its_batches_and_recency_halves_weights(testbed):
    algorithm = testbed.algorithm(config(), testbed.reward(seed=3), exact=False)
    batches = [algorithm.label(algorithm.source.pairs("lambda", n), 0) for n in (3, 5)]
    rewards = [algorithm.reward.token_rewards(p.rollout) for p in batches]
    per_batch = [(p.weight * est.upper_loss(est.pair_margins(r, p), p.label, "bt_nll")).sum() for r, p in zip(rewards, batches)]
    weights = torch.tensor([1.0, 3.0], dtype=torch.float64)
    expected = (per_batch[0] + 3 * per_batch[1]) / 4
    torch.testing.assert_close(est.store_loss(rewards, batches, weights, "bt_nll"), expected)

    store = PreferenceStore()
    for step in (0, 2, 4):
        store.add(batches[0], step)
    torch.testing.assert_close(store.weights(4, half_life=2.0), torch.tensor([0.25, 0.5, 1.0], dtype=torch.float64))
    assert store.weights(4, half_life=None).tolist() == [1.0, 1.0, 1.0]
    assert len(store) == 9


def test_the_store_survives_a_checkpoint(testbed, tmp_path):
    algorithm = testbed.algorithm(config(), testbed.reward(seed=3), exact=False)
    algorithm.outer_step()
    save_checkpoint(tmp_path, 1, {"bilevel": algorithm.state_dict()})
    resumed = testbed.algorithm(config(), testbed.reward(seed=3), exact=False)
    resumed.reward.load_state_dict(algorithm.reward.state_dict())
    resumed.load_state_dict(load_checkpoint(tmp_path / "checkpoint-000001")["bilevel"])
    weights = algorithm.store.weights(1, None)
    assert len(resumed.store) == len(algorithm.store) == config().pairs_per_outer_step
    losses = [a.reward_fit.store_loss(a.store.batches, weights) for a in (resumed, algorithm)]
    torch.testing.assert_close(*losses)
    assert [p.rollout.responses for p in resumed.store.batches] == [p.rollout.responses for p in algorithm.store.batches]
