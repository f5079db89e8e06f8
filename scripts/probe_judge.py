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
that trained, scored against the oracle's P stored with each. The judge is scored asking about the whole
response alone, then, with `words`, for each `--word-margin` on the same pairs and judge passes, each
margin after the first also as its difference from the first, pair by pair:

    .venv/bin/python scripts/probe_judge.py --pairs runs/compare/*/preferences.jsonl --word-margin 0.4 --word-margin 0.1

With anchors (`judge.anchors_first` and `anchors_second`), each `--anchor-weight` is scored at each
margin, 0 being the words' log-odds alone, on the same pairs and judge passes, and compared with the
first line alike.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

import numpy as np
import torch

from rlhf_bilevel.evaluate import agreement, decided as decided_by, pooled
from rlhf_bilevel.labelling import make_labeller
from rlhf_bilevel.lm.judge import Judge
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
    parser.add_argument("--word-margin", type=float, action="append", default=[], help="with words: score this margin (repeatable); default the recipe's")
    parser.add_argument("--anchor-weight", type=float, action="append", default=[], help="with anchors: score this anchor_weight (repeatable); default the recipe's")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    recipe = load_recipe(args.recipe, args.overrides)
    if not recipe.reward.judge.asks:
        raise SystemExit("reward.judge.question: the recipe asks no judge; set one with --set reward.judge.question=...")
    if args.anchor_weight and not recipe.reward.judge.anchored:
        raise SystemExit("--anchor-weight: the recipe's judge has no anchors; set reward.judge.anchors_first and anchors_second")
    _, prompts = load_prompts(recipe.prompts, args.recipe.parent)
    base, tokenizer = load_base(recipe.model)
    policy = LMPolicy(with_adapters(base, recipe.adapters), tokenizer, recipe.rollout, recipe.model.chat_template)
    cfg = recipe.reward.judge
    judge = Judge(policy.trunk, tokenizer, policy.chat_template, cfg)  # not the policy's: sampling asks nothing
    firsts, seconds, prob, prompts_of = stored_pairs(args.pairs) if args.pairs else sampled_pairs(policy, recipe, prompts, args)
    texts = firsts + seconds
    asked = torch.cat([judge.ask(texts[start : start + 64]) for start in range(0, len(texts), 64)])
    prompts = sorted(set(prompts_of))
    decided = decided_by(prob)
    unit = torch.tensor([prompts.index(p) for p in prompts_of])[decided]
    print(f"judge: {cfg.question!r} → {cfg.answer_prefix!r} {list(cfg.answers)}")
    source = f"from {len(args.pairs)} runs' stores" if args.pairs else f"of the base, {args.pairs_per_prompt} a prompt"
    print(f"{int(decided.sum())} decided pairs of {len(prob)} on {len(prompts)} prompts, {source}; agreement with the oracle's best order before any label:")
    score = functools.partial(agreement_line, prob=prob, unit=unit, prompts=len(prompts))
    print(f"  the response as a whole: {score(asked)[0]}")
    first = None
    for weight in (args.anchor_weight or [cfg.anchor_weight]) if cfg.words else []:
        for margin in args.word_margin or [cfg.word_margin]:
            line, hits = score(asked + judge.word_evidence(texts, margin, weight), against=first)
            first = hits if first is None else first
            print(f"  and each word beyond {margin}{f', anchors × {weight}' if cfg.anchored else ''}: {line}")


def agreement_line(judged: torch.Tensor, prob: torch.Tensor, unit: torch.Tensor, prompts: int, against: torch.Tensor | None = None) -> tuple[str, torch.Tensor]:
    """The agreement of judge scores `judged` (the first responses', then the seconds') with the oracle's
    best order, over the decided pairs, with a 95% bootstrap interval over prompts; and, `against` the
    hits of other scores on the same pairs, their difference. Also the hits themselves."""
    pairs = len(prob)
    hits = agreement((judged[:pairs] - judged[pairs:]).double(), prob)
    estimate = pooled(hits, unit, prompts, 2000, 0.95, np.random.default_rng(0))
    line = f"{estimate.mean:.3f} [{estimate.low:.3f}, {estimate.high:.3f}]"
    if against is not None:
        difference = pooled(hits - against, unit, prompts, 2000, 0.95, np.random.default_rng(0))
        line += f", {difference.mean:+.3f} [{difference.low:+.3f}, {difference.high:+.3f}] against the first line"
    return line, hits


def sampled_pairs(policy: LMPolicy, recipe: Recipe, prompts: list[str], args: argparse.Namespace) -> tuple[list[str], list[str], torch.Tensor, list[str]]:
    """The two responses, the oracle's P and the prompt of pairs drawn from the base on `prompts`."""
    labeller = make_labeller(recipe.oracle)
    generator = torch.Generator().manual_seed(0)
    firsts, seconds, probs, prompts_of = [], [], [], []
    for start in range(0, len(prompts), args.batch):
        some = prompts[start : start + args.batch] * args.pairs_per_prompt
        with policy.adapter(None):
            rollout = policy.sample([p for p in some for _ in range(2)], generator)
        firsts += rollout.responses[0::2]
        seconds += rollout.responses[1::2]
        probs.append(labeller.ask(some, rollout.responses[0::2], rollout.responses[1::2]).float())
        prompts_of += some
        print(f"sampled {len(prompts_of)} pairs", file=sys.stderr, flush=True)
    return firsts, seconds, torch.cat(probs), prompts_of


def stored_pairs(files: list[Path]) -> tuple[list[str], list[str], torch.Tensor, list[str]]:
    """The two responses, the stored P and the prompt of every pair in `files` (preferences.jsonl)."""
    rows = [json.loads(line) for file in files for line in file.read_text().splitlines()]
    return [r["first"] for r in rows], [r["second"] for r in rows], torch.tensor([r["prob"] for r in rows]), [r["prompt"] for r in rows]


if __name__ == "__main__":
    main()
