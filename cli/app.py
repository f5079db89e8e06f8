"""The `rlhf-bilevel` command: parses options, then calls what the command runs (rlhf_bilevel.commands). No logic lives here."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from rlhf_bilevel.commands import huge_pages, quiet

huge_pages()  # before anything imports torch, which reads it once

from rlhf_bilevel.config import ConfigError  # noqa: E402

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False)


@app.callback()
def root() -> None:
    """Online alignment of language models by the first-order penalty bilevel method."""


def fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=2)


@app.command()
def theory(
    out: Path = typer.Option(Path("theory-out"), "--out", help="Folder for theory.json and theory.png."),
    quick: bool = typer.Option(False, "--quick", help="Shorter runs: under a minute on 2 cores."),
    seed: int = typer.Option(0, "--seed", help="Seed of the problem and of the runs."),
    vocab: int = typer.Option(4, "--vocab", help="Tokens, EOS included (2–8)."),
    horizon: int = typer.Option(3, "--horizon", help="Maximum new tokens H."),
    prompts: int = typer.Option(3, "--prompts", help="Number of prompts."),
    sigma: Optional[float] = typer.Option(None, "--sigma", help="Penalty σ of the main runs."),
    beta: Optional[float] = typer.Option(None, "--beta", help="KL weight β of the lower level."),
    reward_hidden: int = typer.Option(0, "--reward-hidden", help="Width of the reward model's hidden layer; 0: a logistic unit."),
    fixed_points: int = typer.Option(
        0, "--fixed-points", help="Only where bilevel and alternating come to rest, and their policies' gold, on this many problems (seeds --seed, --seed+1, …)."
    ),
) -> None:
    """The convergence lab: Algorithm 1 on an exact token MDP, against Φ* (Theorem 1)."""
    from rlhf_bilevel.commands.theory import TheoryConfig, run_fixed_points, run_lab
    from rlhf_bilevel.exact.testbed import TestbedConfig

    try:
        testbed = TestbedConfig(prompts=prompts, vocab=vocab, horizon=horizon, reward_hidden=reward_hidden, seed=seed)
        changes = {"testbed": testbed, "seed": seed}
        changes.update({k: v for k, v in {"sigma": sigma, "beta": beta}.items() if v is not None})
        cfg = TheoryConfig.quick(**changes) if quick else TheoryConfig(**changes)
        if fixed_points < 0:
            raise ConfigError(f"--fixed-points: a number of problems ≥ 1 (0: the whole lab), got {fixed_points}")
        if fixed_points:
            result = run_fixed_points(cfg, fixed_points, out, log=typer.echo)
            gap = result["bilevel_minus_alternating"]
            if gap is None:
                typer.echo(f"the alternating refits settled on none of the {fixed_points} problems; wrote {out / 'fixed_points.json'}")
                return
            typer.echo(
                f"gold of argmin Φ − alternating's resting point: {gap['gold']['mean']:+.4f} "
                f"[{gap['gold']['low']:+.4f}, {gap['gold']['high']:+.4f}] over {gap['problems']} problems, "
                f"bilevel higher on {gap['bilevel_higher']}; in shortfall from the best gold at each one's KL "
                f"{gap['shortfall']['mean']:+.4f} [{gap['shortfall']['low']:+.4f}, {gap['shortfall']['high']:+.4f}]; "
                f"wrote {out / 'fixed_points.json'}"
            )
            return
        result = run_lab(cfg, out, log=typer.echo)
    except ConfigError as error:
        fail(str(error))
    typer.echo(f"wrote {out / 'theory.json'} and {out / 'theory.png'} (Φ* = {result['phi_star']:.6f})")


@app.command()
def train(
    recipe: Optional[Path] = typer.Option(None, "--recipe", help="A recipe YAML, e.g. recipes/smollm2-sentiment.yaml."),
    overrides: list[str] = typer.Option([], "--set", help="Override a recipe field: --set bilevel.sigma=0.05 (repeatable)."),
    model: Optional[str] = typer.Option(None, "--model", help="Shorthand for --set model.name=…: smollm2, tiny, a .gguf, a folder or a hub id."),
    output_dir: Optional[Path] = typer.Option(None, "--output-dir", help="Run folder (default: runs/<recipe name>)."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue the run in this folder from its newest checkpoint."),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Check the recipe, the output folder, the model's context, the memory estimate and the prompts; load no model, write nothing."
    ),
) -> None:
    """Align a causal LM online with Algorithm 1 (or the alternating baseline) as a recipe says."""
    from rlhf_bilevel.checkpoint import CheckpointError
    from rlhf_bilevel.commands.train import check
    from rlhf_bilevel.commands.train import resume as resume_run
    from rlhf_bilevel.commands.train import train as train_run
    from rlhf_bilevel.nonfinite import NonFiniteError
    from rlhf_bilevel.oracles.base import OracleError
    from rlhf_bilevel.recipe import load_recipe

    quiet()
    if model is not None:
        overrides = [*overrides, f"model.name={model}"]
    try:
        if resume is not None:
            if recipe is not None or output_dir is not None:
                fail("--resume: the run folder holds its recipe; drop --recipe/--output-dir (use --set to change a field)")
            if dry_run:
                fail("--dry-run: checks a fresh run; drop --resume")
            summary = resume_run(resume, overrides, log=lambda message: typer.echo(message, err=True))
        elif recipe is None:
            fail("--recipe: required, e.g. --recipe recipes/smollm2-sentiment.yaml (or --resume RUN_DIR)")
        else:
            run_dir = output_dir or Path("runs") / recipe.stem
            parsed = load_recipe(recipe, overrides)
            if dry_run:
                estimate = check(parsed, run_dir, recipe.resolve().parent)
                typer.echo(f"{recipe}: ready to run in {run_dir}; " + (estimate.describe() if estimate else "the model's size is unknown until it loads"))
                return
            summary = train_run(parsed, run_dir, recipe.resolve().parent)
    except (ConfigError, CheckpointError, NonFiniteError) as error:
        fail(str(error))
    except OracleError as error:
        fail(f"oracle: {error} (pairs labelled before it are kept in the run folder's preferences.jsonl)")
    if summary is not None:  # None on the processes of a multi-process launch other than the main one
        typer.echo(summary.describe())


@app.command(name="eval")
def evaluate(
    run: Optional[Path] = typer.Option(None, "--run", help="A run folder of `rlhf-bilevel train`: its newest checkpoint is evaluated."),
    adapter: Optional[Path] = typer.Option(None, "--adapter", help="A peft adapter folder (from any trainer) to evaluate instead of a run."),
    recipe: Optional[Path] = typer.Option(None, "--recipe", help="With --adapter: the recipe naming the model, oracle and held-out prompts."),
    model: Optional[str] = typer.Option(None, "--model", help="With --adapter: shorthand for --set model.name=…"),
    overrides: list[str] = typer.Option([], "--set", help="Change a recipe field for this evaluation: --set oracle.kind=llm-judge."),
    prompts: Optional[int] = typer.Option(None, "--prompts", help="Evaluate the first N held-out prompts (default: all)."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed, shared by the policy and the reference."),
    resamples: int = typer.Option(2000, "--resamples", help="Bootstrap resamples per confidence interval."),
    pairs_per_prompt: int = typer.Option(1, "--pairs-per-prompt", help="Response pairs per held-out prompt: more narrow the agreement interval."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for eval.json, report.md, training.png (default: RUN/eval or ADAPTER/eval)."),
    all_checkpoints: bool = typer.Option(False, "--all-checkpoints", help="With --run: gold, proxy and KL of every checkpoint, and best-of-n, against √KL (overoptimisation.json/.png)."),
    best_of: list[int] = typer.Option([], "--best-of", help="With --all-checkpoints: an n of the best-of-n curve (repeatable; default 1 2 4 8 16)."),
) -> None:
    """Win rate against the reference, gold score, KL, length, and reward-model agreement on- vs off-policy."""
    from rlhf_bilevel.checkpoint import CheckpointError
    from rlhf_bilevel.commands.eval import EvalConfig, describe, eval_adapter, eval_run
    from rlhf_bilevel.oracles.base import OracleError

    quiet()
    try:
        cfg = EvalConfig(prompts=prompts, seed=seed, resamples=resamples, samples=pairs_per_prompt)
        if (run is None) == (adapter is None):
            fail("--run or --adapter: give exactly one (a train run folder, or a peft adapter folder with --recipe)")
        if best_of and not all_checkpoints:
            fail("--best-of: only with --all-checkpoints (it sets the n of the best-of-n curve)")
        if run is not None:
            if model is not None or recipe is not None:
                fail("--run: the run folder holds its recipe and model; drop --recipe/--model (use --set to change a field)")
            if all_checkpoints:
                from rlhf_bilevel.commands.eval import BEST_OF, CurveConfig, curve_run, describe_curve

                curve = curve_run(run, CurveConfig(cfg, tuple(best_of) or BEST_OF), out, overrides)
                typer.echo(describe_curve(curve))
                return
            result = eval_run(run, cfg, out, overrides)
        else:
            if all_checkpoints:
                fail("--all-checkpoints: needs --run (an adapter alone has no checkpoints or reward model)")
            if recipe is None:
                fail("--recipe: required with --adapter (it names the model, the oracle and the held-out prompts)")
            if model is not None:
                overrides = [*overrides, f"model.name={model}"]
            result = eval_adapter(adapter, recipe, cfg, out, overrides)
    except (ConfigError, CheckpointError) as error:
        fail(str(error))
    except OracleError as error:
        fail(f"oracle: {error}")
    typer.echo(describe(result))


@app.command()
def compare(
    recipe: Path = typer.Option(Path("recipes/smollm2-sentiment.yaml"), "--recipe", help="The problem all methods share."),
    out: Path = typer.Option(Path("runs/compare"), "--out", help="Folder for the runs, comparison.json/.md/.png, comparison-time.png, comparison-agreement.png and comparison-kl.png."),
    seeds: list[int] = typer.Option([0], "--seed", help="A seed of the seed set (repeatable): each method runs once per seed."),
    methods: list[str] = typer.Option([], "--method", help="A method to run (repeatable): bilevel, alternating, online-dpo (default: all)."),
    jobs: int = typer.Option(1, "--jobs", help="Runs side by side in worker processes, each on its share of the cores."),
    quick: bool = typer.Option(False, "--quick", help="The tiny model built in code and 4 outer steps: minutes on a CPU."),
    overrides: list[str] = typer.Option([], "--set", help="Override a recipe field for every method (repeatable)."),
    prompts: Optional[int] = typer.Option(None, "--prompts", help="Evaluate on the first N held-out prompts (default: all)."),
    pairs_per_prompt: int = typer.Option(1, "--pairs-per-prompt", help="Response pairs per held-out prompt in the final evaluation."),
    snapshots: int = typer.Option(4, "--snapshots", help="Points along each run on the gold-score curve."),
    dpo_beta: float = typer.Option(0.1, "--dpo-beta", help="β of TRL's Online DPO."),
    sweep: Optional[str] = typer.Option(
        None, "--sweep", help="Repeat the comparison for each value of one recipe field, each a separate set of runs: --sweep oracle.flip=0,0.25."
    ),
) -> None:
    """Bilevel vs alternating vs TRL Online DPO at one oracle budget, over seeds: tables and plots."""
    from rlhf_bilevel.commands.compare import METHODS, CompareConfig, Sweep
    from rlhf_bilevel.commands.compare import compare as run_comparison
    from rlhf_bilevel.commands.eval import EvalConfig
    from rlhf_bilevel.oracles.base import OracleError

    quiet()
    try:
        cfg = CompareConfig(
            seeds=tuple(seeds), methods=tuple(methods) or METHODS, jobs=jobs, snapshots=snapshots, dpo_beta=dpo_beta,
            eval=EvalConfig(prompts=prompts, samples=pairs_per_prompt), sweep=Sweep.parse(sweep) if sweep else None,
        )
        run_comparison(recipe, out, cfg, list(overrides), quick=quick)
    except ConfigError as error:
        fail(str(error))
    except OracleError as error:
        fail(f"oracle: {error}")
    typer.echo((out / "comparison.md").read_text(encoding="utf-8"))
    typer.echo(f"wrote {out / 'comparison.json'}, {out / 'comparison.md'} and the runs in {out}")


@app.command()
def merge(
    sources: list[Path] = typer.Option(..., "--from", help="The --out folder of a finished comparison (repeatable)."),
    out: Path = typer.Option(..., "--out", help="Folder for the merged comparison.json/.md/.png, comparison-time.png, comparison-agreement.png and comparison-kl.png."),
    methods: list[str] = typer.Option([], "--method", help="A method to keep (repeatable): bilevel, alternating, online-dpo (default: all)."),
) -> None:
    """Several comparisons of one problem (seeds added later, say) as one: tables and plots over all their seeds."""
    from rlhf_bilevel.commands.compare import METHODS
    from rlhf_bilevel.commands.compare import merge as merge_comparisons

    quiet()
    try:
        comparison = merge_comparisons(sources, out, tuple(methods) or METHODS)
    except ConfigError as error:
        fail(str(error))
    typer.echo((out / "comparison.md").read_text(encoding="utf-8"))
    typer.echo(f"wrote {out / 'comparison.json'} and {out / 'comparison.md'}: {len(comparison['runs'])} runs from {len(sources)} comparison{'s' if len(sources) > 1 else ''}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
