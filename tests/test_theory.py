"""The convergence lab on a small problem: the σ floor of Theorem 1, exact and as Algorithm 1 reaches it."""

import pytest

from rlhf_bilevel.config import ConfigError
from rlhf_bilevel.exact.testbed import TestbedConfig
from rlhf_bilevel.theory import Lab, TheoryConfig, fit_slope


@pytest.fixture(scope="module")
def sweep(one_thread):
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    testbed = TestbedConfig(prompts=2, vocab=3, horizon=2, reward_hidden=0)
    lab = Lab(TheoryConfig.quick(testbed=testbed, outer_steps=150, sigmas=(0.8, 0.2)), log=lambda line: None)
    star = lab.phi_star()
    yield star, lab.sigma_sweep(star["phi_star"])
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


def test_fit_slope_recovers_a_power_law():
    assert fit_slope([1, 2, 4, 8], [3 * x**-2 for x in (1, 2, 4, 8)]) == pytest.approx(-2)


@pytest.mark.parametrize(
    "changes, field",
    [({"sigmas": (0.1,)}, "sigmas"), ({"sigmas": (0.1, 0.0)}, "sigmas"), ({"reward_decay": -1.0}, "reward_decay"), ({"batch_sizes": (1, 8)}, "batch_sizes")],
)
def test_bad_lab_settings_name_their_field(changes, field):
    with pytest.raises(ConfigError, match=field):
        TheoryConfig(**changes)
