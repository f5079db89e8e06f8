"""`rlhf-bilevel eval`: the win-rate, agreement and bootstrap arithmetic by hand, then the command end to end."""

import json
import math
from dataclasses import astuple
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli

from rlhf_bilevel.commands.train import train
from rlhf_bilevel.evaluate import EvalConfig, agreement, bootstrap, evaluate, policy_measures, pooled, snapshot_measures
from rlhf_bilevel.labelling import Labeller, both_orders
from rlhf_bilevel.oracles.base import Offers
from rlhf_bilevel.oracles import oracle_config
from rlhf_bilevel.oracles.rules import length_oracle
from rlhf_bilevel.types import LAMBDA, AdapterSwitch, Rollout
from test_train import RECIPES, TINY, tiny_recipe


def test_both_orders_cancels_a_judge_position_bias():
    p, bias = torch.tensor([0.9, 0.3, 0.5]), 0.07
    shown_first, shown_second = p + bias, (1 - p) + bias  # the judge leans towards whatever it reads first
    assert torch.allclose(both_orders(shown_first, shown_second), p)
    # swapping the two responses turns P into 1 − P
    assert torch.allclose(both_orders(shown_second, shown_first), 1 - p)


def test_agreement_by_hand():
    margins = torch.tensor([1.0, -1.0, 0.0, 2.0, -0.5])
    prob = torch.tensor([0.9, 0.9, 0.8, 0.5, 0.1])
    # right, wrong, a zero margin (half right), an oracle tie (dropped), right
    assert agreement(margins, prob).tolist() == [1.0, 0.0, 0.5, 1.0]


def test_bootstrap_of_a_constant_and_of_one_value():
    rng = np.random.default_rng(0)
    assert astuple(bootstrap(torch.full((7,), 0.25), 500, 0.9, rng)) == pytest.approx((0.25, 0.25, 0.25, 7))
    assert astuple(bootstrap(torch.tensor([1.0]), 500, 0.9, rng)) == pytest.approx((1.0, 1.0, 1.0, 1))
    assert math.isnan(bootstrap(torch.tensor([]), 500, 0.9, rng).mean)


def test_bootstrap_pools_the_observations_of_each_unit():
    # three prompts with 2 of 2, 0 of 1 and 1 of 3 pairs agreeing: the pooled rate is 3/6, over 6 pairs
    pooled = bootstrap(torch.tensor([2.0, 0.0, 1.0]), 500, 0.9, np.random.default_rng(0), counts=torch.tensor([2, 1, 3]))
    assert (pooled.mean, pooled.n) == (0.5, 6) and pooled.low < 0.5 < pooled.high
    # one observation per unit is the plain bootstrap, draw for draw; a unit with none is left out
    values = torch.tensor([1.0, 0.0, 1.0, 1.0])
    plain = bootstrap(values, 500, 0.9, np.random.default_rng(3))
    assert bootstrap(values, 500, 0.9, np.random.default_rng(3), counts=torch.ones(4)) == plain
    assert bootstrap(torch.cat([values, torch.zeros(1)]), 500, 0.9, np.random.default_rng(3), counts=torch.tensor([1, 1, 1, 1, 0])) == plain


def test_bootstrap_of_a_pooled_rate_resamples_units_whole():
    # 10 prompts, each with all of its 4 pairs agreeing or none: the pooled rate is the plain mean of
    # the 10 prompt rates, and so is its interval (resampling 40 pairs one by one would halve it)
    rates = torch.tensor([1.0, 0.0] * 5)
    pooled = bootstrap(4 * rates, 4000, 0.95, np.random.default_rng(2), counts=torch.full((10,), 4))
    plain = bootstrap(rates, 4000, 0.95, np.random.default_rng(2))
    assert astuple(pooled)[:3] == pytest.approx(astuple(plain)[:3]) and pooled.n == 40


def test_bootstrap_interval_matches_the_normal_approximation():
    # 200 wins out of 400: the 95% interval is 0.5 ± 1.96·sqrt(0.25/400) = 0.5 ± 0.049; with 4000
    # resamples the percentile endpoints scatter by about 0.003, so 0.008 is a 2.5σ tolerance.
    values = torch.tensor([1.0, 0.0] * 200)
    half_width = 1.96 * math.sqrt(0.25 / 400)
    for seed in range(3):
        estimate = bootstrap(values, 4000, 0.95, np.random.default_rng(seed))
        assert estimate.mean == 0.5
        assert estimate.low == pytest.approx(0.5 - half_width, abs=0.008)
        assert estimate.high == pytest.approx(0.5 + half_width, abs=0.008)


class ScriptedPolicy(AdapterSwitch):
    """Answers every prompt with a fixed text per adapter: the evaluation can then be worked out by hand."""

    def __init__(self, answers: dict):
        self.answers = answers

    def sample(self, prompts, generator):
        responses = [self.answers[self.active][i % len(self.answers[self.active])] for i in range(len(prompts))]
        n, horizon = len(prompts), 4
        mask = torch.ones(n, horizon)
        # π_λ puts log 2 more on each of its four tokens than π_ref: a KL of 4·log 2 per response
        logp = torch.full((n, horizon), -1.0)
        ref_logp = logp - (math.log(2) if self.active == LAMBDA else 0.0)
        return Rollout(list(prompts), responses, torch.zeros(n, horizon, dtype=torch.long), mask, logp, ref_logp, torch.full((n,), 1 / n))


class LengthReward:
    """A reward model that prefers the longer response, as the length oracle does."""

    def token_rewards(self, rollout):
        words = torch.tensor([float(len(r.split())) for r in rollout.responses])
        return words[:, None] * rollout.mask / rollout.mask.sum(-1, keepdim=True)


@pytest.mark.parametrize("samples", [1, 2])
def test_evaluate_by_hand_with_a_scripted_policy(samples):
    # Prompts alternate between two answers per adapter: each pair of the policy is [long, short],
    # of the reference [short, short]. Deterministic length labels: the policy wins one comparison of
    # two in every pair (long ≻ short, short = short is a tie worth half): win rate 3/4 exactly.
    policy = ScriptedPolicy({LAMBDA: ["a b c d", "a"], None: ["a", "a"]})
    oracle = length_oracle(oracle_config(kind="length", labels="deterministic"))
    result = evaluate(policy, Labeller(oracle), ["p1", "p2", "p3"], EvalConfig(resamples=200, samples=samples), reward=LengthReward())
    assert result["win_rate"].mean == pytest.approx(0.75)
    assert result["gold"]["policy"].mean == pytest.approx(2.5) and result["gold"]["reference"].mean == pytest.approx(1.0)
    assert result["kl"] == pytest.approx(4 * math.log(2))
    # the reward model orders the policy's pairs as the oracle does; the reference's pairs are all ties
    assert result["agreement"]["policy"].mean == 1.0 and result["agreement"]["reference"].n == 0
    assert result["agreement"]["policy"].n == 3 * samples and result["win_rate"].n == 3  # pairs; the unit stays the prompt
    # 3 prompts: 2 responses against the reference for the win rate, one pair each for agreement on both sides, per sample
    assert result["oracle_pairs"] == (3 * 2 + 3 * 2) * samples  # win rate, then agreement: 2 pairs a prompt each


class ShorterReward(LengthReward):
    """The length reward turned round: it orders every decided pair against the length oracle."""

    def token_rewards(self, rollout):
        return -super().token_rewards(rollout)


def test_snapshot_measures_by_hand_agree_with_evaluate():
    # the policy's pairs are [long, short], of 4 and 1 words: gold 2.5; log 2 more than π_ref on each of
    # 4 tokens: KL 4 log 2; a reward for length orders every pair as the length oracle does, its reverse none
    policy = ScriptedPolicy({LAMBDA: ["a b c d", "a"], None: ["a", "a"]})
    oracle = length_oracle(oracle_config(kind="length", labels="deterministic"))
    cfg, prompts = EvalConfig(resamples=200, samples=2), ["p1", "p2", "p3"]
    moved = {"gold": pytest.approx(2.5), "kl": pytest.approx(4 * math.log(2))}
    assert snapshot_measures(policy, Labeller(oracle), prompts, cfg) == moved
    assert snapshot_measures(policy, Labeller(oracle), prompts, cfg, LengthReward()) == moved | {"agreement": 1.0}
    assert snapshot_measures(policy, Labeller(oracle), prompts, cfg, adapter=None)["kl"] == 0.0
    assert snapshot_measures(policy, Labeller(oracle), prompts, cfg, ShorterReward())["agreement"] == 0.0
    full = evaluate(policy, Labeller(oracle), prompts, cfg, reward=LengthReward())
    assert (full["gold"]["policy"].mean, full["agreement"]["policy"].mean) == pytest.approx((2.5, 1.0))


class WordAReward(LengthReward):
    """Counts the word "a": on pairs of different lengths it orders some as the length oracle does, ties others."""

    def token_rewards(self, rollout):
        count = torch.tensor([float(r.split().count("a")) for r in rollout.responses])
        return count[:, None] * rollout.mask / rollout.mask.sum(-1, keepdim=True)


@pytest.mark.parametrize("reward", [None, LengthReward(), WordAReward()])
def test_the_final_evaluation_gives_the_last_snapshots_measures(reward):
    # what compare reads off a run's final evaluation rather than measuring its last snapshot again. Pairs
    # (4 words, 1), (1, 2), (2, 1), the "a"-counter's margins 0, +1 and +2 words towards the longer: it agrees
    # on 2.5 of 3; gold, the mean length, 11/6
    policy = ScriptedPolicy({LAMBDA: ["a b c d", "a", "b", "a b", "a a", "b"], None: ["a", "a"]})
    oracle = length_oracle(oracle_config(kind="length", labels="deterministic"))
    cfg, prompts = EvalConfig(resamples=200, samples=3), ["p1", "p2"]
    measured = snapshot_measures(policy, Labeller(oracle), prompts, cfg, reward)
    assert measured["gold"] == pytest.approx(11 / 6)
    if isinstance(reward, WordAReward):
        assert measured["agreement"] == pytest.approx(2.5 / 3)
    assert policy_measures(evaluate(policy, Labeller(oracle), prompts, cfg, reward=reward)) == pytest.approx(measured)


class FirstShownJudge:
    """A positional judge: P(longer ≻ shorter) = 0.9, a tie ½, plus `bias` for the response it reads
    first; it counts the comparisons it is asked."""

    name, offers, positional = "first-shown", Offers.COMPARISON, True

    def __init__(self, bias: float):
        self.bias, self.asked = bias, 0

    def compare(self, prompts, first, second):
        self.asked += len(prompts)
        return torch.tensor([0.5 + 0.4 * ((len(a) > len(b)) - (len(a) < len(b))) + self.bias for a, b in zip(first, second)])


def test_a_positional_judge_is_asked_each_pair_once_both_ways_and_its_bias_cancels():
    policy = ScriptedPolicy({LAMBDA: ["a b c d", "a"], None: ["a", "a"]})
    judge = FirstShownJudge(bias=0.07)
    result = evaluate(policy, Labeller(judge), ["p1", "p2", "p3"], EvalConfig(resamples=200))
    # each response of the policy against the reference's: long ≻ short (0.9), and a tie (½); asked one
    # way only, the bias would give (0.97 + 0.57)/2
    assert result["win_rate"].mean == pytest.approx((0.9 + 0.5) / 2)
    assert judge.asked == 2 * result["oracle_pairs"] == 2 * 3 * 2


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("eval-run") / "run"
    train(tiny_recipe(), run_dir, RECIPES)
    return run_dir


def test_eval_command_writes_json_report_and_plot(tiny_run, tmp_path):
    out = tmp_path / "eval"
    result = run_cli("eval", "--run", str(tiny_run), "--prompts", "6", "--resamples", "200", "--pairs-per-prompt", "2", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "win rate vs reference" in result.stdout
    report = json.loads((out / "eval.json").read_text())
    assert report["prompts"] == 6 and report["oracle_pairs"] == (6 * 2 + 6 * 2) * 2
    assert 0 <= report["win_rate"]["low"] <= report["win_rate"]["mean"] <= report["win_rate"]["high"] <= 1
    assert set(report["agreement"]) == {"policy", "reference"} and set(report["gold"]) == {"policy", "reference"}
    assert (out / "training.png").stat().st_size > 0
    assert "![training curves](training.png)" in (out / "report.md").read_text()


def test_eval_of_an_adapter_equal_to_the_reference_is_a_draw(tiny_run, tmp_path):
    # A fresh LoRA adapter (B = 0) is π_ref itself. With common random numbers both write the same
    # responses, so every comparison is a tie: win rate exactly 1/2, and KL 0 up to the float error
    # between generate's logits and a fresh forward pass.
    from rlhf_bilevel.lm.model import load_base, with_adapters

    recipe = tiny_recipe()
    model = with_adapters(load_base(recipe.model)[0], recipe.adapters)
    model.save_pretrained(tmp_path / "fresh", selected_adapters=[LAMBDA])
    adapter = tmp_path / "fresh" / LAMBDA
    result = run_cli("eval", "--adapter", str(adapter), "--recipe", str(TINY), "--prompts", "4", "--resamples", "100")
    assert result.returncode == 0, result.stderr
    report = json.loads((adapter / "eval" / "eval.json").read_text())
    assert report["win_rate"]["mean"] == 0.5 and report["kl"] == pytest.approx(0.0, abs=1e-5)
    assert "agreement" not in report  # an adapter alone has no reward model


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "--run or --adapter"),
        (["--adapter", "nowhere"], "--recipe: required with --adapter"),
        (["--adapter", "nowhere", "--recipe", str(TINY)], "--adapter: nowhere is not a peft adapter folder"),
        (["--run", "nowhere"], "--run: nowhere holds no run"),
        (["--run", "x", "--prompts", "0"], "prompts"),
        (["--run", "x", "--pairs-per-prompt", "0"], "--pairs-per-prompt: must be >= 1"),
    ],
)
def test_eval_bad_input_is_one_line(args, message):
    result = run_cli("eval", *args)
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_eval_of_the_last_checkpoint_reproduces_what_the_run_logged(tiny_run):
    """The run's periodic evaluation and `eval` are one function: given the run's evaluation
    prompts and seed, evaluating the saved checkpoint gives the numbers the run logged at its end."""
    from rlhf_bilevel.commands.eval import held_out_prompts, load_run
    from rlhf_bilevel.evaluate import EVAL_SEED_OFFSET
    from rlhf_bilevel.labelling import make_labeller

    recipe, _, policy, reward = load_run(tiny_run)
    metrics = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    last = metrics[-1]
    assert last["outer_step"] == recipe.bilevel.outer_steps
    prompts = held_out_prompts(recipe, RECIPES)
    prompts = [prompts[i % len(prompts)] for i in range(recipe.train.eval_pairs)]
    cfg = EvalConfig(seed=recipe.train.seed + EVAL_SEED_OFFSET, win_rate=False)
    result = evaluate(policy, make_labeller(recipe.oracle), prompts, cfg, reward)
    assert result["gold"]["policy"].mean == pytest.approx(last["gold/score"], abs=1e-6)
    assert result["gold"]["reference"].mean == pytest.approx(last["gold/reference"], abs=1e-6)
    assert result["kl"] == pytest.approx(last["eval/kl"], abs=1e-6)
    assert result["agreement"]["policy"].mean == pytest.approx(last["eval/agreement"], abs=1e-6)
    assert result["agreement"]["reference"].mean == pytest.approx(last["eval/agreement_reference"], abs=1e-6)
    assert "win_rate" not in result and result["oracle_pairs"] == 2 * recipe.train.eval_pairs


def test_pooled_weighs_each_observation_and_resamples_whole_prompts():
    """Three hits on prompt 0 and a miss on prompt 1 pool to 3/4, not to the prompts' mean 1/2; a
    resample holds whole prompts, so its means are 1, 3/4 or 0 and the interval spans [0, 1]."""
    estimate = pooled(torch.tensor([1.0, 1.0, 1.0, 0.0]), torch.tensor([0, 0, 0, 1]), 2, 2000, 0.95, np.random.default_rng(0))
    assert estimate.mean == pytest.approx(0.75) and estimate.n == 4
    assert estimate.low == pytest.approx(0.0) and estimate.high == pytest.approx(1.0)
