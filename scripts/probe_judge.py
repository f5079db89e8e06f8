"""How often the judge of a recipe (`reward.judge`) orders a pair as its oracle does, before any label:
the measurement behind the judge of recipes/smollm2-sentiment.yaml (docs/reward-model.md).

    .venv/bin/python scripts/probe_judge.py                      # the recipe's judge, about 3 min on one thread
    .venv/bin/python scripts/probe_judge.py --set reward.judge.answer_prefix="The answer is"
    .venv/bin/python scripts/probe_judge.py --pairs runs/compare/*/preferences.jsonl   # a policy's pairs

Pairs are drawn as a run's evaluation draws them: two responses of the base model (adapters off) to
each of the recipe's held-out prompts. Each pair is scored by the judge's log-odds alone, R(τ0) − R(τ1)
= j(τ0) − j(τ1), against the oracle's best order (P > ½) on the pairs the oracle does not tie, with a
95% bootstrap interval over prompts, as `eval/agreement` is. An untrained reward head scores 0.5.
With `--pairs`, the pairs are those stored in runs' preferences.jsonl instead: pairs of the policies
that trained, scored against the oracle's P stored with each.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from rlhf_bilevel.evaluate import agreement, decided as decided_by, pooled
from rlhf_bilevel.labelling import make_labeller
from rlhf_bilevel.lm.heads import TokenReward
from rlhf_bilevel.lm.model import load_base, with_adapters
from rlhf_bilevel.lm.policy import LMPolicy
from rlhf_bilevel.prompts import load_prompts
from rlhf_bilevel.recipe import Recipe, load_recipe

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes/smollm2-sentiment.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="override a recipe field, as train's --set")
    parser.add_argument("--pairs-per-prompt", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16, help="prompts sampled per call")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--pairs", type=Path, nargs="+", default=[], help="score the pairs of these preferences.jsonl files instead of sampling")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    recipe = load_recipe(args.recipe, args.overrides)
    if not recipe.reward.judge.asks:
        raise SystemExit("reward.judge.question: the recipe asks no judge; set one with --set reward.judge.question=...")
    _, prompts = load_prompts(recipe.prompts, args.recipe.parent)
    base, tokenizer = load_base(recipe.model)
    policy = LMPolicy(with_adapters(base, recipe.adapters), tokenizer, recipe.rollout, recipe.model.chat_template)
    TokenReward.on(policy, recipe.reward)
    margins, probs, prompts_of = stored_pairs(policy, args.pairs) if args.pairs else sampled_pairs(policy, recipe, prompts, args)
    margin, prob = torch.cat(margins), torch.cat(probs)
    prompts = sorted(set(prompts_of))
    unit = torch.tensor([prompts.index(p) for p in prompts_of])
    decided = decided_by(prob)
    hits = agreement(margin.double(), prob)  # on the pairs the oracle decided
    estimate = pooled(hits, unit[decided], len(prompts), 2000, 0.95, np.random.default_rng(0))
    judge = recipe.reward.judge
    words = f", words beyond {judge.word_margin}" if judge.words else ""
    print(f"judge: {judge.question!r} → {judge.answer_prefix!r} {list(judge.answers)}{words}")
    print(f"agreement with the oracle's best order before any label: {estimate.mean:.3f} [{estimate.low:.3f}, {estimate.high:.3f}] "
          f"on {int(decided.sum())} decided pairs of {len(prob)} on {len(prompts)} prompts"
          + (f", from {len(args.pairs)} runs' stores" if args.pairs else f" of the base, {args.pairs_per_prompt} a prompt"))


def sampled_pairs(policy: LMPolicy, recipe: Recipe, prompts: list[str], args: argparse.Namespace) -> tuple[list, list, list[str]]:
    """Judge margins, the oracle's P and the prompt of pairs drawn from the base on `prompts`."""
    labeller = make_labeller(recipe.oracle)
    generator = torch.Generator().manual_seed(0)
    margins, probs, prompts_of = [], [], []
    for start in range(0, len(prompts), args.batch):
        some = prompts[start : start + args.batch] * args.pairs_per_prompt
        with policy.adapter(None):
            rollout = policy.sample([p for p in some for _ in range(2)], generator)
        judged = policy.judged(rollout)
        margins.append(judged[0::2] - judged[1::2])
        probs.append(labeller.ask(some, rollout.responses[0::2], rollout.responses[1::2]).float())
        prompts_of += some
        print(f"sampled {len(prompts_of)} pairs", file=sys.stderr, flush=True)
    return margins, probs, prompts_of


def stored_pairs(policy: LMPolicy, files: list[Path]) -> tuple[list, list, list[str]]:
    """Judge margins, the stored P and the prompt of every pair in `files` (preferences.jsonl)."""
    margins, probs, prompts_of = [], [], []
    for file in files:
        rows = [json.loads(line) for line in file.read_text().splitlines()]
        for start in range(0, len(rows), 32):
            chunk = rows[start : start + 32]
            judged = policy.judge.log_odds([r["first"] for r in chunk] + [r["second"] for r in chunk])
            margins.append(judged[: len(chunk)] - judged[len(chunk) :])
            probs.append(torch.tensor([r["prob"] for r in chunk]))
            prompts_of += [r["prompt"] for r in chunk]
        print(f"judged {len(prompts_of)} stored pairs", file=sys.stderr, flush=True)
    return margins, probs, prompts_of


if __name__ == "__main__":
    main()
