"""Which form of the reward head learns the sentiment oracle from few labels: the measurement behind
RewardConfig's defaults (docs/reward-model.md).

    .venv/bin/python scripts/probe_reward.py           # about 20 min on one thread, 10 with its features cached
    .venv/bin/python scripts/probe_reward.py --write   # and put the table into docs/reward-model.md

Pairs are drawn as a run draws them, from the base model (adapters off) of
recipes/smollm2-sentiment.yaml: its prompts, chat template, horizon and oracle (LMPolicy.sample,
two responses to a prompt). Training pairs get one Bernoulli label from the oracle's P(first ≻ second),
as a run's pairs do; held-out pairs on the eval prompts are scored against the oracle's best order
(P > 1/2), as `eval/agreement` is. The base's hidden states at every probed layer are collected in one
pass over each batch and cached, so a rerun only fits.

Each form is a TokenReward with that RewardConfig, the shipped code, fitted with Adam on the mean
bt_nll plus the prior (c/N)‖φ − φ₀‖² of docs/algorithm.md ("Several steps per outer iteration"), c chosen per fit
from PRIORS by the bt_nll on a quarter of its N labels held out, then refitted on all N. Every seed
draws its own N labelled pairs and labels; every form sees the same draws. The models of a form fit
side by side as the members of one TokenReward: its heads share one matmul, and Adam's per-weight
steps keep them independent.
"""

from __future__ import annotations

import argparse
import itertools
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from rlhf_bilevel import estimators as est
from rlhf_bilevel.evaluate import agreement, pooled
from rlhf_bilevel.lm.heads import RewardConfig, TokenReward
from rlhf_bilevel.lm.model import load_base, with_adapters
from rlhf_bilevel.lm.policy import LMPolicy
from rlhf_bilevel.labelling import make_labeller
from rlhf_bilevel.prompts import load_prompts
from rlhf_bilevel.recipe import Recipe, load_recipe, recipe_dict
from rlhf_bilevel.sampling import SampledRollouts, consecutive_pairs
from rlhf_bilevel.types import Rollout

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes/smollm2-sentiment.yaml"
DOC = ROOT / "docs/reward-model.md"
BEGIN, END = "<!-- probe_reward.py: begin -->", "<!-- probe_reward.py: end -->"
LAST = None  # RewardConfig.layer's last hidden state
LAYERS = (LAST, 4, 8, 15, 22)  # hidden states as RewardConfig.layer numbers them; SmolLM2 has 30 layers
LABELS = (40, 80, 160, 240)  # N, training labels per fit
# c of the prior (c/N)‖φ − φ₀‖² with pool: sum. With pool: mean, weights H times as large give the same
# margins, so c is divided by H²: the same prior on R_φ's scale
PRIORS = (3.0, 30.0, 300.0)
HEADS = (1, 4)
# (center, pool): sigmoid with mean pooling is left out, its margins being centred-mean's exactly (each
# response's tokens share out the same 1/2, which cancels in R_φ(τ0) − R_φ(τ1))
SHAPES = ((False, "sum"), (True, "sum"), (True, "mean"))
VALIDATION = 0.25  # the share of a fit's N labels held out to choose c


@dataclass
class PairSet:
    """Pairs of responses to one prompt each (rows 2i and 2i + 1), with what a fit reads of them."""

    prompts: list[str]  # one per pair
    features: dict[int | None, Tensor]  # layer → [2P, H + 1, d] the base's hidden states at s_0 … s_H, bf16
    mask: Tensor  # [2P, H]
    prob: Tensor  # [P] the oracle's P(first ≻ second)

    def rollout(self, layer: int | None, pairs: Tensor) -> Rollout:
        """The rows of `pairs` as a rollout whose context is the features a reward head reads."""
        rows = torch.stack([2 * pairs, 2 * pairs + 1], 1).flatten()
        mask = self.mask[rows]
        n = len(rows)
        zeros = torch.zeros_like(mask)
        return Rollout(
            [""] * n, [""] * n, zeros.long(), mask, zeros, zeros, torch.full((n,), 1 / n), self.features[layer][rows].float()
        )


def collect(recipe: Recipe, train_pairs: int, test_pairs: int, batch: int) -> tuple[PairSet, PairSet]:
    """Training pairs on the recipe's train prompts and test pairs on its eval prompts, each set of
    prompts taken in turn; the base's features at every layer of LAYERS, and the oracle's P."""
    earlier = [layer for layer in LAYERS if layer != LAST]  # hidden_states gives the last hidden state after them
    train_prompts, eval_prompts = load_prompts(recipe.prompts, RECIPE.parent)
    base, tokenizer = load_base(recipe.model)
    policy = LMPolicy(with_adapters(base, recipe.adapters), tokenizer, recipe.rollout, recipe.model.chat_template)
    labeller = make_labeller(recipe.oracle)
    sets = []
    for seed, (prompts, n) in enumerate(((train_prompts, train_pairs), (eval_prompts, test_pairs))):
        source = SampledRollouts(policy, prompts, torch.Generator().manual_seed(seed))
        chosen = [prompts[i % len(prompts)] for i in range(n)]
        features: dict[int | None, list[Tensor]] = {layer: [] for layer in [*earlier, LAST]}
        masks, probs = [], []
        for start in range(0, n, batch):
            started = time.perf_counter()
            some = chosen[start : start + batch]
            pairs = consecutive_pairs(source.sample(None, [p for p in some for _ in range(2)]))
            rollout, ctx = pairs.rollout, pairs.rollout.context
            with torch.no_grad(), policy.adapter(None):
                states = policy.trunk.hidden_states(ctx.input_ids, ctx.attention_mask, layers=earlier)
            for layer, hidden in zip(features, states):
                features[layer].append(hidden[:, ctx.prompt_len - 1 :].to(torch.bfloat16))
            masks.append(rollout.mask)
            probs.append(labeller.ask(some, rollout.responses[0::2], rollout.responses[1::2]).float())
            print(f"sampled {start + len(some)}/{n} pairs ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
        sets.append(PairSet(chosen, {k: torch.cat(v) for k, v in features.items()}, torch.cat(masks), torch.cat(probs)))
    return sets[0], sets[1]


def cached(path: Path, settings: dict, make) -> tuple[PairSet, PairSet]:
    """`make()`, saved at `path`, or what was saved there for the same `settings`."""
    if path.is_file():
        saved = torch.load(path)
        if saved["settings"] == settings:
            return tuple(PairSet(**fields) for fields in saved["sets"])
    sets = make()
    torch.save({"settings": settings, "sets": [vars(s) for s in sets]}, path)
    return sets


@dataclass(frozen=True)
class Draw:
    """One seed's training labels: N pairs, their labels, and the quarter held out to choose c."""

    pairs: Tensor  # [N] indices into the training set
    labels: Tensor  # [N] Bernoulli draws from the oracle's P
    held_out: Tensor  # [N] bool


def draws(train: PairSet, n: int, seeds: int) -> list[Draw]:
    result = []
    for seed in range(seeds):
        generator = torch.Generator().manual_seed(1000 * n + seed)
        pairs = torch.randperm(len(train.prob), generator=generator)[:n]
        labels = torch.bernoulli(train.prob[pairs], generator=generator)
        result.append(Draw(pairs, labels, torch.arange(n) < round(VALIDATION * n)))
    return result


def stacked(cfg: RewardConfig, dim: int, seeds: list[int]) -> tuple[TokenReward, list[Tensor]]:
    """One TokenReward holding len(seeds) models of cfg.heads members each, side by side; model m starts
    as TokenReward(cfg) does under torch.manual_seed(seeds[m]). Returns it and φ₀."""
    heads = cfg.heads
    models = TokenReward(context_features, dim, replace(cfg, heads=len(seeds) * heads))
    with torch.no_grad():
        for m, seed in enumerate(seeds):
            torch.manual_seed(seed)
            one = TokenReward(context_features, dim, cfg)
            for whole, part in zip(models.parameters(), one.parameters()):  # each [E, …]: the members' rows
                whole[m * heads : (m + 1) * heads] = part
    return models, [p.detach().clone() for p in models.parameters()]


def context_features(rollout: Rollout) -> Tensor:
    return rollout.context


def margins(models: TokenReward, count: int, rollout: Rollout) -> Tensor:
    """[count, P] R_φ(τ0) − R_φ(τ1) of each model, its members' mean reward as token_rewards gives it."""
    members = models.member_rewards(rollout)
    pairs = consecutive_pairs(rollout)
    return torch.stack([est.pair_margins(rewards, pairs) for rewards in members.unflatten(0, (count, -1)).mean(1)])


def fit(models: TokenReward, start: list[Tensor], count: int, rollout: Rollout, labels: Tensor, weights: Tensor, priors: Tensor, steps: int, lr: float) -> None:
    """Adam on each model's mean bt_nll over the pairs it is given (`weights` [count, P], 0 or 1)
    plus its prior (c/N)‖φ − φ₀‖², all models at once."""
    params = models.parameters()
    optimizer = torch.optim.Adam(params, lr=lr)
    labelled = weights.sum(-1)
    for _ in range(steps):
        nll = est.upper_loss(margins(models, count, rollout), labels, "bt_nll")
        moved = sum(((p - p0) ** 2).reshape(count, -1).sum(-1) for p, p0 in zip(params, start))
        loss = ((nll * weights).sum(-1) / labelled + priors / labelled * moved).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_agreement(cfg: RewardConfig, train: PairSet, test: PairSet, drawn: list[Draw], steps: int, lr: float) -> Tensor:
    """[seeds, test pairs] agreement with the oracle's best order (NaN on its ties) of the form `cfg`
    fitted to each draw, with c chosen on the draw's held-out quarter."""
    seeds, n = len(drawn), len(drawn[0].pairs)
    union = torch.unique(torch.cat([d.pairs for d in drawn]))  # the rows any model reads
    local = torch.searchsorted(union, torch.stack([d.pairs for d in drawn]))  # [seeds, N]
    rollout = train.rollout(cfg.layer, union)
    # model (seed s, prior c, fitted on the N − held-out or on all N labels), in that order
    grid = list(itertools.product(range(seeds), range(len(PRIORS)), (True, False)))
    labels = torch.zeros(len(grid), len(union))
    weights = torch.zeros(len(grid), len(union))
    for m, (s, _, split) in enumerate(grid):
        labels[m, local[s]] = drawn[s].labels
        weights[m, local[s]] = (~drawn[s].held_out).float() if split else 1.0
    scale = 1.0 if cfg.pool == "sum" else 1.0 / train.mask.shape[1] ** 2
    priors = torch.tensor([PRIORS[c] * scale for _, c, _ in grid])
    models, start = stacked(cfg, train.features[cfg.layer].shape[-1], [s for s, _, _ in grid])
    fit(models, start, len(grid), rollout, labels, weights, priors, steps, lr)
    with torch.no_grad():
        fitted = margins(models, len(grid), rollout)
        on_test = margins(models, len(grid), test.rollout(cfg.layer, torch.arange(len(test.prob))))
    nll = est.upper_loss(fitted, labels, "bt_nll")
    result = torch.full((seeds, len(test.prob)), torch.nan)
    decided = test.prob != 0.5
    for s in range(seeds):
        held_out = torch.zeros(len(union), dtype=torch.bool)
        held_out[local[s][drawn[s].held_out]] = True
        chosen = min(range(len(PRIORS)), key=lambda c: nll[grid.index((s, c, True)), held_out].mean().item())
        result[s, decided] = agreement(on_test[grid.index((s, chosen, False))], test.prob)
    return result


def interval(values: Tensor, prompts: list[str], signed: bool = False) -> str:
    """The mean of `values` [fits, test pairs] (agreements, or differences of them) with a 95% percentile
    bootstrap over the test prompts (a prompt's pairs together) of their mean over fits; the oracle's
    ties (NaN) are left out."""
    per_pair = values.mean(0)
    decided = ~per_pair.isnan()
    units = sorted(set(prompts))
    unit = torch.tensor([units.index(p) for p in prompts])[decided]
    estimate = pooled(per_pair[decided], unit, len(units), 2000, 0.95, np.random.default_rng(0))
    return f"{estimate.mean:{'+' if signed else ''}.3f} [{estimate.low:.2f}, {estimate.high:.2f}]"


def form_name(cfg: RewardConfig) -> str:
    layer = "last" if cfg.layer == LAST else str(cfg.layer)
    return f"{'centred' if cfg.center else 'sigmoid'} | {cfg.pool} | {layer} | {cfg.heads}"


def table(train: PairSet, test: PairSet, seeds: int, steps: int, lr: float) -> str:
    """The markdown table: a row per form, the first being the form before this probe (sigmoid, sum,
    last layer, one head), whose agreement the last column subtracts, pair by pair, over every N."""
    header = "| r_φ | pool | layer | heads | " + " | ".join(f"N = {n}" for n in LABELS) + " | all N: − first row |"
    lines = [header, "|" + "---|" * (5 + len(LABELS))]
    drawn = {n: draws(train, n, seeds) for n in LABELS}
    forms = [
        RewardConfig(center=center, pool=pool, layer=layer, heads=heads)
        for layer, heads, (center, pool) in itertools.product(LAYERS, HEADS, SHAPES)
    ]
    first = None
    for cfg in forms:
        started = time.perf_counter()
        agreements = [test_agreement(cfg, train, test, drawn[n], steps, lr) for n in LABELS]
        every_n = torch.cat(agreements)
        first = every_n if first is None else first
        cells = [interval(a, test.prompts) for a in agreements] + [interval(every_n - first, test.prompts, signed=True)]
        lines.append(f"| {form_name(cfg)} | " + " | ".join(cells) + " |")
        print(lines[-1], f"({time.perf_counter() - started:.0f} s)", flush=True)
    decided = test.prob != 0.5
    one_label = torch.maximum(test.prob, 1 - test.prob)[decided].mean().item()
    lines.append(f"\nOne oracle label agrees with the oracle's best order {one_label:.3f} of the time on the test pairs "
                 f"({int(decided.sum())} of {len(test.prob)} pairs are not ties).")
    return "\n".join(lines)


def write(doc: Path, result: str, command: str, begin: str = BEGIN, end: str = END) -> None:
    """Puts `result` between the `begin` and `end` markers of `doc` (appended when it has none)."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    state = f"`{head}`" + (" with uncommitted changes" if dirty else "")
    block = f"{begin}\nMeasured at {state} by\n\n    {command}\n\n{result}\n{end}"
    text = doc.read_text() if doc.is_file() else ""
    if begin in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end) :]
    else:
        text = text + ("\n" if text else "") + block + "\n"
    doc.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-pairs", type=int, default=300)
    parser.add_argument("--test-pairs", type=int, default=150)
    parser.add_argument("--seeds", type=int, default=6, help="label draws per N")
    parser.add_argument("--steps", type=int, default=60, help="Adam steps per fit (as many as 400 at lr 0.01 changed no agreement by 0.01)")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--batch", type=int, default=16, help="pairs sampled per call")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/rlhf-bilevel-probe-reward.pt"))
    parser.add_argument("--write", action="store_true", help=f"put the table into {DOC.relative_to(ROOT)}")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    recipe = load_recipe(RECIPE)
    drawn_as = {key: recipe_dict(recipe)[key] for key in ("model", "rollout", "oracle", "prompts")}
    settings = {**drawn_as, "train": args.train_pairs, "test": args.test_pairs, "layers": list(LAYERS)}
    if max(LABELS) > args.train_pairs:
        raise SystemExit(f"--train-pairs: at least {max(LABELS)} needed, got {args.train_pairs}")
    train, test = cached(args.cache, settings, lambda: collect(recipe, args.train_pairs, args.test_pairs, args.batch))
    result = table(train, test, args.seeds, args.steps, args.lr)
    print(result)
    if args.write:
        write(DOC, result, shlex.join([".venv/bin/python", "scripts/probe_reward.py", *sys.argv[1:]]))


if __name__ == "__main__":
    main()
