"""`rlhf-bilevel eval`: how a trained policy compares with the reference, and whether its reward model kept up.

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

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from rlhf_bilevel import estimators as est
from rlhf_bilevel.config import ConfigError, positive
from rlhf_bilevel.sampling import consecutive_pairs
from rlhf_bilevel.labelling import Labeller, both_orders, make_labeller
from rlhf_bilevel.types import LAMBDA, Rollout


@dataclass(frozen=True)
class EvalConfig:
    prompts: int | None = None  # held-out prompts evaluated, from the first; None: all of them
    seed: int = 0  # the sampling stream shared by π_λ and π_ref
    resamples: int = 2000  # bootstrap resamples per confidence interval
    confidence: float = 0.95  # coverage of the bootstrap intervals
    samples: int = 1  # response pairs per prompt; more pairs narrow the agreement interval at a fixed prompt set

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


def bootstrap(values: Tensor, resamples: int, confidence: float, generator: torch.Generator, counts: Tensor | None = None) -> Estimate:
    """Percentile bootstrap of the mean of `values`, one value per independent unit (here a prompt).

    With `counts`, values[i] is the sum of counts[i] observations of unit i, and the estimate is
    the pooled mean Σ values / Σ counts over the resampled units; its n counts observations.
    Units with no observation are dropped first, so no resample divides by zero.
    """
    values = values.double().flatten().cpu()  # resampled by the CPU generator
    counts = torch.ones_like(values) if counts is None else counts.double().flatten().cpu()
    values, counts = values[counts > 0], counts[counts > 0]
    n = len(values)
    if n == 0:
        return Estimate(math.nan, math.nan, math.nan, 0)
    index = torch.randint(n, (resamples, n), generator=generator)
    means = values[index].sum(-1) / counts[index].sum(-1)
    tail = (1 - confidence) / 2
    low, high = torch.quantile(means, torch.tensor([tail, 1 - tail], dtype=means.dtype, device=means.device)).tolist()
    return Estimate((values.sum() / counts.sum()).item(), low, high, int(counts.sum().item()))


def per_prompt(values: Tensor, groups: int) -> Tensor:
    """Means of consecutive equal-size groups: the rows of one prompt count as one bootstrap unit."""
    return values.reshape(groups, -1).mean(-1)


def response_lengths(rollout: Rollout) -> Tensor:
    return rollout.mask.sum(-1)


def pairs_each(policy, adapter: str | None, prompts: Sequence[Any], seed: int, samples: int) -> Rollout:
    """`samples` pairs of responses per prompt from `adapter`, None being π_ref: rows 2s·i to 2s·i + 2s − 1
    answer prompt i, and rows 2j, 2j + 1 form pair j.

    Every call with the same seed draws the same random stream, so two policies are compared
    on common random numbers: identical policies write identical responses.
    """
    with torch.no_grad(), policy.adapter(adapter):
        return policy.sample([p for p in prompts for _ in range(2 * samples)], torch.Generator().manual_seed(seed))


def gold_score(policy, labeller: Labeller, prompts: Sequence[Any], cfg: EvalConfig, adapter: str | None = LAMBDA) -> float:
    """Mean gold score of the responses `evaluate` draws: the cheap measure for a curve along a run."""
    rollout = pairs_each(policy, adapter, prompts, cfg.seed, cfg.samples)
    return labeller.score(rollout.prompts, rollout.responses).mean().item()


def evaluate(policy, labeller: Labeller, prompts: Sequence[Any], cfg: EvalConfig, reward=None) -> dict:
    """The measures of the module docstring for π_λ (the policy's `lambda` adapter) on `prompts`.

    `reward` is the run's learned reward model (`token_rewards(rollout)`), or None when only a
    policy is evaluated (then there is no agreement to report).
    """
    prompts = list(prompts[: cfg.prompts] if cfg.prompts else prompts)
    n, per = len(prompts), 2 * cfg.samples  # prompts, responses per prompt
    repeated = [p for p in prompts for _ in range(per)]
    rollouts = {name: pairs_each(policy, adapter, prompts, cfg.seed, cfg.samples) for name, adapter in (("reference", None), ("policy", LAMBDA))}
    ours, ref = rollouts["policy"], rollouts["reference"]
    generator = torch.Generator().manual_seed(cfg.seed)

    def interval(values: Tensor, counts: Tensor | None = None) -> Estimate:
        return bootstrap(values, cfg.resamples, cfg.confidence, generator, counts)

    asked = labeller.counts.evaluation
    wins = both_orders(
        labeller.evaluation_labels(repeated, ours.responses, ref.responses).double(),
        labeller.evaluation_labels(repeated, ref.responses, ours.responses).double(),
    )
    result: dict[str, Any] = {
        "prompts": n,
        "samples": cfg.samples,
        "seed": cfg.seed,
        "confidence": cfg.confidence,
        "win_rate": interval(per_prompt(wins, n)),
        "kl": est.kl_to_reference(ours).item(),
        "length": {name: response_lengths(r).mean().item() for name, r in rollouts.items()},
    }
    if labeller.offers_score:
        result["gold"] = {name: interval(per_prompt(labeller.score(repeated, r.responses).double(), n)) for name, r in rollouts.items()}
    if reward is not None:
        result["agreement"] = {}
        # bookkeeping on the CPU, where the oracle's verdicts are
        prompt_of_pair = torch.arange(n, device="cpu").repeat_interleave(cfg.samples)
        for name, rollout in rollouts.items():
            pairs = consecutive_pairs(rollout)
            prob = labeller.evaluation_labels(repeated[0::2], rollout.responses[0::2], rollout.responses[1::2]).double()
            with torch.no_grad():
                margins = est.pair_margins(reward.token_rewards(rollout), pairs)
            # the agreements of a prompt's pairs summed, over as many pairs as the oracle decided there
            prompt = prompt_of_pair[decided(prob)]
            hits = torch.zeros(n, dtype=torch.double, device="cpu").index_add_(0, prompt, agreement(margins.double(), prob).cpu())
            result["agreement"][name] = interval(hits, torch.bincount(prompt, minlength=n))
        result["agreement_shift"] = result["agreement"]["policy"].mean - result["agreement"]["reference"].mean
    result["oracle_pairs"] = labeller.counts.evaluation - asked
    result["examples"] = [
        {"prompt": p, "reference": r, "policy": q} for p, r, q in list(zip(prompts, ref.responses[0::per], ours.responses[0::per]))[:3]
    ]
    return result


def load_policy(recipe, adapter: Path):
    """The recipe's base model with the peft adapter at `adapter` as π_λ; π_ref is the same base with it disabled."""
    from peft import PeftModel

    from rlhf_bilevel.distributed import resolve_device
    from rlhf_bilevel.lm.model import load_base
    from rlhf_bilevel.lm.policy import LMPolicy

    if not (adapter / "adapter_config.json").is_file():
        raise ConfigError(f"--adapter: {adapter} is not a peft adapter folder (adapter_config.json missing)")
    base, tokenizer = load_base(recipe.model, resolve_device(recipe.train.device))
    model = PeftModel.from_pretrained(base, str(adapter), adapter_name=LAMBDA)
    model.eval()
    return LMPolicy(model, tokenizer, recipe.rollout, recipe.model.chat_template)


def load_run(run_dir: Path, overrides: Sequence[str] = ()):
    """(recipe, base_dir, policy, reward) of the newest sound checkpoint of the run in `run_dir`.

    `overrides` change the recipe for this evaluation only, e.g. `oracle.kind=llm-judge`.
    """
    from rlhf_bilevel.checkpoint import latest_checkpoint, load_checkpoint
    from rlhf_bilevel.lm.heads import REWARD_ADAPTER, TokenReward
    from rlhf_bilevel.recipe import parse_recipe, read_yaml
    from rlhf_bilevel.train import RECIPE_FILE, RUN_FILE

    if not (run_dir / RECIPE_FILE).is_file():
        raise ConfigError(f"--run: {run_dir} holds no run ({RECIPE_FILE} missing)")
    recipe = parse_recipe(read_yaml(run_dir / RECIPE_FILE), list(overrides))
    base_dir = Path(json.loads((run_dir / RUN_FILE).read_text(encoding="utf-8"))["base_dir"])
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        raise ConfigError(f"--run: {run_dir} has no checkpoint yet; train it further (--resume) or evaluate an --adapter")
    policy = load_policy(recipe, checkpoint / "adapters" / LAMBDA)
    if recipe.reward.lora:
        policy.model.load_adapter(str(checkpoint / "adapters" / REWARD_ADAPTER), adapter_name=REWARD_ADAPTER)
    reward = TokenReward.on(policy, recipe.reward).to(policy.device)
    reward.load_state_dict(load_checkpoint(checkpoint)["reward"])
    return recipe, base_dir, policy, reward


def held_out_prompts(recipe, base_dir: Path) -> list[str]:
    from rlhf_bilevel.prompts import load_prompts

    train, held_out = load_prompts(recipe.prompts, base_dir)
    return held_out or train


def eval_run(run_dir: Path, cfg: EvalConfig, out: Path | None = None, overrides: Sequence[str] = ()) -> dict:
    """Evaluates the run in `run_dir` (policy and reward model) and writes the report to `out` (default RUN/eval)."""
    from rlhf_bilevel.report import write_eval

    recipe, base_dir, policy, reward = load_run(run_dir, overrides)
    result = evaluate(policy, make_labeller(recipe.oracle), held_out_prompts(recipe, base_dir), cfg, reward)
    result["source"] = {"run": str(run_dir), "oracle": recipe.oracle.kind, "model": recipe.model.name}
    write_eval(result, out or run_dir / "eval", name=run_dir.name, metrics_file=run_dir / "metrics.jsonl")
    return result


def eval_adapter(adapter: Path, recipe_file: Path, cfg: EvalConfig, out: Path | None = None, overrides: Sequence[str] = ()) -> dict:
    """Evaluates a peft adapter trained by any tool on the recipe's model, oracle and held-out prompts."""
    from rlhf_bilevel.recipe import load_recipe
    from rlhf_bilevel.report import write_eval

    recipe = load_recipe(recipe_file, list(overrides))
    labeller = make_labeller(recipe.oracle)
    prompts = held_out_prompts(recipe, recipe_file.resolve().parent)
    result = evaluate(load_policy(recipe, adapter), labeller, prompts, cfg)
    result["source"] = {"adapter": str(adapter), "oracle": recipe.oracle.kind, "model": recipe.model.name}
    write_eval(result, out or adapter / "eval", name=adapter.name)
    return result


def describe(result: dict) -> str:
    """The few lines the command prints."""
    lines = [f"win rate vs reference: {result['win_rate']} over {result['prompts']} prompts"]
    if "gold" in result:
        lines.append(f"gold score: policy {result['gold']['policy']}, reference {result['gold']['reference']}")
    if "agreement" in result:
        lines.append(
            f"reward-model agreement: on policy pairs {result['agreement']['policy']}, on reference pairs {result['agreement']['reference']}"
        )
    lines.append(f"KL to reference {result['kl']:.3f}; response tokens {result['length']['policy']:.1f} (reference {result['length']['reference']:.1f})")
    return "\n".join(lines)
