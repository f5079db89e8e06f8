"""Non-finite updates are skipped, never applied: one NaN in λ, λ′, φ or a critic's weights would
poison every later step. Skips are counted per block, and `max_bad_steps` of them in a row in one
block stop the run (NonFiniteError)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch

from rlhf_bilevel.steps import Stepper
from rlhf_bilevel.types import LAMBDA, LAMBDA_PRIME

BLOCKS = {LAMBDA: "λ", LAMBDA_PRIME: "λ′", "phi": "φ"}
"""What each parameter block is called in messages; a critic is called after its policy's block."""


class NonFiniteError(RuntimeError):
    """One parameter block had `max_bad_steps` non-finite updates in a row, all skipped."""


class NonFiniteGuard:
    """Applies only finite updates, and counts the skipped ones per block (λ, λ′, φ, each critic).

    `max_bad_steps`: skipped updates in a row of one block that stop the run; None never stops it.
    `outer_step`: the outer step under way (from 1), which the stop names.
    """

    def __init__(self, max_bad_steps: int | None, outer_step: Callable[[], int]):
        self.max_bad_steps = max_bad_steps
        self.outer_step = outer_step
        self.bad_in_a_row: dict[str, int] = {}  # block → its updates skipped since its last good one
        self.nonfinite_steps = 0  # updates skipped so far, all blocks together

    def step(self, block: str, stepper: Stepper, direction: list[torch.Tensor], loss: float = 0.0) -> float:
        """Steps `block` along `direction` and returns ‖d‖; a non-finite direction or loss is skipped (NaN returned)."""
        if math.isfinite(loss) and all(torch.isfinite(d).all() for d in direction):
            self.passed(block)
            return stepper.step(direction)
        self.skipped(block, BLOCKS[block], "its loss was not finite" if not math.isfinite(loss) else "its gradient was not finite")
        return math.nan

    def passed(self, block: str) -> None:
        """`block`'s update was finite and applied."""
        self.bad_in_a_row[block] = 0

    def skipped(self, block: str, name: str, reason: str) -> None:
        """`block`'s update (`name` in the message) was not applied, because of `reason`."""
        self.nonfinite_steps += 1
        self.bad_in_a_row[block] = self.bad_in_a_row.get(block, 0) + 1
        if self.max_bad_steps is not None and self.bad_in_a_row[block] >= self.max_bad_steps:
            raise NonFiniteError(
                f"the last {self.bad_in_a_row[block]} updates of {name} were skipped, {reason} "
                f"(outer step {self.outer_step()}; {self.nonfinite_steps} updates skipped in all)"
            )

    def state_dict(self) -> dict:
        return {"bad_in_a_row": dict(self.bad_in_a_row), "nonfinite_steps": self.nonfinite_steps}

    def load_state_dict(self, state: dict) -> None:
        self.bad_in_a_row = dict(state["bad_in_a_row"])
        self.nonfinite_steps = state["nonfinite_steps"]


def tensors_in(tree: Any) -> Iterator[torch.Tensor]:
    """Every tensor of a state_dict-like tree of dicts, lists and tuples."""
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, dict):
        for value in tree.values():
            yield from tensors_in(value)
    elif isinstance(tree, (list, tuple)):
        for value in tree:
            yield from tensors_in(value)
