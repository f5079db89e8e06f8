"""The `rlhf-bilevel` command: parses options, then calls the library. No logic lives here."""

from __future__ import annotations

import dataclasses
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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
