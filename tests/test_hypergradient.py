"""d_t: the alternating method's is ∇φ f̂ alone; the bilevel method adds the penalty (∇φĴ(λ) − ∇φĴ(λ′))/σ,
which the printed pseudo-code subtracts (erratum 1)."""

from dataclasses import replace

import pytest
import torch

from conftest import flat, perturb
from rlhf_bilevel.collectives import World
from rlhf_bilevel.hypergradient import Hypergradient
from rlhf_bilevel.exact.lab import TheoryConfig
from rlhf_bilevel.types import LAMBDA, LAMBDA_PRIME

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: conftest.one_thread says why


def test_the_penalty_enters_with_its_sign_and_the_alternating_method_has_none(testbed):
    cfg = TheoryConfig.quick().algorithm(inner_steps=1, pairs_per_step=4, trajectories_per_step=4, sigma=0.5)
    reward = testbed.reward(seed=3)
    algorithm = testbed.algorithm(cfg, reward, exact=True)
    perturb(algorithm.policy.parameters_of(LAMBDA_PRIME), 0.3, seed=5)  # λ′ ≠ λ: the penalty is not zero
    batches = [algorithm.label(algorithm.source.pairs(LAMBDA_PRIME, 4), 0)]
    sets = {name: [algorithm.source.rollouts(name, 4)] for name in (LAMBDA, LAMBDA_PRIME)}
    weights = torch.ones(1, dtype=torch.float64)
    d_t = {}
    for name, changes in {"alternating": {"method": "alternating"}, "bilevel": {}, "printed": {"pseudocode": "printed"}}.items():
        direction, metrics = Hypergradient(reward, replace(cfg, **changes), World())(batches, weights, sets, labels=4)
        d_t[name] = flat(direction)
        assert ("upper/penalty_norm" in metrics) == (name != "alternating")
    penalty = d_t["bilevel"] - d_t["alternating"]
    assert penalty.norm() > 1e-3
    assert penalty.norm().item() == pytest.approx(metrics["upper/penalty_norm"], rel=1e-6)
    torch.testing.assert_close(d_t["printed"] - d_t["alternating"], -penalty)
    assert metrics["upper/grad_f_norm"] == pytest.approx(d_t["alternating"].norm().item(), rel=1e-6)


def test_the_prior_pulls_towards_the_weights_it_was_built_with(testbed):
    cfg = TheoryConfig.quick().algorithm(method="alternating", inner_steps=1, pairs_per_step=4, trajectories_per_step=4)
    reward = testbed.reward(seed=3)
    algorithm = testbed.algorithm(cfg, reward, exact=True)
    batches = [algorithm.label(algorithm.source.pairs(LAMBDA, 4), 0)]
    weights = torch.ones(1, dtype=torch.float64)
    with_prior = Hypergradient(reward, replace(cfg, reward_fit=replace(cfg.reward_fit, prior=2.0)), World())
    without = Hypergradient(reward, cfg, World())
    at_anchor = [flat(h(batches, weights, {}, labels=4)[0]) for h in (with_prior, without)]
    torch.testing.assert_close(at_anchor[0], at_anchor[1])  # at φ₀ the prior has no gradient
    with torch.no_grad():
        for p in reward.parameters():
            p.add_(0.1)
    moved = [flat(h(batches, weights, {}, labels=4)[0]) for h in (with_prior, without)]
    pull = moved[0] - moved[1]
    assert pull.norm() > 1e-6 and (pull > 0).all()  # descending d_t moves φ back down towards φ₀
