"""How a trained policy compares with the reference, and whether its reward model kept up: what
`rlhf-bilevel eval` reports (commands/eval.py) and a run's periodic evaluations log.

On held-out prompts, the trained policy π_λ and the reference π_ref each write `samples` pairs
of responses per prompt, from the same random stream (common random numbers). From those:

    win rate       P(π_λ's response ≻ π_ref's) under the oracle, asked in both orders so a
                   judge's position bias cancels; a tie (P = 1/2) counts half
    gold score     the oracle's per-response score, where it has one
    KL             Σ_h log π_λ/π_ref along π_λ's own responses, averaged
    length         response tokens, EOS included
    agreement      how often the learned reward model orders a pair as the oracle does, on
                   pairs from π_λ and on pairs from π_ref: the distribution-shift signal. A
                   reward model fitted only where the reference wrote agrees less where the
                   policy went; the bilevel method is meant to close that gap.

Every rate comes with a percentile-bootstrap confidence interval over prompts: the responses to
one prompt are not independent of each other, so a prompt, not a pair, is the resampled unit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from scipy import stats
from torch import Tensor

from rlhf_bilevel import estimators as est
from rlhf_bilevel.collectives import Collectives, World
from rlhf_bilevel.config import ConfigError, positive
from rlhf_bilevel.labelling import Labeller
from rlhf_bilevel.sampling import consecutive_pairs
from rlhf_bilevel.types import LAMBDA, Rollout


@dataclass(frozen=True)
class EvalConfig:
    prompts: int | None = None  # held-out prompts evaluated, from the first; None: all of them
    seed: int = 0  # the sampling stream shared by π_λ and π_ref
    resamples: int = 2000  # bootstrap resamples per confidence interval
    confidence: float = 0.95  # coverage of the bootstrap intervals
    samples: int = 1  # response pairs per prompt; more pairs narrow the agreement interval at a fixed prompt set
    win_rate: bool = True  # π_λ against π_ref head to head: two oracle calls per response pair

    def __post_init__(self) -> None:
        positive(self, "resamples")
        if self.samples < 1:
            raise ConfigError(f"--pairs-per-prompt: must be >= 1, got {self.samples}")
        if self.prompts is not None:
            positive(self, "prompts")
        if not 0 < self.confidence < 1:
            raise ConfigError(f"--confidence: must be strictly between 0 and 1, got {self.confidence}")


@dataclass(frozen=True)
class Estimate:
    """A mean over n units (prompts, or a comparison's seeds) with its confidence interval."""

    mean: float
    low: float
    high: float
    n: int

    def __str__(self) -> str:
        return f"{self.mean:.3f} [{self.low:.3f}, {self.high:.3f}]"


def decided(prob: Tensor) -> Tensor:
    """The pairs whose order the oracle decides: a tie (P = 1/2) has no right order."""
    return prob != 0.5


def agreement(margins: Tensor, prob: Tensor) -> Tensor:
    """Per pair, 1 when the reward model's margin has the oracle's sign, 0 when opposite, 1/2 for a zero margin.

    Only the pairs the oracle `decided` are kept.
    """
    prob = prob.to(margins.device)  # an oracle's verdicts are on the CPU
    return ((torch.sign(margins) * torch.sign(prob - 0.5) + 1) / 2)[decided(prob)]


def bootstrap(values: Tensor, resamples: int, confidence: float, rng: np.random.Generator, counts: Tensor | None = None) -> Estimate:
    """Percentile bootstrap (`scipy.stats.bootstrap`) of the mean of `values`, one value per independent
    unit (here a prompt), drawing from `rng`.

    With `counts`, values[i] is the sum of counts[i] observations of unit i, and the estimate is
    the pooled mean Σ values / Σ counts over the resampled units (a unit's value and count are
    resampled together); its n counts observations. Units with no observation are dropped first,
    so no resample divides by zero. One unit has no spread to resample: its interval is its value.
    """
    values = values.double().flatten().cpu().numpy()
    counts = np.ones_like(values) if counts is None else counts.double().flatten().cpu().numpy()
    values, counts = values[counts > 0], counts[counts > 0]
    if len(values) == 0:
        return Estimate(math.nan, math.nan, math.nan, 0)
    mean, n = float(values.sum() / counts.sum()), int(counts.sum())
    if len(values) == 1:
        return Estimate(mean, mean, mean, n)
    interval = stats.bootstrap(
        (values, counts), lambda v, c, axis: v.sum(axis) / c.sum(axis), n_resamples=resamples, confidence_level=confidence,
        method="percentile", paired=True, vectorized=True, rng=rng,
    ).confidence_interval
    return Estimate(mean, float(interval.low), float(interval.high), n)


def pooled(values: Tensor, unit: Tensor, units: int, resamples: int, confidence: float, rng: np.random.Generator) -> Estimate:
    """The mean of `values` [n], observation i made on unit `unit[i]` of `units` (a prompt, whose pairs
    are not independent), with the `bootstrap` interval that resamples whole units."""
    unit = unit.cpu()
    sums = torch.zeros(units, dtype=torch.double, device="cpu").index_add_(0, unit, values.double().cpu())
    return bootstrap(sums, resamples, confidence, rng, counts=torch.bincount(unit, minlength=units))


def per_prompt(values: Tensor, groups: int) -> Tensor:
    """Means of consecutive equal-size groups: the rows of one prompt count as one bootstrap unit."""
    return values.reshape(groups, -1).mean(-1)


def response_lengths(rollout: Rollout) -> Tensor:
    return rollout.mask.sum(-1)


def pairs_each(policy, adapter: str | None, prompts: Sequence[Any], seed: int, samples: int, world: Collectives = World()) -> Rollout:
    """`samples` pairs of responses per prompt from `adapter`, None being π_ref: rows 2s·i to 2s·i + 2s − 1
    answer prompt i, and rows 2j, 2j + 1 form pair j. Across processes, each draws its shard of the rows.

    Every call with the same seed draws the same random stream, so two policies are compared
    on common random numbers: identical policies write identical responses.
    """
    repeated = [p for p in prompts for _ in range(2 * samples)]
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad(), policy.adapter(adapter):
        if world.size == 1:
            return policy.sample(repeated, generator)
        return policy.sample(repeated, generator, rows=world.shard(len(repeated)))


def snapshot_measures(
    policy, labeller: Labeller, prompts: Sequence[Any], cfg: EvalConfig, reward=None, adapter: str | None = LAMBDA
) -> dict[str, float]:
    """The cheap measures of one point along a run, on the responses `evaluate` draws from `adapter` (π_λ;
    None for π_ref): their mean gold score, their KL to π_ref, and, given `reward` (the run's reward model
    at that point, built on `policy` before it samples), how often it orders their pairs as the oracle
    does, over the pairs the oracle decides (the mean of `evaluate`'s agreement, without its interval)."""
    rollout = pairs_each(policy, adapter, prompts, cfg.seed, cfg.samples)
    measures = {"gold": labeller.score(rollout.prompts, rollout.responses).mean().item(), "kl": est.kl_to_reference(rollout).item()}
    if reward is not None:
        prob = labeller.evaluation_labels(rollout.prompts[0::2], rollout.responses[0::2], rollout.responses[1::2]).double()
        with torch.no_grad():
            margins = est.pair_margins(reward.token_rewards(rollout), consecutive_pairs(rollout))
        measures["agreement"] = agreement(margins.double(), prob).mean().item()
    return measures


def policy_measures(result: dict) -> dict[str, float]:
    """What `snapshot_measures` takes of π_λ, read off an `evaluate` result on the same policy, prompts
    and config: both draw the same responses and ask the oracle the same, so the figures are the same,
    without the sampling and the oracle's labels a second time."""
    measures = {"gold": result["gold"]["policy"].mean, "kl": result["kl"]}
    if "agreement" in result:
        measures["agreement"] = result["agreement"]["policy"].mean
    return measures


@dataclass
class Answers:
    """What one policy wrote on the evaluation prompts, and what the oracle said of it. A run
    draws the reference's once and hands them to every later `evaluate`."""

    rollout: Rollout  # this process's rows (pairs_each)
    responses: list[str]  # every process's rows, in order
    prob: Tensor | None  # P(first ≻ second) for each pair of consecutive rows; None where no reward model is scored
    oracle_pairs: int  # pairs the oracle was asked about for `prob`


def answers(
    policy, labeller: Labeller, adapter: str | None, prompts: Sequence[Any], cfg: EvalConfig, world: Collectives, verdicts: bool
) -> Answers:
    """`adapter`'s responses (pairs_each); with `verdicts`, the oracle's on each pair, on every process."""
    rollout = pairs_each(policy, adapter, prompts, cfg.seed, cfg.samples, world)
    responses = sum(world.gather(rollout.responses), [])
    if not verdicts:
        return Answers(rollout, responses, None, 0)
    repeated = [p for p in prompts for _ in range(2 * cfg.samples)]
    prob = labeller.evaluation_labels(repeated[0::2], responses[0::2], responses[1::2]).double()
    return Answers(rollout, responses, prob, len(responses) // 2)


def evaluate(
    policy, labeller: Labeller, prompts: Sequence[Any], cfg: EvalConfig, reward=None, world: Collectives = World(), reference: Answers | None = None
) -> dict:
    """The measures of the module docstring for π_λ (the policy's `lambda` adapter) on `prompts`:
    what `rlhf-bilevel eval` reports, and what a run logs at every `train.eval_every`.

    `reward` is the run's learned reward model (`token_rewards(rollout)`), or None when only a
    policy is evaluated (then there is no agreement to report). `reference`: π_ref's answers of an
    earlier call with the same prompts and config, reused rather than drawn and labelled again.
    Across processes each samples its shard; the main process asks the oracle and alone returns
    the result (the others return an empty dict).
    """
    prompts = list(prompts[: cfg.prompts] if cfg.prompts else prompts)
    n, per = len(prompts), 2 * cfg.samples  # prompts, responses per prompt
    repeated = [p for p in prompts for _ in range(per)]
    verdicts = reward is not None
    asked = labeller.counts.evaluation
    ref = reference or answers(policy, labeller, None, prompts, cfg, world, verdicts)
    ours = answers(policy, labeller, LAMBDA, prompts, cfg, world, verdicts)
    everyone = {"reference": ref, "policy": ours}
    (kl,) = world.mean([est.kl_to_reference(ours.rollout)])
    margins = {}
    if verdicts:
        with torch.no_grad():
            for name, answered in everyone.items():
                rollout = answered.rollout
                margins[name] = world.cat(est.pair_margins(reward.token_rewards(rollout), consecutive_pairs(rollout)))
    wins = None
    if cfg.win_rate:
        # every process asks: the labeller hands the main one's verdicts to all, and asks a positional
        # judge both ways round itself
        wins = labeller.evaluation_labels(repeated, ours.responses, ref.responses).double()
    if not world.is_main:
        return {}
    rng = np.random.default_rng(cfg.seed)

    def interval(values: Tensor, counts: Tensor | None = None) -> Estimate:
        return bootstrap(values, cfg.resamples, cfg.confidence, rng, counts)

    result: dict[str, Any] = {"prompts": n, "samples": cfg.samples, "seed": cfg.seed, "confidence": cfg.confidence}
    if wins is not None:
        result["win_rate"] = interval(per_prompt(wins, n))
    result["kl"] = kl.item()
    result["length"] = {name: response_lengths(a.rollout).mean().item() for name, a in everyone.items()}
    if labeller.offers_score:
        result["gold"] = {name: interval(per_prompt(labeller.score(repeated, a.responses).double(), n)) for name, a in everyone.items()}
    if verdicts:
        result["agreement"] = {}
        # bookkeeping on the CPU, where the oracle's verdicts are
        prompt_of_pair = torch.arange(n, device="cpu").repeat_interleave(cfg.samples)
        for name, answered in everyone.items():
            # the agreements of a prompt's pairs summed, over as many pairs as the oracle decided there
            prompt = prompt_of_pair[decided(answered.prob)]
            hits = agreement(margins[name].double(), answered.prob)
            result["agreement"][name] = pooled(hits, prompt, n, cfg.resamples, cfg.confidence, rng)
        result["agreement_shift"] = result["agreement"]["policy"].mean - result["agreement"]["reference"].mean
    result["oracle_pairs"] = labeller.counts.evaluation - asked
    result["examples"] = [
        {"prompt": p, "reference": r, "policy": q} for p, r, q in list(zip(prompts, ref.responses[0::per], ours.responses[0::per]))[:3]
    ]
    return result


EVAL_SEED_OFFSET = 7919
"""A run's evaluations draw from their own generator, seeded the same at every evaluation: the
reference and every π_λ answer the same prompts with the same random stream (common random
numbers make their gold scores comparable), and training never sees evaluation draws."""


class PeriodicEval:
    """`evaluate` along a run, on `train.eval_pairs` held-out prompts with one pair each and no
    head-to-head win rate (it would ask the oracle about four times as many pairs): the reference's
    answers are drawn and labelled once, and the reward model is scored on them again every time
    (the distribution-shift signal: the same reward model on π_ref's pairs and on π_λ's)."""

    def __init__(
        self, policy, labeller: Labeller, reward, prompts: Sequence[Any], eval_pairs: int, seed: int, world: Collectives = World()
    ):
        """`labeller` asks the oracle and counts the evaluation labels (oracle/eval_pairs) in its state."""
        self.policy, self.labeller, self.reward, self.world = policy, labeller, reward, world
        self.prompts = [prompts[i % len(prompts)] for i in range(eval_pairs)]
        self.cfg = EvalConfig(seed=seed + EVAL_SEED_OFFSET, win_rate=False)
        self.reference_answers: Answers | None = None  # not saved: a resumed run draws the same pairs again
        self.reference: dict | None = None  # π_ref's gold score and first responses, for the summary
        self.last: dict | None = None  # the same of π_λ at the latest evaluation

    def __call__(self) -> dict[str, float]:
        """The metrics a run logs: gold/score, gold/reference, eval/agreement(_reference), eval/kl, oracle/eval_pairs."""
        if self.reference_answers is None:
            tokens = self.policy.tokens_generated
            self.reference_answers = answers(self.policy, self.labeller, None, self.prompts, self.cfg, self.world, verdicts=True)
            if self.reference is not None:  # resumed: the very pairs of before, whose labels and tokens were counted
                self.labeller.counts.evaluation -= self.reference_answers.oracle_pairs
                self.policy.tokens_generated = tokens
        result = evaluate(self.policy, self.labeller, self.prompts, self.cfg, self.reward, self.world, self.reference_answers)
        if not self.world.is_main:
            return {}
        gold, agree = result.get("gold", {}), result["agreement"]
        examples = result["examples"]
        self.last = {"prompts": [e["prompt"] for e in examples], "responses": [e["policy"] for e in examples]}
        if self.reference is None:
            self.reference = {"prompts": self.last["prompts"], "responses": [e["reference"] for e in examples]}
            if gold:
                self.reference["gold/score"] = gold["reference"].mean
        metrics = {}
        if agree["policy"].n:  # none when the oracle called every pair a tie
            metrics["eval/agreement"] = self.last["eval/agreement"] = agree["policy"].mean
        if gold:
            metrics["gold/score"] = self.last["gold/score"] = gold["policy"].mean
        metrics["eval/kl"] = self.last["eval/kl"] = result["kl"]
        if agree["reference"].n:
            metrics["eval/agreement_reference"] = agree["reference"].mean
        if "gold/score" in self.reference:
            metrics["gold/reference"] = self.reference["gold/score"]
        metrics["oracle/eval_pairs"] = float(self.labeller.counts.evaluation)
        return metrics

    def state_dict(self) -> dict:
        return {"reference": self.reference, "last_eval": self.last}

    def load_state_dict(self, state: dict) -> None:
        self.reference, self.last = state["reference"], state["last_eval"]
