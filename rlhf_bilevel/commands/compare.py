"""`rlhf-bilevel compare`: the head-to-head at one oracle budget, over a seed set.

Three methods run on one recipe (same model, prompts, oracle, horizon, LoRA settings) for
each seed of a seed set, and spend the same number of oracle-labelled pairs,
`bilevel.outer_steps · B·(K+1)`:

    bilevel       Algorithm 1 (`bilevel.method: bilevel`)
    alternating   standard online RLHF (`bilevel.method: alternating`)
    online-dpo    TRL's Online DPO trainer, the same oracle labelling its pairs

Then one evaluation protocol scores all of them (`rlhf_bilevel.evaluate`): the final
policies in full, and snapshots along the way by two cheap measures: the gold score, and for the
methods that learn a reward model, how often that snapshot's reward model orders its policy's
pairs as the oracle does. All use the same held-out prompts and random stream, so the curves
against oracle pairs used are comparable point for point.

Each (method, seed) run trains and is evaluated on its own, so `--jobs N` runs them as N
worker processes, each on its share of the cores. One seed says little: a seed changes the
whole trajectory, and gains of a few points come and go with it. So each method's final
numbers are also summarised over its seeds, by the mean and the Student-t interval of the
per-seed values (the seed is the unit there, as the prompt is within one evaluation).

`--sweep FIELD=V1,V2,...` repeats the whole comparison once per value of one recipe field, as
if `--set FIELD=V` were given, e.g. `--sweep oracle.flip=0,0.25` for the methods' robustness to
noisy labels. Each value is a separate set of runs, in its own folder `OUT/FIELD=V/`, and its
own rows of every table and line of every plot, named `method (FIELD=V)`.

Two methods run on the same seeds are also compared seed by seed: the mean of the per-seed
differences in gold and its interval, which is narrower than either method's own when a seed
moves both alike. `rlhf-bilevel merge` pools the runs of several comparisons of one problem,
seeds added later say, into one such report.

    OUT/
      bilevel-seed0/ alternating-seed0/ online-dpo-seed0/ ...   the runs (each with eval/)
      comparison.json       {"runs": one row per run, "summary": per method (and swept value) over its seeds,
                             "differences": per pair of methods, over the seeds both ran}
      comparison.md         the runs table, the over-seeds table, the paired-differences table (gold,
                            gold gain per √KL, gold at the lower KL of the two) and the reward
                            model's agreement at each snapshot
      comparison.png        gold score against oracle pairs used: mean over seeds, interval shaded
      comparison-time.png   the same against wall-clock training seconds
      comparison-agreement.png  the reward model's agreement against oracle pairs used, for the methods that learn one
      comparison-kl.png     each run's gold against √KL to the reference, through its snapshots
"""

from __future__ import annotations

import functools
import io
import json
import math
import multiprocessing
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from contextlib import closing, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence, TextIO

import torch

from rlhf_bilevel.checkpoint import checkpoints
from rlhf_bilevel.commands.eval import held_out_prompts, load_checkpoint_policy, load_policy, load_run
from rlhf_bilevel.config import ConfigError, positive
from rlhf_bilevel.distributed import resolve_device
from rlhf_bilevel.environment import available_cores
from rlhf_bilevel.evaluate import Estimate, EvalConfig, evaluate, policy_measures, snapshot_measures
from rlhf_bilevel.labelling import make_labeller
from rlhf_bilevel.preflight import check_output_dir
from rlhf_bilevel.report import plain, write_eval
from rlhf_bilevel.run_folder import RunFolder

if TYPE_CHECKING:  # the recipe, the trainers and TRL are imported where used: a bad option is then reported in seconds
    from rlhf_bilevel.recipe import Recipe

METHODS = ("bilevel", "alternating", "online-dpo")
QUICK = ["model.name=tiny", "model.dtype=float32", "bilevel.outer_steps=4", "train.eval_pairs=4"]
"""--quick: the recipe on the tiny model built in code, a few outer steps: minutes on a CPU."""

SUMMARY_COLUMNS = [  # (measure, column title, decimals) of the over-seeds table
    ("gold", "gold", 3),
    ("gold_gain", "gold gain", 3),
    ("gold_per_sqrt_kl", "gold gain per √KL", 3),
    ("agreement_policy", "agreement policy", 3),
    ("agreement_reference", "agreement reference", 3),
    ("kl", "KL", 2),
    ("seconds", "seconds", 0),
]


@dataclass(frozen=True)
class Sweep:
    """One recipe field and the values a comparison runs it at, each as `--set field=value`."""

    field: str
    values: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> Sweep:
        example = "e.g. --sweep oracle.flip=0,0.25"
        field, sep, values = text.partition("=")
        parts = tuple(v.strip() for v in values.split(","))
        if not sep or not field.strip() or not all(parts):
            raise ConfigError(f"--sweep: expected FIELD=VALUE,VALUE,..., {example}; got {text!r}")
        if len(set(parts)) < len(parts):
            raise ConfigError(f"--sweep: each value once, got {values}")
        return cls(field.strip(), parts)

    def settings(self) -> list[str]:
        """The `field=value` override of each value, in order."""
        return [f"{self.field}={value}" for value in self.values]


@dataclass(frozen=True)
class CompareConfig:
    seeds: tuple[int, ...] = (0,)  # each method runs once per seed
    methods: tuple[str, ...] = METHODS  # the methods that run, always in the order of METHODS
    jobs: int = 1  # worker processes running (method, seed) runs side by side; 1 runs them here, one by one
    snapshots: int = 4  # points along each run for the gold-score curve, the end included
    dpo_beta: float = 0.1  # Online DPO's β
    eval: EvalConfig = EvalConfig()
    sweep: Sweep | None = None  # one recipe field the whole comparison is repeated over, value by value

    def __post_init__(self) -> None:
        positive(self, "snapshots", "dpo_beta")
        if not self.seeds:
            raise ConfigError("--seed: give at least one seed")
        if len(set(self.seeds)) < len(self.seeds):
            raise ConfigError(f"--seed: each seed once, got {', '.join(map(str, self.seeds))}")
        if not self.methods:
            raise ConfigError(f"--method: give at least one of {', '.join(METHODS)}")
        check_methods(self.methods)
        if self.jobs < 1:
            raise ConfigError(f"--jobs: must be at least 1, got {self.jobs}")


def check_methods(methods: Sequence[str]) -> None:
    for method in methods:
        if method not in METHODS:
            raise ConfigError(f"--method: unknown method '{method}' (choose from {', '.join(METHODS)})")


def snapshot_every(recipe: Recipe, snapshots: int) -> int:
    """Outer steps between snapshots; they fall on whole outer steps, so some budgets get fewer."""
    return max(1, recipe.bilevel.outer_steps // snapshots)


class PrefixedLines(io.TextIOBase):
    """Writes each complete line to `stream` behind `prefix`, in one write: the lines of runs in parallel
    processes then interleave whole, and each says whose it is."""

    def __init__(self, stream: TextIO, prefix: str):
        self.stream, self.prefix, self.pending = stream, prefix, ""

    def write(self, text: str) -> int:
        *lines, self.pending = (self.pending + text).split("\n")
        if lines:
            self.stream.write("".join(f"{self.prefix}{line}\n" for line in lines))
            self.stream.flush()
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def close(self) -> None:
        if self.pending:  # a last line without its newline
            self.write("\n")
        super().close()


def start_worker(threads: int, warning_filters: list, library_logging: tuple[int, bool]) -> None:
    """A worker process takes its share of the cores, `threads` (`workers` runs each on all of them would
    oversubscribe), and the warning filters and Hugging Face logging of the process that started it,
    which spawning loses."""
    from transformers.utils import logging as hf_logging

    torch.set_num_threads(threads)
    warnings.filters[:] = warning_filters
    verbosity, bars = library_logging
    hf_logging.set_verbosity(verbosity)
    (hf_logging.enable_progress_bar if bars else hf_logging.disable_progress_bar)()


def unrewarded(recipe: Recipe, adapter: Path) -> tuple[Any, None]:
    """(policy, reward model) of a snapshot of a run that learns no reward model (Online DPO's): π_λ at `adapter`, and None."""
    return load_policy(recipe, adapter), None


def labels_flipped(metrics_file: Path) -> int:
    """Training labels a run's `oracle.flip` flipped, from the last outer record of its metrics.jsonl (0 without flips)."""
    flipped = 0
    for line in metrics_file.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if record.get("phase") == "outer":
            flipped = int(record.get("oracle/flipped", 0))
    return flipped


def run_name(row: dict) -> str:
    """What a run's method is called in tables and plots: with its swept setting, if any."""
    return f"{row['method']} ({row['setting']})" if "setting" in row else row["method"]


def outer_seconds(metrics_file: Path) -> dict[int, float]:
    """Outer step → wall seconds of training by its end (`time/elapsed_s`), from a run's metrics.jsonl."""
    seconds = {}
    for line in metrics_file.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if record.get("phase") == "outer" and "time/elapsed_s" in record:
            seconds[int(record["outer_step"])] = record["time/elapsed_s"]
    return seconds


class Comparison:
    """What every run of one comparison shares. It holds only plain values, so a worker process
    receives it whole and builds its own model and oracle."""

    def __init__(self, recipe_file: Path, out: Path, cfg: CompareConfig, overrides: list[str]):
        from rlhf_bilevel.recipe import load_recipe

        self.recipe_file, self.out, self.cfg, self.overrides = recipe_file, out, cfg, overrides
        self.base_dir = recipe_file.resolve().parent
        self.settings: list[str | None] = cfg.sweep.settings() if cfg.sweep else [None]
        # every bad input, a swept value's too, is reported before anything runs
        recipes = {setting: load_recipe(recipe_file, [*overrides, *([setting] if setting else [])]) for setting in self.settings}
        self.every = {setting: snapshot_every(recipe, cfg.snapshots) for setting, recipe in recipes.items()}
        self.workers = min(cfg.jobs, len(self.runs()))
        # each of the runs side by side on its share of the cores, unless the recipe names a count
        self.threads = max(1, available_cores() // self.workers)
        self.recipe_threads = {setting: recipe.train.threads for setting, recipe in recipes.items()}
        # one set of held-out prompts for every run, so that their evaluations compare
        self.prompts = held_out_prompts(recipes[self.settings[0]], self.base_dir)
        if cfg.eval.prompts:
            self.prompts = self.prompts[: cfg.eval.prompts]

    def recipe(self, seed: int, method: str, setting: str | None) -> Recipe:
        from rlhf_bilevel.recipe import load_recipe

        settings = [*self.overrides, *([setting] if setting else []), f"train.seed={seed}", "train.keep=null", f"train.save_every={self.every[setting]}"]
        if method != "online-dpo":
            settings.append(f"bilevel.method={method}")
        if self.recipe_threads[setting] is None:
            settings.append(f"train.threads={self.threads}")
        return load_recipe(self.recipe_file, settings)

    # -- one method, one seed --------------------------------------------------------------------------
    def run(self, method: str, seed: int, setting: str | None = None) -> dict:
        """Trains and evaluates `method` on `seed` (with the swept `setting`); what it prints goes to
        stdout behind "method/seedS: " (or "setting/method/seedS: ")."""
        lines = PrefixedLines(sys.stdout, f"{setting + '/' if setting else ''}{method}/seed{seed}: ")
        with redirect_stdout(lines), closing(lines):
            return self.train_and_evaluate(method, seed, setting)

    def train_and_evaluate(self, method: str, seed: int, setting: str | None) -> dict:
        from rlhf_bilevel.online_dpo import train_online_dpo
        from rlhf_bilevel.commands.train import train

        recipe = self.recipe(seed, method, setting)
        labeller = make_labeller(recipe.oracle, seed)
        folder = (self.out / setting if setting else self.out) / f"{method}-seed{seed}"
        per_outer_step = recipe.bilevel.pairs_per_outer_step
        budget = recipe.bilevel.outer_steps * per_outer_step
        print(f"training on {budget} oracle pairs")
        start = time.perf_counter()
        if method == "online-dpo":
            trained = train_online_dpo(
                recipe, folder, self.base_dir, pairs=budget, beta=self.cfg.dpo_beta, snapshot_every=self.every[setting] * per_outer_step,
            )
            wall, pairs, flipped = trained.seconds, trained.oracle_pairs, trained.labels_flipped
            snapshots = {p: (functools.partial(unrewarded, recipe, Path(a)), trained.snapshot_seconds[p]) for p, a in trained.snapshots.items()}
            final = load_policy(recipe, Path(trained.adapter_dir))
            result = evaluate(final, labeller, self.prompts, self.cfg.eval)
            write_eval(result, folder / "eval", name=folder.name)
        else:
            summary = train(recipe, folder, self.base_dir)
            wall, pairs = summary.seconds, summary.oracle_pairs
            flipped = labels_flipped(folder / "metrics.jsonl")
            elapsed = outer_seconds(folder / "metrics.jsonl")
            run = RunFolder(folder)
            snapshots = {
                step * per_outer_step: (functools.partial(load_checkpoint_policy, run, path, recipe), elapsed[step]) for step, path in checkpoints(folder)
            }
            _, _, final, reward = load_run(folder)
            result = evaluate(final, labeller, self.prompts, self.cfg.eval, reward)
            write_eval(result, folder / "eval", name=folder.name, metrics_file=folder / "metrics.jsonl")
        print(f"{time.perf_counter() - start:.0f} s, win rate {result['win_rate']}")
        # snapshots: oracle pairs → (loads that point's policy and reward model, seconds), loaded only when
        # measured, so one snapshot's model is in memory at a time
        curve = []
        if "gold" in result:  # the oracle has a gold score
            curve = [{"oracle_pairs": 0, "seconds": 0.0, "gold": result["gold"]["reference"].mean, "kl": 0.0}]
            last = max(snapshots)
            for p, (load, s) in sorted(snapshots.items()):
                if p == last:  # the final policy and reward model, which `evaluate` has just measured
                    measured = policy_measures(result)
                else:
                    policy, reward = load()
                    measured = snapshot_measures(policy, labeller, self.prompts, self.cfg.eval, reward)
                curve.append({"oracle_pairs": p, "seconds": s, **measured})
        row = {"method": method, "seed": seed, "oracle_pairs": pairs, "labels_flipped": flipped, "seconds": wall, "eval": result, "curve": curve}
        return row | ({"setting": setting} if setting else {})

    # -- every method, every seed --------------------------------------------------------------------
    def runs(self) -> list[tuple[str, int, str | None]]:
        """(method, seed, swept setting) of every run, in the order of the report."""
        return [
            (method, seed, setting)
            for setting in self.settings for seed in self.cfg.seeds for method in METHODS if method in self.cfg.methods
        ]

    def all(self) -> dict:
        self.out.mkdir(parents=True, exist_ok=True)
        runs = self.runs()
        learning = [setting for setting in self.settings if any(method != "online-dpo" for method in self.cfg.methods)]
        if self.workers == 1:
            rows = [self.run(*run) for run in runs]
            before = {setting: self.agreement_before_labels(setting) for setting in learning}
        else:
            # spawned, not forked: a forked child inherits torch's thread pool and OpenMP state mid-use
            context = multiprocessing.get_context("spawn")
            from transformers.utils import logging as hf_logging

            logging = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
            initargs = (self.threads, warnings.filters, logging)
            with ProcessPoolExecutor(self.workers, mp_context=context, initializer=start_worker, initargs=initargs) as pool:
                futures = [pool.submit(self.run, *run) for run in runs]
                # queued after the runs, it takes a worker that the last runs leave idle
                measures = {setting: pool.submit(self.agreement_before_labels, setting) for setting in learning}
                try:
                    rows = [future.result() for future in futures]  # in submission order, whatever finishes first
                    before = {setting: future.result() for setting, future in measures.items()}
                except BaseException:
                    pool.shutdown(cancel_futures=True)  # the runs under way finish; the others never start
                    raise
        for row in rows:
            if row["method"] != "online-dpo" and row["curve"] and before[row.get("setting")] is not None:
                row["curve"][0]["agreement"] = before[row.get("setting")]
        return write_comparison(rows, self.out, self.cfg.eval.confidence)

    def agreement_before_labels(self, setting: str | None) -> float | None:
        """Where the agreement curve of a run that learns a reward model starts, at 0 labels: how often
        R_φ₀ orders the reference's pairs as the oracle does; None where the oracle has no gold score,
        and so the runs no curve. R_φ₀ and the reference are the same in every seed's run
        (`initial_parts`), so it is measured once per swept setting."""
        from rlhf_bilevel.commands.train import initial_parts

        method = next(method for method in self.cfg.methods if method != "online-dpo")
        recipe = self.recipe(self.cfg.seeds[0], method, setting)
        labeller = make_labeller(recipe.oracle, self.cfg.seeds[0])
        if not labeller.offers_score:
            return None
        _, _, policy, reward = initial_parts(recipe, resolve_device(recipe.train.device))
        before = snapshot_measures(policy, labeller, self.prompts, self.cfg.eval, reward, adapter=None)["agreement"]
        print(f"{setting + ': ' if setting else ''}the reward model before any label orders {before:.3f} of the reference's pairs as the oracle does")
        return before


def write_comparison(rows: list[dict], out: Path, confidence: float, **extra) -> dict:
    """comparison.json, comparison.md and the plots of `rows` in `out`; `extra` goes into the JSON as is."""
    comparison = {**extra, "runs": rows, "summary": summarise(rows, confidence), "differences": differences(rows, confidence)}
    (out / "comparison.json").write_text(json.dumps(plain(comparison), indent=1, ensure_ascii=False), encoding="utf-8")
    tables = [table(rows), summary_table(comparison["summary"], confidence)]
    if comparison["differences"]:
        tables.append(differences_table(comparison["differences"], confidence))
    along = any("agreement" in point for over in comparison["summary"].values() for point in over["curve"])
    if along:
        tables.append(agreement_table(comparison["summary"], confidence))
    (out / "comparison.md").write_text("\n".join(tables), encoding="utf-8")
    if any(row["curve"] for row in rows):
        plot(comparison["summary"], "oracle_pairs", "oracle pairs used", out / "comparison.png")
        plot(comparison["summary"], "seconds", "training seconds (wall clock)", out / "comparison-time.png")
        plot_frontier([row for row in rows if row["curve"]], out / "comparison-kl.png")
    if along:
        plot(comparison["summary"], "oracle_pairs", "oracle pairs used", out / "comparison-agreement.png", measure="agreement")
    return comparison


# -- over seeds ----------------------------------------------------------------------------------------
def t_interval(values: Sequence[float], confidence: float) -> Estimate:
    """Mean ± t_{n−1} · s/√n over per-seed values: Student's interval, as a seed set is small and its spread
    unknown. With one seed there is no spread to measure, and the interval is NaN."""
    from scipy import stats

    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return Estimate(mean, math.nan, math.nan, n)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = stats.t.ppf((1 + confidence) / 2, n - 1) * sd / math.sqrt(n)
    return Estimate(mean, mean - half, mean + half, n)


def measures(row: dict) -> dict[str, float]:
    """The final numbers of one run that the summary takes over seeds; those the method or oracle lacks are left out.

    `gold_per_sqrt_kl`, the gold gained per unit of √KL to the reference, is how far a run's gold rose
    for how far its policy moved. On SmolLM2 the seeds' gold differ mostly in how far their policies
    moved (docs/results.md), and at first gold rises in proportion to √KL (Gao et al., 2023, for RL
    against a learned reward), so the ratio compares the directions methods move in with less of that
    spread."""
    result = row["eval"]
    values = {"kl": result["kl"], "seconds": row["seconds"]}
    if "gold" in result:
        values["gold"] = result["gold"]["policy"].mean
        values["gold_gain"] = values["gold"] - result["gold"]["reference"].mean
        if result["kl"] > 0:  # a policy the estimate sees move at all
            values["gold_per_sqrt_kl"] = values["gold_gain"] / math.sqrt(result["kl"])
    if "agreement" in result:
        values["agreement_policy"] = result["agreement"]["policy"].mean
        values["agreement_reference"] = result["agreement"]["reference"].mean
    return values


def summarise(rows: list[dict], confidence: float) -> dict[str, dict]:
    """Per method (and swept setting): the seeds, each measure's interval over them, and the mean curve.

    A curve point is the i-th snapshot of every seed's run, which falls on the same oracle-pair
    count in each (equal budgets, equal snapshot steps); its seconds are the seeds' mean.
    """
    summary = {}
    for method in dict.fromkeys(map(run_name, rows)):
        runs = [row for row in rows if run_name(row) == method]
        per_seed = [measures(row) for row in runs]
        summary[method] = {"seeds": [row["seed"] for row in runs]}
        # a measure where every seed has it
        summary[method].update({name: t_interval([m[name] for m in per_seed], confidence) for name in per_seed[0] if all(name in m for m in per_seed)})
        summary[method]["curve"] = [
            {
                "oracle_pairs": sum(p["oracle_pairs"] for p in points) / len(points),
                "seconds": sum(p["seconds"] for p in points) / len(points),
                "gold": t_interval([p["gold"] for p in points], confidence),
            }
            # a point's agreement where every seed's run measured one (not those of compares before it was measured)
            | ({"agreement": t_interval([p["agreement"] for p in points], confidence)} if all("agreement" in p for p in points) else {})
            for points in zip(*(row["curve"] for row in runs))
        ]
    return summary


def differences(rows: list[dict], confidence: float) -> dict[str, dict]:
    """Gold of each method minus each later one's (within one swept setting), seed by seed on the seeds
    both ran: at the end and at each curve point, with the Student-t interval of the per-seed differences
    and how many seeds the first is higher on. A seed moves both methods' gold alike (its prompts, its
    reference), so the paired interval is the one that says whether one method is ahead."""
    by_run = {(run_name(row), row["seed"]): row for row in rows}
    setting = {run_name(row): row.get("setting") for row in rows}
    result = {}
    for i, first in enumerate(setting):
        for second in [name for name in list(setting)[i + 1 :] if setting[name] == setting[first]]:
            pairs = [(by_run[first, seed], by_run[second, seed]) for name, seed in by_run if name == first and (second, seed) in by_run]
            if not pairs or "gold" not in pairs[0][0]["eval"]:
                continue
            final = [a["eval"]["gold"]["policy"].mean - b["eval"]["gold"]["policy"].mean for a, b in pairs]
            per_sqrt_kl = [(measures(a).get("gold_per_sqrt_kl"), measures(b).get("gold_per_sqrt_kl")) for a, b in pairs]
            matched = [gold_at_matched_kl(a, b) for a, b in pairs]
            result[f"{first} − {second}"] = {
                "seeds": [a["seed"] for a, _ in pairs],
                "gold": t_interval(final, confidence),
                "higher": sum(d > 0 for d in final),
                # where both policies moved on every seed
                **({"gold_per_sqrt_kl": t_interval([x - y for x, y in per_sqrt_kl], confidence)} if all(None not in both for both in per_sqrt_kl) else {}),
                **({"gold_at_matched_kl": t_interval(matched, confidence)} if None not in matched else {}),
                "curve": [
                    {"oracle_pairs": points[0][0]["oracle_pairs"], "gold": t_interval([p["gold"] - q["gold"] for p, q in points], confidence)}
                    for points in zip(*(zip(a["curve"], b["curve"]) for a, b in pairs))
                ],
            }
    return result


def frontier(row: dict) -> list[tuple[float, float]]:
    """(√KL to the reference, gold) along one run, in the order it went: the reference (0, its gold), each
    snapshot that measured its KL, the final policy. A KL estimate below 0 counts as 0."""
    result = row["eval"]
    along = [(point["kl"], point["gold"]) for point in row["curve"][1:-1] if "kl" in point]
    points = [(0.0, result["gold"]["reference"].mean), *along, (result["kl"], result["gold"]["policy"].mean)]
    return [(math.sqrt(max(kl, 0.0)), gold) for kl, gold in points]


def gold_at_matched_kl(a: dict, b: dict) -> float | None:
    """Run `a`'s gold minus run `b`'s where both stood at the same KL: the lower of their two final KLs.
    The run that ended there gives its final gold; the other its gold where its path first reached that
    √KL, linear between the two points around it. None where either policy did not measurably move.

    Gold per √KL compares runs that moved different distances along a frontier that bends over as gold
    nears its ceiling, which favours the one that moved less; this compares them at one distance. The
    interpolated run is read off the chord between two snapshots, which lies below a path that bends
    over there and above one that bends up; more `--snapshots` make its path finer."""
    paths = frontier(a), frontier(b)
    reach = min(path[-1][0] for path in paths)
    if reach <= 0:
        return None

    def gold_at(path: list[tuple[float, float]]) -> float:
        if path[-1][0] == reach:
            return path[-1][1]
        # a path from 0 to beyond `reach` first crosses it going up
        (x0, g0), (x1, g1) = next(segment for segment in zip(path, path[1:]) if segment[0][0] <= reach < segment[1][0])
        return g0 + (g1 - g0) * (reach - x0) / (x1 - x0)

    return gold_at(paths[0]) - gold_at(paths[1])


# -- what a user reads ---------------------------------------------------------------------------------
def table(rows: list[dict]) -> str:
    """One line per method and seed; intervals are 95% bootstrap over held-out prompts."""
    lines = [
        "| method | seed | win rate vs reference | gold score | KL | agreement on policy pairs | agreement on reference pairs | oracle pairs | labels flipped | train seconds |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        result = row["eval"]
        gold = str(result["gold"]["policy"]) if "gold" in result else "—"
        agree = result.get("agreement", {})
        on_policy, on_reference = (str(agree[k]) if k in agree else "—" for k in ("policy", "reference"))
        lines.append(
            f"| {run_name(row)} | {row['seed']} | {result['win_rate']} | {gold} | {result['kl']:.2f} | {on_policy} | {on_reference} "
            f"| {row['oracle_pairs']} | {row['labels_flipped']} | {row['seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def cell(estimate: Estimate | None, decimals: int) -> str:
    """`mean [low, high]`; an interval one seed cannot give is `—`, and so is a measure the method lacks."""
    if estimate is None:
        return "—"
    if math.isnan(estimate.low):
        return f"{estimate.mean:.{decimals}f} [—]"
    return f"{estimate.mean:.{decimals}f} [{estimate.low:.{decimals}f}, {estimate.high:.{decimals}f}]"


def summary_table(summary: dict[str, dict], confidence: float) -> str:
    """One line per method: the mean over its seeds and the Student-t interval of each final measure."""
    titles = [f"{title} (mean [{confidence:.0%} CI])" if name == "gold" else title for name, title, _ in SUMMARY_COLUMNS]
    lines = [f"| method | seeds | {' | '.join(titles)} |", "|---|---|" + "---|" * len(SUMMARY_COLUMNS)]
    for method, over in summary.items():
        cells = [cell(over.get(name), decimals) for name, _, decimals in SUMMARY_COLUMNS]
        lines.append(f"| {method} | {len(over['seeds'])} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def differences_table(diffs: dict[str, dict], confidence: float) -> str:
    """One line per pair of methods: the mean of their per-seed gold differences, its interval, the seeds the
    first wins, and the same interval for their gold gain per √KL and for their gold at the lower KL of the two."""
    lines = [
        f"| paired difference | seeds | gold (mean [{confidence:.0%} CI]) | seeds the first is higher on | gold gain per √KL | gold at the lower KL of the two |",
        "|---|---|---|---|---|---|",
    ]
    for pair, diff in diffs.items():
        lines.append(
            f"| {pair} | {len(diff['seeds'])} | {cell(diff['gold'], 3)} | {diff['higher']} of {len(diff['seeds'])} "
            f"| {cell(diff.get('gold_per_sqrt_kl'), 3)} | {cell(diff.get('gold_at_matched_kl'), 3)} |"
        )
    return "\n".join(lines) + "\n"


def agreement_table(summary: dict[str, dict], confidence: float) -> str:
    """One line per method and snapshot: its reward model's agreement with the oracle on its policy's pairs, over seeds."""
    lines = [
        f"| method | seeds | oracle pairs used | agreement on the snapshot policy's pairs (mean [{confidence:.0%} CI]) |",
        "|---|---|---|---|",
    ]
    for method, over in summary.items():
        for point in over["curve"]:
            if "agreement" in point:
                lines.append(f"| {method} | {len(over['seeds'])} | {point['oracle_pairs']:.0f} | {cell(point['agreement'], 3)} |")
    return "\n".join(lines) + "\n"


PLOTTED = {  # measure of a curve point: (y label, title)
    "gold": ("gold score (held-out)", "Gold score at equal feedback, mean over seeds"),
    "agreement": ("agreement with the oracle (policy pairs)", "The reward model along the run, mean over seeds"),
}


def figure():
    """A new figure and its axes, drawn without a screen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(6.5, 4.2))


def save(fig, ax, path: Path, **labels) -> None:
    """Labels the axes (`xlabel`, `ylabel`, `title`), adds the legend and writes the figure to `path`."""
    import matplotlib.pyplot as plt

    ax.set(**labels)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot(summary: dict[str, dict], x: str, xlabel: str, path: Path, measure: str = "gold") -> None:
    """`measure` against `x` of the mean curves, one line per method, its seeds' interval shaded where it exists;
    a method's line joins the points that have the measure."""
    fig, ax = figure()
    for method, over in summary.items():
        points = [point for point in over["curve"] if measure in point]
        if not points:
            continue
        xs = [point[x] for point in points]
        ys = [point[measure] for point in points]
        (line,) = ax.plot(xs, [y.mean for y in ys], marker="o", label=f"{method} ({len(over['seeds'])} seeds)")
        if len(over["seeds"]) > 1:
            ax.fill_between(xs, [y.low for y in ys], [y.high for y in ys], color=line.get_color(), alpha=0.2)
    ylabel, title = PLOTTED[measure]
    save(fig, ax, path, xlabel=xlabel, ylabel=ylabel, title=title)


def plot_frontier(rows: list[dict], path: Path) -> None:
    """Gold against √KL to the reference, one line per run from the reference (0, its gold) through the
    snapshots that measured their KL to the final evaluation, one colour per method: how much gold each
    method buys for how far its policy moves. A KL estimate below 0 is drawn at 0."""
    fig, ax = figure()
    colours: dict[str, str] = {}
    for row in rows:
        name = run_name(row)
        xs, ys = zip(*frontier(row))
        (line,) = ax.plot(xs, ys, marker="o", alpha=0.7, color=colours.get(name), label=None if name in colours else name)
        colours.setdefault(name, line.get_color())
    save(fig, ax, path, xlabel="√KL to the reference (nats^½)", ylabel="gold score (held-out)", title="Gold against how far each run moved")


def check_new_comparison(out: Path) -> None:
    """`out` is a folder this process can write a comparison in, and holds none yet."""
    check_output_dir(out, "--out")
    if (out / "comparison.json").exists():
        raise ConfigError(f"--out: {out} already holds a comparison; pick another folder")


def compare(recipe_file: Path, out: Path, cfg: CompareConfig, overrides: Sequence[str] = (), quick: bool = False) -> dict:
    """Runs every chosen method for every seed on `recipe_file`, evaluates them alike, and writes the tables and plots."""
    check_new_comparison(out)
    overrides = [*(QUICK if quick else []), *overrides]
    return Comparison(recipe_file, out, cfg, overrides).all()


# -- several comparisons as one ------------------------------------------------------------------------
PER_RUN_FIELDS = ("train.seed", "bilevel.method", "train.threads")
"""The recipe fields that may differ between runs merged into one comparison: those `compare` sets per
run, and the thread count, which follows the machine's cores."""

EVAL_PROTOCOL = ("prompts", "samples", "seed", "confidence")
"""What makes two evaluations comparable: the same held-out prompts, pairs per prompt, random stream and interval."""


def merge(sources: Sequence[Path], out: Path, methods: Sequence[str] = METHODS) -> dict:
    """The runs of `methods` in several finished comparisons, say seeds added on another day, as one
    comparison over all their seeds: the tables and plots `compare` writes, in `out`. Only runs of one
    problem merge: the same recipe but for `PER_RUN_FIELDS`, the same evaluation protocol, and per method
    the same budget and snapshots. Each run stays where it is; the merged rows name its folder."""
    check_new_comparison(out)
    if not sources:
        raise ConfigError("--from: give the --out folder of at least one finished `rlhf-bilevel compare`")
    check_methods(methods)
    rows, source_of = [], {}
    for source in sources:
        file = source / "comparison.json"
        if not file.is_file():
            raise ConfigError(f"--from: {source} holds no comparison.json; give the --out folder of a finished `rlhf-bilevel compare`")
        for row in revive(json.loads(file.read_text(encoding="utf-8")))["runs"]:
            if row["method"] not in methods:
                continue
            run = run_name(row), row["seed"]
            if run in source_of:
                raise ConfigError(f"--from: {run[0]} seed {run[1]} is in both {source_of[run]} and {source}; give each run once")
            source_of[run] = source
            rows.append(row | {"folder": str(run_folder(source, row).resolve())})
    if not rows:
        raise ConfigError(f"--method: the --from folders hold no run of {', '.join(methods)}")
    check_comparable(rows)
    order = {name: i for i, name in enumerate(METHODS)}
    settings = list(dict.fromkeys(row.get("setting") for row in rows))
    rows.sort(key=lambda row: (settings.index(row.get("setting")), row["seed"], order[row["method"]]))
    out.mkdir(parents=True, exist_ok=True)
    return write_comparison(rows, out, rows[0]["eval"]["confidence"], sources=[str(source.resolve()) for source in sources])


def revive(node: Any) -> Any:
    """A comparison.json tree with each estimate, a {mean, low, high, n} dict there, an `Estimate` again."""
    if isinstance(node, dict):
        if node.keys() == {"mean", "low", "high", "n"}:
            return Estimate(**node)
        return {key: revive(value) for key, value in node.items()}
    if isinstance(node, list):
        return [revive(value) for value in node]
    return node


def run_folder(source: Path, row: dict) -> Path:
    """Where a row's run is: the folder a merged row names, or the one `compare` made for it in `source`."""
    if "folder" in row:
        return Path(row["folder"])
    return (source / row["setting"] if "setting" in row else source) / f"{row['method']}-seed{row['seed']}"


def check_comparable(rows: list[dict]) -> None:
    """Raises a `ConfigError` naming the first difference that makes two runs' numbers incomparable."""
    from rlhf_bilevel.recipe import read_yaml

    first = rows[0]
    for row in rows:
        for key in EVAL_PROTOCOL:
            if row["eval"][key] != first["eval"][key]:
                raise ConfigError(
                    f"--from: evaluation {key} is {first['eval'][key]} in {first['folder']} but {row['eval'][key]} in {row['folder']}; "
                    "merge only comparisons run with the same --prompts and --pairs-per-prompt"
                )
    budgets = {}
    for row in rows:
        budget = row["oracle_pairs"], [point["oracle_pairs"] for point in row["curve"]]
        name = run_name(row)
        if budgets.setdefault(name, (budget, row["folder"]))[0] != budget:
            raise ConfigError(
                f"--from: {name} spends {budgets[name][0][0]} labels with snapshots at {budgets[name][0][1]} in {budgets[name][1]} "
                f"but {budget[0]} at {budget[1]} in {row['folder']}; merge only runs of one budget and --snapshots"
            )
    recipes = [(row["folder"], Path(row["folder"]) / "recipe.yaml") for row in rows]
    recipes = [(folder, dict(recipe_fields(read_yaml(path)))) for folder, path in recipes if path.is_file()]  # Online DPO's runs keep none
    for folder, fields in recipes[1:]:
        reference_folder, reference = recipes[0]
        for key in sorted(reference.keys() | fields.keys()):
            if key not in PER_RUN_FIELDS and reference.get(key) != fields.get(key):
                raise ConfigError(
                    f"--from: recipe field {key} is {reference.get(key)!r} in {reference_folder} but {fields.get(key)!r} in {folder}; "
                    "merge only runs of one recipe"
                )


def recipe_fields(tree: dict, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted field, value) of every field of a recipe read from YAML, as `--set` names it."""
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from recipe_fields(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value
