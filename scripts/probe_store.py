"""What a run's labels teach its reward model: φ refitted on the labelled pairs runs stored, against the
judge alone, on pairs that other runs' policies wrote (docs/reward-model.md, "What the labels add").

    .venv/bin/python scripts/probe_store.py runs/compare/*-seed*          # the run folders of a compare
    .venv/bin/python scripts/probe_store.py runs/compare/*-seed* --write  # and put the table into the doc

A run's last checkpoint holds its preference store: every pair it labelled, with the base's features
and the judge's log-odds of both responses, the oracle's P and the Bernoulli label φ was fitted on.
Nothing is sampled or asked again. Each row is a reward model of the runs' recipe (`reward`), scored
on the stored pairs of every run it did not learn from, against the oracle's best order (P > 1/2,
ties left out), as `eval/agreement` scores fresh pairs:
- the judge alone: φ₀, the reward model before any label;
- each run's φ at its end, as the run fitted it (10 Adam steps an outer step in the default recipe),
  bilevel's runs (whose φ also follows the penalty) apart from alternating's;
- φ refitted on one run's labels to convergence, Adam on the mean bt_nll plus the prior
  (c/N)‖φ − φ₀‖² of docs/algorithm.md, for each c of PRIORS;
- the same fitted on the labels of half the runs together, scored on the other half's pairs: what
  more labels than a run has would buy.
Each row's figure is the mean over runs of the model's agreement, with a 95% Student-t interval over
runs of its difference from the judge's agreement on the same pairs.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import stats
from torch import Tensor

from rlhf_bilevel import estimators as est
from rlhf_bilevel.checkpoint import latest_checkpoint, load_checkpoint
from rlhf_bilevel.evaluate import agreement
from rlhf_bilevel.lm.heads import TokenReward
from rlhf_bilevel.recipe import load_recipe
from rlhf_bilevel.store import PreferenceStore
from rlhf_bilevel.types import PreferencePairs, Rollout

from probe_reward import write  # the doc's block between markers, stamped with the commit (a script beside this one)

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs/reward-model.md"
BEGIN, END = "<!-- probe_store.py: begin -->", "<!-- probe_store.py: end -->"
PRIORS = (10.0, 100.0, 1000.0)  # c; the default recipe's reward_fit.prior is 10


@dataclass(frozen=True)
class StoredContext:
    """What the reward model reads of a stored response: the base's features and the judge's log-odds."""

    features: Tensor  # [N, H + 1, d]
    judged: Tensor | None  # [N]


@dataclass(frozen=True)
class Run:
    pairs: PreferencePairs  # every stored pair, in one rollout
    reward_state: dict[str, Tensor]  # φ at the run's end
    method: str  # bilevel.method: φ fitted with the penalty (bilevel) or without (alternating)


def load_run(folder: Path) -> Run:
    """`folder`'s stored pairs, merged into one rollout, and its φ at its last checkpoint."""
    checkpoint = latest_checkpoint(folder)
    if checkpoint is None:
        raise SystemExit(f"{folder}: no checkpoint, so no preference store; give the folder of a finished run")
    state = load_checkpoint(checkpoint)
    store = PreferenceStore()
    store.load_state_dict(state["bilevel"]["labelling"]["store"])
    features, judged, masks, first, second, prob, label = [], [], [], [], [], [], []
    rows = 0
    for pairs in store.batches:
        ctx = pairs.rollout.context
        features.append(ctx.features if ctx.reward_features is None else ctx.reward_features)
        judged.append(ctx.judged)
        masks.append(pairs.rollout.mask)
        first.append(pairs.first + rows)
        second.append(pairs.second + rows)
        prob.append(pairs.prob)
        label.append(pairs.label)
        rows += len(pairs.rollout)
    mask = torch.cat(masks)
    context = StoredContext(torch.cat(features).float(), None if judged[0] is None else torch.cat(judged).float())
    n = len(mask)
    zeros = torch.zeros_like(mask)
    rollout = Rollout([""] * n, [""] * n, zeros.long(), mask, zeros, zeros, torch.full((n,), 1 / n), context)
    count = sum(len(f) for f in first)
    merged = PreferencePairs(rollout, torch.cat(first), torch.cat(second), torch.full((count,), 1 / count), torch.cat(prob), torch.cat(label))
    return Run(merged, state["reward"], load_recipe(folder / "recipe.yaml").bilevel.method)


def reward_model(recipe_reward, dim: int) -> TokenReward:
    torch.manual_seed(0)  # the members' starts; their mean, and so φ₀'s margins, start at 0 whatever the seed
    judged = (lambda rollout: rollout.context.judged) if recipe_reward.judge.asks else None
    return TokenReward(lambda rollout: rollout.context.features, dim, recipe_reward, judged=judged)


def margins(reward: TokenReward, pairs: PreferencePairs) -> Tensor:
    with torch.no_grad():
        return est.pair_margins(reward.token_rewards(pairs.rollout), pairs)


def refit(reward: TokenReward, labelled: list[PreferencePairs], prior: float, steps: int, lr: float) -> TokenReward:
    """φ from φ₀ by Adam on the mean bt_nll of `labelled` plus (c/N)‖φ − φ₀‖², full batch."""
    params = reward.parameters()
    start = [p.detach().clone() for p in params]
    count = sum(len(p) for p in labelled)
    optimizer = torch.optim.Adam(params, lr=lr)
    weights = torch.tensor([len(p) / count for p in labelled])  # each pair counts the same
    for _ in range(steps):
        optimizer.zero_grad()
        est.store_loss([reward.member_rewards(p.rollout) for p in labelled], labelled, weights, "bt_nll").backward()
        for p, pull in zip(params, est.grad_anchor_prior(params, start, prior, count)):
            p.grad += pull
        optimizer.step()
    return reward


def agreement_on(reward: TokenReward, runs: list[Run]) -> float:
    """The share of the decided pairs of `runs` that `reward` orders as the oracle's best order."""
    return torch.cat([agreement(margins(reward, run.pairs), run.pairs.prob) for run in runs]).mean().item()


def interval(values: list[float], judge: list[float]) -> str:
    """mean agreement, and the 95% Student-t interval over runs of its difference from the judge's."""
    difference = np.array(values) - np.array(judge)
    half = stats.t.ppf(0.975, len(values) - 1) * difference.std(ddof=1) / len(values) ** 0.5
    return f"{np.mean(values):.3f} | {difference.mean():+.3f} [{difference.mean() - half:+.3f}, {difference.mean() + half:+.3f}]"


def table(runs: list[Run], recipe_reward, steps: int, lr: float) -> str:
    dim = runs[0].pairs.rollout.context.features.shape[-1]
    others = [[r for r in runs if r is not run] for run in runs]
    judge_model = reward_model(recipe_reward, dim)
    judge_hits = {id(run): agreement(margins(judge_model, run.pairs), run.pairs.prob) for run in runs}  # one pass per run
    judge = [torch.cat([judge_hits[id(r)] for r in rest]).mean().item() for rest in others]
    rows = {"the judge alone (φ₀, before any label)": judge}
    for method in dict.fromkeys(run.method for run in runs):
        in_run, judged = [], []
        for run, rest, baseline in zip(runs, others, judge):
            if run.method == method:
                reward = reward_model(recipe_reward, dim)
                reward.load_state_dict(run.reward_state)
                in_run.append(agreement_on(reward, rest))
                judged.append(baseline)
        rows[f"each {method} run's φ at its end, as the run fitted it"] = (in_run, judged)
    labels = len(runs[0].pairs)
    for prior in PRIORS:
        fitted = [agreement_on(refit(reward_model(recipe_reward, dim), [run.pairs], prior, steps, lr), rest) for run, rest in zip(runs, others)]
        rows[f"φ refitted on one run's {labels} labels, c = {prior:g}"] = fitted
        print(f"c = {prior:g}: one run's labels done", file=sys.stderr, flush=True)
    halves = [runs[0::2], runs[1::2]]
    judged = [judge_hits[id(run)].mean().item() for run in halves[1] + halves[0]]  # each test run alone
    for prior in PRIORS:
        fitted = []
        for learn, test in (halves, halves[::-1]):
            reward = refit(reward_model(recipe_reward, dim), [r.pairs for r in learn], prior, steps, lr)
            fitted += [agreement_on(reward, [run]) for run in test]
        count = sum(len(r.pairs) for r in halves[0])
        rows[f"φ fitted on half the runs' labels (≈ {count}), c = {prior:g}"] = (fitted, judged)
        print(f"c = {prior:g}: half the runs' labels done", file=sys.stderr, flush=True)
    lines = ["| reward model | agreement | − the judge's, same pairs |", "|---|---|---|"]
    for name, values in rows.items():
        values, baseline = values if isinstance(values, tuple) else (values, judge)
        lines.append(f"| {name} | {interval(values, baseline)} |")
    pairs = sum(int((r.pairs.prob != 0.5).sum()) for r in runs)
    lines.append(f"\n{len(runs)} runs, {labels} labelled pairs each, {pairs} of their pairs decided by the oracle; "
                 f"a row's model is scored on the runs it did not learn from.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+", help="run folders (each with checkpoint-* and recipe.yaml)")
    parser.add_argument("--steps", type=int, default=150, help="Adam steps per fit")
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--write", action="store_true", help=f"put the table into {DOC.relative_to(ROOT)}")
    args = parser.parse_args()
    if len(args.runs) < 4:
        raise SystemExit(f"runs: at least 4 run folders are needed (two halves of two), got {len(args.runs)}")
    torch.set_num_threads(args.threads)
    recipes = [load_recipe(folder / "recipe.yaml").reward for folder in args.runs]
    if any(r != recipes[0] for r in recipes):
        raise SystemExit("runs: their recipes' reward sections differ; give runs of one reward model")
    if recipes[0].lora:
        raise SystemExit("reward.lora: the features of a reward adapter depend on φ and are not stored; probe runs of a head on the frozen base")
    runs = [load_run(folder) for folder in args.runs]
    result = table(runs, recipes[0], args.steps, args.lr)
    print(result)
    if args.write:
        write(DOC, result, shlex.join([".venv/bin/python", "scripts/probe_store.py", *sys.argv[1:]]), BEGIN, END)


if __name__ == "__main__":
    main()
