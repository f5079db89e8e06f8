"""The convergence lab on a small problem: the σ floor of Theorem 1, exact and as Algorithm 1 reaches it."""

import math
import statistics

import pytest
import torch

from rlhf_bilevel import environment
from rlhf_bilevel.commands.theory import run_lab
from rlhf_bilevel.config import ConfigError
from rlhf_bilevel.exact.lab import ConvergenceStudy, Lab, TheoryConfig, fit_slope
from rlhf_bilevel.exact.testbed import TestbedConfig


@pytest.fixture(scope="module")
def sweep(one_thread):
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    testbed = TestbedConfig(prompts=2, vocab=3, horizon=2, reward_hidden=0)
    lab = Lab(TheoryConfig.quick(testbed=testbed, outer_steps=150, sigmas=(0.8, 0.2)))
    star = lab.phi_star()
    yield star, ConvergenceStudy(lab).sigma_sweep(star["phi_star"])
    torch.set_default_dtype(previous)


def test_phi_star_is_attained_from_every_start(sweep):
    star, _ = sweep
    assert star["reached"] == len(star["starts"])  # with ρ > 0 the minimiser is a point, not a direction to ∞


def test_exact_bias_of_the_penalty_minimiser_is_order_sigma_squared(sweep):
    _, result = sweep
    assert all(b > 0 for b in result["bias"])
    assert 1.8 < result["bias_slope"] < 2.2, result["bias"]  # Φ(argmin L_σ) − Φ* ∝ σ²


def test_algorithm_reaches_the_sigma_floor(sweep):
    """Exact gradients, T = 150: the gap it sits at shrinks with σ, within a small factor of the bias.

    Deterministic; the margins cover what K = 8 inner steps and the 1/t swings of φ leave.
    """
    _, result = sweep
    assert result["gap"][0] > result["gap"][1]
    assert 1.2 < result["slope"] < 2.5, result["gap"]
    for reached, bias in zip(result["gap"], result["bias"]):
        assert bias < 4 * reached and reached < 4 * bias, (result["gap"], result["bias"])


@pytest.fixture(scope="module")
def replay(one_thread):
    """The theorem's φ update and the replayed store's on the small problem, exact (T = 24) and sampled (T = 4)."""
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    testbed = TestbedConfig(prompts=2, vocab=3, horizon=2, reward_hidden=0)
    cfg = TheoryConfig.quick(testbed=testbed, outer_steps=24, replay_outer_steps=24, sampled_outer_steps=4)
    lab = Lab(cfg)
    phi_star = lab.phi_star()["phi_star"]
    yield {
        "theorem": lab.run(phi_star, True, cfg.outer_steps),
        "exact": lab.run(phi_star, True, cfg.outer_steps, probe=lab.store_bias, reward_fit=cfg.replay_fit(1, exact=True)),
        "sampled": lab.run(phi_star, False, cfg.sampled_outer_steps, labels="sample", reward_fit=cfg.replay_fit(cfg.replay_steps, exact=False)),
    }
    torch.set_default_dtype(previous)


def test_replayed_store_converges_with_exact_gradients(replay):
    """Every label of the run in f̂, one φ step per outer iteration: the gap falls a hundredfold, and the run
    sits (median |Φ_t − Φ*| of its last window) within 3× of where the theorem's update sits.

    Deterministic; at T = 24 the gap falls 660×, and the replay's median is 1.3× the theorem's (2.8e-5, 2.2e-5).
    """
    gap, theorem = replay["exact"]["gap"], replay["theorem"]
    assert replay["exact"]["replay"] and replay["exact"]["reward_steps"] == 1
    assert abs(gap[-1]) < abs(gap[0]) / 100, gap
    assert replay["exact"]["median_gap"] < 3 * theorem["median_gap"], (replay["exact"]["median_gap"], theorem["median_gap"])


def test_store_gradient_points_along_the_exact_one(replay):
    """d_t on the store (older λ′ iterates' pairs too) against d_t on fresh exact pairs: biased (an error
    of zero would mean the store held only the fresh batch), not opposed (measured: cosine ≥ 0.86)."""
    probed = replay["exact"]["probe"]
    assert len(probed) == 24
    errors, cosines = [p["relative_error"] for p in probed], [p["cosine"] for p in probed]
    assert all(math.isfinite(e) and e > 0 for e in errors), errors
    assert min(cosines) > 0 and statistics.median(cosines) > 0.9, cosines


def test_sampled_replay_run_closes_its_gap(replay):
    """Sampled labels, several φ steps on the store, the prior and the pooled penalty (the LM's update, its step rule aside)."""
    run = replay["sampled"]
    assert run["replay"] and run["reward_steps"] > 1
    assert abs(run["gap"][-1]) < abs(run["gap"][0]), run["gap"]


def test_fit_slope_recovers_a_power_law():
    assert fit_slope([1, 2, 4, 8], [3 * x**-2 for x in (1, 2, 4, 8)]) == pytest.approx(-2)


@pytest.mark.parametrize(
    "changes, field",
    [({"sigmas": (0.1,)}, "sigmas"), ({"sigmas": (0.1, 0.0)}, "sigmas"), ({"reward_decay": -1.0}, "reward_decay"), ({"batch_sizes": (1, 8)}, "batch_sizes"),
     ({"replay_outer_steps": 300}, "replay_outer_steps"), ({"replay_prior": -1.0}, "replay_prior")],
)
def test_bad_lab_settings_name_their_field(changes, field):
    with pytest.raises(ConfigError, match=field):
        TheoryConfig(**changes)


def test_the_lab_gives_back_the_callers_dtype_threads_and_random_stream(tmp_path):
    # it computes in float64 on one thread, and draws from generators of its own
    cfg = TheoryConfig(
        testbed=TestbedConfig(prompts=2, vocab=3, horizon=2, reward_hidden=0), outer_steps=4, inner_steps=2, sampled_outer_steps=2,
        replay_outer_steps=2, replay_steps=2, pairs=4, trajectories=8, sigmas=(0.8, 0.4), batch_sizes=(2, 4), starts=1,
    )
    count, rng = torch.get_num_threads() + 1, torch.get_rng_state()  # a count the lab does not use
    with environment.threads(count), environment.default_dtype(torch.float32):
        run_lab(cfg, tmp_path, log=lambda line: None)
        assert torch.get_num_threads() == count and torch.get_default_dtype() == torch.float32
    assert torch.equal(torch.get_rng_state(), rng) and (tmp_path / "theory.json").is_file()
