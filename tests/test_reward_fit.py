"""φ's fit on the preference store: every label counts, a minibatch of batches is drawn, several steps lower f̂, the prior anchors."""

from dataclasses import replace

import pytest

from conftest import flat
from rlhf_bilevel.steps import StepConfig
from rlhf_bilevel.store import RewardFitConfig
from rlhf_bilevel.exact.lab import TheoryConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: conftest.one_thread says why


def config(**fit):
    return TheoryConfig.quick().algorithm(
        method="alternating", inner_steps=2, pairs_per_step=4, trajectories_per_step=4, labels="sample",
        reward_step=StepConfig(rule="adam", lr=0.05, schedule="constant"), reward_fit=RewardFitConfig(**fit),
    )


@pytest.mark.parametrize("replay", [True, False])
def test_every_label_of_the_run_teaches_the_reward_model(testbed, replay):
    """With the store replayed, the fit of outer step t sees all B·(K+1)·t labels; without, the last batch only."""
    cfg = config(replay=replay)
    algorithm = testbed.algorithm(replace(cfg, method="bilevel"), testbed.reward(seed=3), exact=False)
    for t in range(1, 3):
        metrics = algorithm.outer_step()
        assert metrics["upper/labels"] == (cfg.pairs_per_outer_step * t if replay else cfg.pairs_per_step)
        assert metrics["upper/penalty_norm"] > 0 and -1 <= metrics["upper/cosine_f_penalty"] <= 1
    assert len(algorithm.store) == 2 * cfg.pairs_per_outer_step


def test_several_steps_lower_the_store_loss_and_the_prior_anchors_phi(testbed):
    moved = {}
    for prior in (0.0, 1e6):
        reward = testbed.reward(seed=3)
        start = flat(reward.parameters()).clone()
        algorithm = testbed.algorithm(config(steps=30, prior=prior), reward, exact=False)
        metrics = algorithm.outer_step()
        if prior == 0:
            assert metrics["upper/store_loss_after"] < metrics["upper/store_loss"] - 0.01
        moved[prior] = (flat(reward.parameters()) - start).norm().item()
    # Adam moves each weight ~lr per step whatever the gradient's size; only a prior that pulls back holds φ at φ₀
    assert moved[1e6] < 0.1 * moved[0.0], moved


def test_a_minibatch_fits_on_that_many_stored_batches(testbed):
    """The bilevel method stores K + 1 batches of B pairs per outer step: after two, a minibatch of 3 fits on 3·B labels."""
    cfg = replace(config(minibatch=3), method="bilevel")
    algorithm = testbed.algorithm(cfg, testbed.reward(seed=3), exact=False)
    algorithm.outer_step()
    metrics = algorithm.outer_step()
    assert len(algorithm.store.batches) == 2 * (cfg.inner_steps + 1)
    assert metrics["upper/labels"] == 3 * cfg.pairs_per_step
