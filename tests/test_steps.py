"""Step rules: weight decay optimises the objective with ρ/2 ‖x‖², and the schedules do not restart."""

import pytest
import torch

from rlhf_bilevel.steps import StepConfig, Stepper


@pytest.mark.parametrize("ascend", [True, False])
def test_weight_decay_pulls_towards_zero_whichever_the_direction_of_travel(ascend):
    x = torch.tensor([3.0, -4.0])
    stepper = Stepper([x], StepConfig(rule="normalized", lr=0.5, schedule="constant", weight_decay=0.1), ascend=ascend)
    size = stepper.step([torch.zeros(2)])  # at a stationary point of the objective itself
    torch.testing.assert_close(x, torch.tensor([2.7, -3.6]))  # 0.5 along −x/‖x‖
    assert size == pytest.approx(0.5)  # ‖ρx‖


def test_normalised_descent_with_decay_finds_the_regularised_minimiser():
    """min (x − 2)² + ρ/2 x² has its minimiser at 2/(1 + ρ/2); 1/t normalised steps reach it."""
    x = torch.tensor([0.0])
    stepper = Stepper([x], StepConfig(rule="normalized", lr=1.0, schedule="inverse", weight_decay=1.0), ascend=False)
    for _ in range(2000):
        stepper.step([2 * (x - 2)])
    assert x.item() == pytest.approx(2 / 1.5, abs=2e-3)


def test_inverse_sqrt_schedule_decays_without_restarting():
    stepper = Stepper([torch.zeros(1)], StepConfig(rule="adam", lr=0.2, schedule="inverse_sqrt"), ascend=True)
    rates = []
    for _ in range(4):
        rates.append(stepper.rate())
        stepper.step([torch.ones(1)])
    assert rates == pytest.approx([0.2, 0.2 / 2**0.5, 0.2 / 3**0.5, 0.1])
