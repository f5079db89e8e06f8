"""Labelling: the one place an oracle is asked anything.

Training, evaluation and the Online DPO baseline all ask through a `Labeller`. It

- asks the oracle only what it offers (`Offers`), and a `positional` judge each pair in both
  orders, so that a constant preference for the response shown first cancels;
- checks every answer and retries a failed attempt with back-off (`oracles.retry`), so a flaky
  judge costs time, never a guessed label;
- asks once per batch on the main process and hands the answer to every process;
- draws the training labels, flips each with probability `oracle.flip` (a noisy annotator,
  for robustness studies), and appends every labelled training batch to the preference store;
- counts what it was asked: training labels (the budget methods are compared at) apart from
  evaluation labels, which are never trained on, and the training labels it flipped.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from rlhf_bilevel.collectives import Collectives, World
from rlhf_bilevel.oracles.base import Offers, Oracle, OracleConfig, check_batch, check_probabilities
from rlhf_bilevel.oracles.registry import make_oracle
from rlhf_bilevel.oracles.retry import retrying
from rlhf_bilevel.store import PreferenceStore
from rlhf_bilevel.types import PreferencePairs

FLIP_SEED_OFFSET = 104_729
"""The flips are drawn from a generator of their own, seeded from the run's seed: a noisy run
draws the same rollouts and Bernoulli labels as the noiseless one, and differs only by its flips."""


def both_orders(p_first: Tensor, p_swapped: Tensor) -> Tensor:
    """P(a ≻ b) from a judge asked twice: p_first = P(a ≻ b) with a shown first, p_swapped = P(b ≻ a) with b first.

    A judge that leans towards whichever response it reads first by δ gives p + δ and
    1 − p + δ; their difference, halved and re-centred, cancels δ.
    """
    return (p_first + 1 - p_swapped) / 2


@dataclass
class LabelCounts:
    training: int = 0  # pairs labelled to learn from: the oracle budget of a run
    evaluation: int = 0  # pairs labelled to measure the run: never trained on
    flipped: int = 0  # training labels flipped by `oracle.flip`


class Labeller:
    """Asks `oracle`, retrying each failed attempt `retries` times after `backoff`·2^i seconds."""

    def __init__(
        self,
        oracle: Oracle,
        retries: int = 0,
        backoff: float = 0.0,
        flip: float = 0.0,
        seed: int = 0,
        world: Collectives = World(),
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.oracle, self.retries, self.backoff, self.flip = oracle, retries, backoff, flip
        self.world, self.sleep = world, sleep
        self.flips = torch.Generator().manual_seed(seed + FLIP_SEED_OFFSET)
        self.store = PreferenceStore()
        self.counts = LabelCounts()

    @property
    def offers_score(self) -> bool:
        """Whether the oracle has a gold score, so that gold can be measured."""
        return Offers.SCORE in self.oracle.offers

    # -- asking ----------------------------------------------------------------------------------
    def attempt(self, call: Callable[[], Any]) -> Any:
        return retrying(call, self.retries, self.backoff, self.sleep)

    def ask(self, prompts: Sequence[Any], first: Sequence[Any], second: Sequence[Any]) -> Tensor:
        """[N] P(first ≻ second), checked and retried; a positional judge is asked both ways round in one call.
        Counted by no one: `training_labels` and `evaluation_labels` are the counted ways to ask."""
        check_batch(prompts, first, second)  # the caller's bug: no retry would fix it
        if not self.oracle.positional:
            return self.attempt(lambda: self.compared(prompts, first, second))
        n = len(prompts)
        p = self.attempt(lambda: self.compared([*prompts, *prompts], [*first, *second], [*second, *first]))
        return both_orders(p[:n], p[n:])

    def compared(self, prompts: Sequence[Any], first: Sequence[Any], second: Sequence[Any]) -> Tensor:
        """One attempt: the oracle's answer, or an OracleError when it is not one probability per pair."""
        return check_probabilities(self.oracle.name, self.oracle.compare(prompts, first, second), len(prompts))

    def score(self, prompts: Sequence[Any], responses: Sequence[Any]) -> Tensor:
        """[N] gold score of each response, retried; only for an oracle that `offers_score`."""
        if not self.offers_score:
            raise TypeError(f"{self.oracle.name}: this oracle offers no gold score")
        return self.attempt(lambda: self.oracle.score(prompts, responses))

    # -- training --------------------------------------------------------------------------------
    def training_labels(
        self, prompts: Sequence[Any], first: Sequence[Any], second: Sequence[Any], generator: torch.Generator, sample: bool = True
    ) -> tuple[Tensor, Tensor]:
        """(P, label) of a whole batch, on every process: the main one asks, every process draws
        the labels from `generator` (so the generators stay in step), a Bernoulli draw from P
        when `sample`, else P itself, and then flips each with probability `flip`."""
        prob = self.ask(prompts, first, second).float() if self.world.is_main else None
        prob = self.world.broadcast(prob)
        label = torch.bernoulli(prob, generator=generator) if sample else prob
        self.counts.training += len(prob)
        return prob, self.flipped(label)

    def flipped(self, label: Tensor) -> Tensor:
        """`label` with each entry replaced by 1 − label with probability `flip` (the pair's other order).

        P itself stays the oracle's: the record of a flipped pair shows both what the noisy
        annotator said (label) and what the oracle meant (prob).
        """
        if not self.flip:
            return label
        flip = torch.rand(len(label), generator=self.flips) < self.flip
        self.counts.flipped += int(flip.sum())
        return torch.where(flip, 1 - label, label)

    def label(self, pairs: PreferencePairs, outer_step: int, generator: torch.Generator, sample: bool = True) -> PreferencePairs:
        """Labels this process's `pairs` in place and appends them to the store.

        Across processes the main one asks about the pairs of the whole batch in one call, as a
        single process would, and each process keeps the verdicts on its own pairs.
        """
        rollout = pairs.rollout
        prompts = [rollout.prompts[i] for i in pairs.first.tolist()]
        first = [rollout.responses[i] for i in pairs.first.tolist()]
        second = [rollout.responses[i] for i in pairs.second.tolist()]
        shards = self.world.gather((prompts, first, second))
        prob, label = self.training_labels(*(sum(lists, []) for lists in zip(*shards)), generator, sample)
        rows = self.world.shard(len(prob))
        pairs.prob, pairs.label = prob[rows].to(rollout.mask.device), label[rows].to(rollout.mask.device)
        self.store.add(pairs, outer_step)
        return pairs

    def metrics(self) -> dict[str, float]:
        """The training labels so far (the oracle budget spent) and, with `oracle.flip`, how many were flipped."""
        metrics = {"oracle/pairs": float(self.counts.training)}
        if self.flip:
            metrics["oracle/flipped"] = float(self.counts.flipped)
        return metrics

    # -- evaluation ------------------------------------------------------------------------------
    def evaluation_labels(self, prompts: Sequence[Any], first: Sequence[Any], second: Sequence[Any]) -> Tensor:
        """[N] P(first ≻ second) on every process (the main one asks). Never flipped: evaluation
        measures the policy and the reward model against the oracle's own preference, the
        target of learning from noisy labels; a flipped verdict would measure the noise."""
        prob = self.ask(prompts, first, second) if self.world.is_main else None
        self.counts.evaluation += len(prompts)
        return self.world.broadcast(prob)

    # -- checkpoints -----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"counts": asdict(self.counts), "flips": self.flips.get_state(), "store": self.store.state_dict()}

    def load_state_dict(self, state: dict, device: torch.device | str = "cpu") -> None:
        self.counts = LabelCounts(**state["counts"])
        self.flips.set_state(state["flips"])
        self.store.load_state_dict(state["store"], device=device)


def make_labeller(cfg: OracleConfig, seed: int = 0, world: Collectives = World()) -> Labeller:
    """The labeller of a recipe's `oracle` section; `seed` is the run's (train.seed)."""
    return Labeller(make_oracle(cfg), cfg.retries, cfg.backoff, cfg.flip, seed, world)
