"""The preference store: every pair the oracle labelled during a run, kept for the reward model.

The theorem's φ step (docs/algorithm.md, step 6) sees the B pairs labelled at the end of an outer
step, once; the K·B pairs of the inner steps feed only λ′. On a language model that starves
r_φ of labels (docs/algorithm.md, "The φ update in practice"). The store keeps every labelled batch
with the outer step it came from, so `estimators.store_loss` can replay all of them at every
step of φ's fit, weighting older batches down when `RewardFitConfig.half_life` says so.

A batch keeps its rollout (tokens, mask and the context its policy scores from: on a language
model the frozen features, on the exact MDP the node path), so r_φ can be evaluated again at
any φ. It is saved with each checkpoint and restored on resume.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from rlhf_bilevel.types import PreferencePairs, Rollout

PAIR_TENSORS = ("first", "second", "weight", "prob", "label")


@dataclass(frozen=True)
class RewardFitConfig:
    replay: bool = field(
        default=True,
        metadata={"help": "replay every labelled pair of the run at every step of φ's fit; false: the theorem's update, the last B pairs only"},
    )
    steps: int = field(default=1, metadata={"help": "steps of φ per outer iteration (> 0), each along d_t recomputed at the current φ"})
    # it anchors φ while labels are few and fades as they grow, the role the 1/t schedule plays for a single step
    prior: float = field(
        default=0.0, metadata={"help": "c of the prior (c/N)‖φ − φ₀‖², N the labels in the store (≥ 0; 0: no prior)"}
    )
    # the store leans towards the pairs of the current π_λ′, whose distribution f(φ, λ′) is an expectation over
    half_life: float | None = field(
        default=None,
        metadata={"help": "a batch labelled `half_life` outer steps ago counts half as much as a fresh one (> 0); null: every label counts the same"},
    )
    penalty_from: Literal["all", "final"] = field(
        default="all",
        metadata={"help": "the penalty's ∇φĴ(λ) and ∇φĴ(λ′) from every trajectory the outer step drew of each policy (all), "
                          "or from the hypergradient's own draws only (final)"},
    )
    # bounds a step's cost when r_φ runs a trunk of its own (reward.lora), where every batch costs a
    # forward and backward pass
    minibatch: int | None = field(default=None, metadata={"help": "stored batches replayed per step (> 0); null: all"})


class PreferenceStore:
    """The labelled batches of a run, oldest first, each with the outer step that labelled it."""

    def __init__(self) -> None:
        self.batches: list[PreferencePairs] = []
        self.steps: list[int] = []

    def add(self, pairs: PreferencePairs, outer_step: int) -> None:
        self.batches.append(pairs)
        self.steps.append(outer_step)

    def __len__(self) -> int:
        """Labelled pairs held (this process's share of them in a run of several)."""
        return sum(len(pairs) for pairs in self.batches)

    def weights(self, now: int, half_life: float | None, device: torch.device | str = "cpu") -> Tensor:
        """[batches] how much each batch counts: 1 each, or halved every `half_life` outer steps of age."""
        age = torch.tensor([now - step for step in self.steps], dtype=torch.float64, device=device)
        return torch.ones_like(age) if half_life is None else 0.5 ** (age / half_life)

    def state_dict(self) -> dict:
        return {"steps": list(self.steps), "batches": [pairs_state(pairs) for pairs in self.batches]}

    def load_state_dict(self, state: dict, device: torch.device | str = "cpu") -> None:
        self.steps = list(state["steps"])
        self.batches = [pairs_from_state(saved, device) for saved in state["batches"]]


def pairs_state(pairs: PreferencePairs) -> dict:
    return {**{name: getattr(pairs, name) for name in PAIR_TENSORS}, "rollout": pairs.rollout.state_dict()}


def pairs_from_state(state: dict, device: torch.device | str) -> PreferencePairs:
    rollout = Rollout.from_state(state["rollout"], device)
    return PreferencePairs(rollout=rollout, **{name: state[name].to(device) for name in PAIR_TENSORS})
