"""The `rlhf-bilevel` command: parses options, then calls the library. No logic lives here."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Optional

import typer

from rlhf_bilevel.config import ConfigError

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
) -> None:
    """The convergence lab: Algorithm 1 on an exact token MDP, against Φ* (Theorem 1)."""
    from rlhf_bilevel.exact.testbed import TestbedConfig
    from rlhf_bilevel.theory import TheoryConfig, run_lab

    try:
        testbed = TestbedConfig(prompts=prompts, vocab=vocab, horizon=horizon, reward_hidden=0, seed=seed)
        changes = {"testbed": testbed, "seed": seed}
        changes.update({k: v for k, v in {"sigma": sigma, "beta": beta}.items() if v is not None})
        cfg = TheoryConfig.quick(**changes) if quick else TheoryConfig(**changes)
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
) -> None:
    """Align a causal LM online with Algorithm 1 (or the alternating baseline) as a recipe says."""
    from rlhf_bilevel.checkpoint import CheckpointError
    from rlhf_bilevel.oracles.base import OracleError
    from rlhf_bilevel.recipe import load_recipe
    from rlhf_bilevel.train import resume as resume_run
    from rlhf_bilevel.train import train as train_run

    # deprecation notices of the libraries we call are for us, not for the user of the command
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    if model is not None:
        overrides = [*overrides, f"model.name={model}"]
    try:
        if resume is not None:
            if recipe is not None or output_dir is not None:
                fail("--resume: the run folder holds its recipe; drop --recipe/--output-dir (use --set to change a field)")
            summary = resume_run(resume, overrides)
        elif recipe is None:
            fail("--recipe: required, e.g. --recipe recipes/smollm2-sentiment.yaml (or --resume RUN_DIR)")
        else:
            run_dir = output_dir or Path("runs") / recipe.stem
            summary = train_run(load_recipe(recipe, overrides), run_dir, recipe.resolve().parent)
    except (ConfigError, CheckpointError) as error:
        fail(str(error))
    except OracleError as error:
        fail(f"oracle: {error} (every pair labelled before it is in preferences.jsonl)")
    typer.echo(summary.describe())


def main() -> None:
    app()


if __name__ == "__main__":
    main()
