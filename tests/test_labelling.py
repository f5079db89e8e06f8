"""The labeller: the one caller of the oracle; both orders, counts, flips, the store."""

import pytest
import torch

from rlhf_bilevel.config import ConfigError
from rlhf_bilevel.labelling import Labeller, make_labeller
from rlhf_bilevel.oracles import oracle_config
from rlhf_bilevel.oracles.base import Offers
from rlhf_bilevel.recipe import load_recipe
from rlhf_bilevel.types import PreferencePairs, Rollout
from test_train import TINY


class Sure:
    """Always sure the first response is better: every label is 1 unless it was flipped."""

    name = "sure"
    offers = Offers.COMPARISON
    positional = False

    def __init__(self):
        self.asked = []

    def compare(self, prompts, first, second):
        self.asked.append(list(zip(first, second)))
        return torch.ones(len(prompts))


class FirstShown(Sure):
    """A judge that prefers the response shown first by 0.3, on top of P = 0.6 for 'good' over 'bad'."""

    name = "first-shown"
    positional = True

    def compare(self, prompts, first, second):
        self.asked.append(list(zip(first, second)))
        return torch.tensor([min(1.0, (0.6 if a == "good" else 0.4) + 0.3) for a in first])


def pairs_of(n: int) -> PreferencePairs:
    """n pairs of a rollout of 2n responses: (2i, 2i + 1)."""
    rollout = Rollout(
        [f"p{i // 2}" for i in range(2 * n)], [f"r{i}" for i in range(2 * n)], torch.zeros(2 * n, 3, dtype=torch.long),
        torch.ones(2 * n, 3), torch.zeros(2 * n, 3), torch.zeros(2 * n, 3), torch.full((2 * n,), 1 / (2 * n)),
        context=torch.zeros(2 * n, 2),  # what a checkpoint saves with the rollout
    )
    return PreferencePairs(rollout, torch.arange(0, 2 * n, 2), torch.arange(1, 2 * n, 2), torch.full((n,), 1 / n))


def test_a_positional_judge_is_asked_both_ways_in_one_call_and_its_bias_cancels():
    judge = FirstShown()
    prob = Labeller(judge).ask(["p", "q"], ["good", "bad"], ["bad", "good"])
    # (P_shown(good first) + 1 − P_shown(bad first)) / 2 = (0.9 + 1 − 0.7) / 2: the 0.3 bias is gone
    torch.testing.assert_close(prob, torch.tensor([0.6, 0.4]))
    assert judge.asked == [[("good", "bad"), ("bad", "good"), ("bad", "good"), ("good", "bad")]]


def test_an_order_free_oracle_is_asked_once():
    oracle = Sure()
    Labeller(oracle).ask(["p"], ["a"], ["b"])
    assert oracle.asked == [[("a", "b")]]


def test_training_and_evaluation_labels_are_counted_apart_and_only_training_is_flipped():
    labeller = Labeller(Sure(), flip=0.4, seed=3)
    prob, label = labeller.training_labels(["p"] * 200, ["a"] * 200, ["b"] * 200, torch.Generator().manual_seed(0))
    assert (prob == 1).all()  # the oracle's verdict is kept as it said it
    flipped = int((label == 0).sum())
    assert flipped == labeller.counts.flipped and 0 < flipped < 200
    evaluation = labeller.evaluation_labels(["p"] * 50, ["a"] * 50, ["b"] * 50)
    assert (evaluation == 1).all()
    assert (labeller.counts.training, labeller.counts.evaluation, labeller.counts.flipped) == (200, 50, flipped)
    assert labeller.metrics() == {"oracle/pairs": 200.0, "oracle/flipped": float(flipped)}
    assert Labeller(Sure()).metrics() == {"oracle/pairs": 0.0}  # no flips asked, none reported


def test_flips_come_at_the_rate_asked_from_a_seeded_stream_of_their_own():
    def flips(seed, p=0.25, n=4000):
        labeller = Labeller(Sure(), flip=p, seed=seed)
        return labeller.training_labels(["p"] * n, ["a"] * n, ["b"] * n, torch.Generator().manual_seed(0))[1]

    assert torch.equal(flips(0), flips(0)) and not torch.equal(flips(0), flips(1))
    assert (1 - flips(0)).mean().item() == pytest.approx(0.25, abs=0.03)  # binomial sd 0.007


def test_without_flips_the_labels_are_the_bernoulli_draws_of_the_training_stream():
    prob = torch.linspace(0.05, 0.95, 64)

    class Graded(Sure):
        def compare(self, prompts, first, second):
            return prob

    generator, expected = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    _, label = Labeller(Graded()).training_labels(["p"] * 64, ["a"] * 64, ["b"] * 64, generator)
    assert torch.equal(label, torch.bernoulli(prob, generator=expected))
    assert torch.equal(generator.get_state(), expected.get_state())  # nothing else drawn from it
    _, soft = Labeller(Graded(), flip=0.3).training_labels(["p"] * 64, ["a"] * 64, ["b"] * 64, generator, sample=False)
    assert ((soft == prob) | (soft == 1 - prob)).all()  # an expected label is flipped to the pair's other order


def test_label_stores_the_pairs_and_a_restored_labeller_goes_on_with_the_same_flips():
    labeller = Labeller(Sure(), flip=0.3, seed=0)
    generator = torch.Generator().manual_seed(0)
    pairs = labeller.label(pairs_of(4), outer_step=2, generator=generator)
    assert pairs.label is not None and pairs.prob.tolist() == [1.0] * 4
    assert labeller.store.batches == [pairs] and labeller.store.steps == [2] and len(labeller.store) == 4
    state = labeller.state_dict()
    restored = Labeller(Sure(), flip=0.3, seed=0)
    restored.load_state_dict(state)
    assert restored.counts == labeller.counts and len(restored.store) == 4
    again = [lab.label(pairs_of(8), 3, torch.Generator().manual_seed(1)).label for lab in (labeller, restored)]
    assert torch.equal(*again)


@pytest.mark.parametrize("flip", [-0.1, 0.5, 0.9])
def test_flip_outside_zero_to_one_half_is_a_one_line_error_naming_the_field(flip):
    with pytest.raises(ConfigError, match=r"^oracle\.flip: must be in \[0, 0\.5\)") as caught:
        load_recipe(TINY, [f"oracle.flip={flip}"])
    assert "\n" not in str(caught.value)


def test_make_labeller_takes_the_recipe_oracle_settings():
    labeller = make_labeller(oracle_config(kind="length", retries=2, backoff=0.5, flip=0.1), seed=7)
    assert (labeller.retries, labeller.backoff, labeller.flip) == (2, 0.5, 0.1)
    assert labeller.offers_score and labeller.score(["p"], ["three short words"]).tolist() == [3.0]
