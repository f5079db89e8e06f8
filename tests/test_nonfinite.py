"""The guard applies only finite updates, counts the skipped ones per block, and stops the run after `max_bad_steps` in a row."""

import math

import pytest
import torch

from rlhf_bilevel.nonfinite import NonFiniteError, NonFiniteGuard, tensors_in
from rlhf_bilevel.steps import StepConfig, Stepper


def stepper() -> Stepper:
    return Stepper([torch.zeros(3)], StepConfig(rule="normalized", lr=1.0, schedule="constant"), ascend=True)


def test_a_finite_step_is_applied_and_a_non_finite_one_is_skipped_and_counted():
    guard, step = NonFiniteGuard(max_bad_steps=None, outer_step=lambda: 1), stepper()
    assert guard.step("lambda", step, [torch.tensor([3.0, 0.0, 4.0])]) == 5.0
    torch.testing.assert_close(step.params[0], torch.tensor([0.6, 0.0, 0.8]))
    assert math.isnan(guard.step("lambda", step, [torch.tensor([math.nan, 0.0, 0.0])]))
    assert math.isnan(guard.step("phi", step, [torch.ones(3)], loss=math.inf))
    torch.testing.assert_close(step.params[0], torch.tensor([0.6, 0.0, 0.8]))
    assert guard.bad_in_a_row == {"lambda": 1, "phi": 1} and guard.nonfinite_steps == 2 and step.count == 1


def test_max_bad_steps_in_a_row_of_one_block_stop_the_run_and_a_good_step_resets_the_count():
    outer = [7]
    guard, step = NonFiniteGuard(max_bad_steps=2, outer_step=lambda: outer[0]), stepper()
    nan = [torch.full((3,), math.nan)]
    guard.step("lambda_prime", step, nan)
    guard.step("lambda", step, nan)  # another block's skip does not add to λ′'s run
    guard.step("lambda_prime", step, [torch.ones(3)])
    guard.step("lambda_prime", step, nan)
    with pytest.raises(NonFiniteError, match=r"the last 2 updates of λ′ were skipped, its loss was not finite \(outer step 7; 4 updates skipped in all\)"):
        guard.step("lambda_prime", step, [torch.ones(3)], loss=math.nan)


def test_the_counts_survive_a_state_dict():
    guard = NonFiniteGuard(max_bad_steps=None, outer_step=lambda: 1)
    guard.skipped("critic/lambda", "the critic of λ", "its TD fit left non-finite weights")
    resumed = NonFiniteGuard(max_bad_steps=None, outer_step=lambda: 1)
    resumed.load_state_dict(guard.state_dict())
    assert resumed.bad_in_a_row == {"critic/lambda": 1} and resumed.nonfinite_steps == 1
    assert guard.state_dict().keys() == {"bad_in_a_row", "nonfinite_steps"}  # keys of the bilevel checkpoint


def test_tensors_in_finds_every_tensor_of_a_nested_state():
    a, b, c = torch.zeros(1), torch.ones(2), torch.full((1,), 2.0)
    found = list(tensors_in({"x": a, "y": [b, (c, 3)], "z": "text"}))
    assert len(found) == 3 and all(f is t for f, t in zip(found, (a, b, c)))
