"""How often the judge of a recipe (`reward.judge`) orders a pair as its oracle does, before any label:
the measurement behind the judge of recipes/smollm2-sentiment.yaml (docs/reward-model.md).

    .venv/bin/python scripts/probe_judge.py                      # the recipe's judge, about 3 min on one thread
    .venv/bin/python scripts/probe_judge.py --set reward.judge.answer_prefix="The answer is"

Pairs are drawn as a run's evaluation draws them: two responses of the base model (adapters off) to
each of the recipe's held-out prompts. Each pair is scored by the judge's log-odds alone, R(τ0) − R(τ1)
= j(τ0) − j(τ1), against the oracle's best order (P > ½) on the pairs the oracle does not tie, with a
95% bootstrap interval over prompts, as `eval/agreement` is. An untrained reward head scores 0.5.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from rlhf_bilevel.evaluate import agreement, bootstrap, decided as decided_by
from rlhf_bilevel.labelling import make_labeller
from rlhf_bilevel.lm.heads import TokenReward
from rlhf_bilevel.lm.model import load_base, with_adapters
from rlhf_bilevel.lm.policy import LMPolicy
from rlhf_bilevel.prompts import load_prompts
from rlhf_bilevel.recipe import load_recipe

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes/smollm2-sentiment.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="override a recipe field, as train's --set")
    parser.add_argument("--pairs-per-prompt", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16, help="prompts sampled per call")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    recipe = load_recipe(args.recipe, args.overrides)
    if not recipe.reward.judge.asks:
        raise SystemExit("reward.judge.question: the recipe asks no judge; set one with --set reward.judge.question=...")
    _, prompts = load_prompts(recipe.prompts, args.recipe.parent)
    base, tokenizer = load_base(recipe.model)
    policy = LMPolicy(with_adapters(base, recipe.adapters), tokenizer, recipe.rollout, recipe.model.chat_template)
    TokenReward.on(policy, recipe.reward)
    labeller = make_labeller(recipe.oracle)
    generator = torch.Generator().manual_seed(0)
    margins, probs, units = [], [], []
    for start in range(0, len(prompts), args.batch):
        chunk = prompts[start : start + args.batch]
        some = chunk * args.pairs_per_prompt
        with policy.adapter(None):
            rollout = policy.sample([p for p in some for _ in range(2)], generator)
        judged = policy.judged(rollout)
        margins.append(judged[0::2] - judged[1::2])
        probs.append(labeller.ask(some, rollout.responses[0::2], rollout.responses[1::2]).float())
        units += [start + i % len(chunk) for i in range(len(some))]
        print(f"sampled {len(units)} pairs", file=sys.stderr, flush=True)
    margin, prob, unit = torch.cat(margins), torch.cat(probs), torch.tensor(units)
    decided = decided_by(prob)
    hits = agreement(margin.double(), prob)  # on the pairs the oracle decided
    sums = torch.zeros(len(prompts), dtype=hits.dtype).index_add_(0, unit[decided], hits)
    counts = torch.zeros(len(prompts), dtype=hits.dtype).index_add_(0, unit[decided], torch.ones_like(hits))
    estimate = bootstrap(sums, 2000, 0.95, np.random.default_rng(0), counts=counts)
    judge = recipe.reward.judge
    print(f"judge: {judge.question!r} → {judge.answer_prefix!r} {list(judge.answers)}")
    print(f"agreement with the oracle's best order before any label: {estimate.mean:.3f} [{estimate.low:.3f}, {estimate.high:.3f}] "
          f"on {int(decided.sum())} decided pairs of {len(prob)} ({len(prompts)} prompts × {args.pairs_per_prompt})")


if __name__ == "__main__":
    main()
