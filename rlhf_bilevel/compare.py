"""`rlhf-bilevel compare`: the head-to-head at one oracle budget.

Three methods run on one recipe (same model, prompts, oracle, horizon, LoRA settings) for
each seed of a seed set, and spend the same number of oracle-labelled pairs,
`bilevel.outer_steps · B·(K+1)`:

    bilevel       Algorithm 1 (`bilevel.method: bilevel`)
    alternating   standard online RLHF (`bilevel.method: alternating`)
    online-dpo    TRL's Online DPO trainer, the same oracle labelling its pairs

Then one evaluation protocol scores all of them (`rlhf_bilevel.evaluate`): the final
policies in full, and snapshots along the way by gold score only, on the same held-out
prompts and random stream, so the curves of gold score against oracle pairs used are
comparable point for point.

    OUT/
      bilevel-seed0/ alternating-seed0/ online-dpo-seed0/   the runs (each with eval/)
      comparison.json   every number of the table, and the curves
      comparison.md     the table
      comparison.png    gold score against oracle pairs used
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rlhf_bilevel.config import ConfigError, positive
from rlhf_bilevel.evaluate import EvalConfig, evaluate, gold_score, held_out_prompts, load_policy, load_run
from rlhf_bilevel.online_dpo import train_online_dpo
from rlhf_bilevel.oracles.registry import make_oracle
from rlhf_bilevel.recipe import Recipe, load_recipe
from rlhf_bilevel.report import plain, write_eval
from rlhf_bilevel.train import train
from rlhf_bilevel.types import LAMBDA

METHODS = ("bilevel", "alternating", "online-dpo")
QUICK = ["model.name=tiny", "model.dtype=float32", "bilevel.outer_steps=4", "train.eval_pairs=4"]
"""--quick: the recipe on the tiny model built in code, a few outer steps: minutes on a CPU."""


@dataclass(frozen=True)
class CompareConfig:
    seeds: tuple[int, ...] = (0,)  # each method runs once per seed
    snapshots: int = 4  # points along each run for the gold-score curve, the end included
    dpo_beta: float = 0.1  # Online DPO's β
    eval: EvalConfig = EvalConfig()

    def __post_init__(self) -> None:
        positive(self, "snapshots", "dpo_beta")
        if not self.seeds:
            raise ConfigError("--seed: give at least one seed")


def snapshot_every(recipe: Recipe, snapshots: int) -> int:
    """Outer steps between snapshots; they fall on whole outer steps, so some budgets get fewer."""
    return max(1, recipe.bilevel.outer_steps // snapshots)


class Comparison:
    def __init__(self, recipe_file: Path, out: Path, cfg: CompareConfig, overrides: list[str], log: Callable[[str], None]):
        self.recipe_file, self.out, self.cfg, self.overrides, self.log = recipe_file, out, cfg, overrides, log
        self.base_dir = recipe_file.resolve().parent
        recipe = load_recipe(recipe_file, overrides)  # every bad input is reported before anything runs
        self.every = snapshot_every(recipe, cfg.snapshots)
        self.oracle = make_oracle(recipe.oracle)
        self.prompts = held_out_prompts(recipe, self.base_dir)
        if cfg.eval.prompts:
            self.prompts = self.prompts[: cfg.eval.prompts]
        self.gold = hasattr(self.oracle, "score")

    def recipe(self, seed: int, method: str) -> Recipe:
        settings = [*self.overrides, f"train.seed={seed}", "train.keep=null", f"train.save_every={self.every}"]
        if method != "online-dpo":
            settings.append(f"bilevel.method={method}")
        return load_recipe(self.recipe_file, settings)

    # -- one method, one seed --------------------------------------------------------------------------
    def run(self, method: str, seed: int) -> dict:
        recipe = self.recipe(seed, method)
        folder = self.out / f"{method}-seed{seed}"
        budget = recipe.bilevel.outer_steps * recipe.bilevel.pairs_per_outer_step
        self.log(f"{method}, seed {seed}: training on {budget} oracle pairs")
        start = time.perf_counter()
        if method == "online-dpo":
            trained = train_online_dpo(
                recipe, folder, self.base_dir, pairs=budget, beta=self.cfg.dpo_beta,
                snapshot_every=self.every * recipe.bilevel.pairs_per_outer_step,
            )
            wall, pairs = trained.seconds, trained.oracle_pairs
            snapshots = {int(p): Path(a) for p, a in trained.snapshots.items()}
            final = load_policy(recipe, Path(trained.adapter_dir))
            result = evaluate(final, self.oracle, self.prompts, self.cfg.eval)
            write_eval(result, folder / "eval", name=folder.name)
        else:
            summary = train(recipe, folder, self.base_dir)
            wall, pairs = summary.seconds, summary.oracle_pairs
            snapshots = {
                int(path.name.split("-")[1]) * recipe.bilevel.pairs_per_outer_step: path / "adapters" / LAMBDA
                for path in sorted(folder.glob("checkpoint-*"))
            }
            _, _, final, reward = load_run(folder)
            result = evaluate(final, self.oracle, self.prompts, self.cfg.eval, reward)
            write_eval(result, folder / "eval", name=folder.name, metrics_file=folder / "metrics.jsonl")
        self.log(f"{method}, seed {seed}: {time.perf_counter() - start:.0f} s, win rate {result['win_rate']}")
        curve = []
        if self.gold:
            curve = [(0, result["gold"]["reference"].mean)]
            curve += [(p, gold_score(load_policy(recipe, a), self.oracle, self.prompts, self.cfg.eval.seed)) for p, a in sorted(snapshots.items())]
        return {"method": method, "seed": seed, "oracle_pairs": pairs, "seconds": wall, "eval": result, "curve": curve}

    def all(self) -> list[dict]:
        self.out.mkdir(parents=True, exist_ok=True)
        rows = [self.run(method, seed) for seed in self.cfg.seeds for method in METHODS]
        (self.out / "comparison.json").write_text(json.dumps(plain(rows), indent=1, ensure_ascii=False), encoding="utf-8")
        (self.out / "comparison.md").write_text(table(rows), encoding="utf-8")
        if self.gold:
            plot(rows, self.out / "comparison.png")
        return rows


def table(rows: list[dict]) -> str:
    """One line per method and seed; intervals are 95% bootstrap over held-out prompts."""
    lines = [
        "| method | seed | win rate vs reference | gold score | KL | agreement on policy pairs | agreement on reference pairs | oracle pairs | train seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        result = row["eval"]
        gold = str(result["gold"]["policy"]) if "gold" in result else "—"
        agree = result.get("agreement", {})
        on_policy, on_reference = (str(agree[k]) if k in agree else "—" for k in ("policy", "reference"))
        lines.append(
            f"| {row['method']} | {row['seed']} | {result['win_rate']} | {gold} | {result['kl']:.2f} | {on_policy} | {on_reference} "
            f"| {row['oracle_pairs']} | {row['seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for row in rows:
        x, y = zip(*row["curve"])
        ax.plot(x, y, marker="o", label=f"{row['method']} (seed {row['seed']})")
    ax.set(xlabel="oracle pairs used", ylabel="gold score (held-out)", title="Gold score at equal feedback")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def compare(recipe_file: Path, out: Path, cfg: CompareConfig, overrides: list[str] = (), quick: bool = False,
            log: Callable[[str], None] = print) -> list[dict]:
    """Runs every method for every seed on `recipe_file`, evaluates them alike, and writes the table and plot."""
    if (out / "comparison.json").exists():
        raise ConfigError(f"--out: {out} already holds a comparison; pick another folder")
    overrides = [*(QUICK if quick else []), *overrides]
    return Comparison(recipe_file, out, cfg, overrides, log).all()
