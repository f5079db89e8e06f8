"""`rlhf-bilevel theory`: runs the convergence lab (exact/lab.py) in float64 on one thread, and
writes theory.json and theory.png."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch

from rlhf_bilevel.environment import default_dtype, threads
from rlhf_bilevel.exact.lab import ConvergenceStudy, Lab, TheoryConfig

__all__ = ["TheoryConfig", "plot", "run_lab"]


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(20, 4.2))
    ax = axes[0]
    for name, run in result["runs"].items():
        t = range(1, len(run["gap_sq"]) + 1)
        ax.loglog(t, [max(g, 1e-30) for g in run["gap_sq"]], label=f"{name} (slope {run['slope']:.2f})")
    ax.set(xlabel="outer iteration t", ylabel="(Φ* − Φ_t)²", title="Convergence of Algorithm 1")
    ax.legend(fontsize=8)
    sweep = result["sigma"]
    ax = axes[1]
    ax.loglog(sweep["sigma"], sweep["gap"], "o-", label=f"Algorithm 1, median of last window (slope {sweep['slope']:.2f})")
    ax.loglog(sweep["sigma"], [max(abs(b), 1e-30) for b in sweep["bias"]], "s--", label=f"argmin L_σ, exact (slope {sweep['bias_slope']:.2f})")
    ax.set(xlabel="σ", ylabel="|Φ_T − Φ*|", title="The σ floor")
    ax.legend(fontsize=8)
    sweep = result["B"]
    ax = axes[2]
    ax.loglog(sweep["B"], sweep["floor"], "o-", label=f"slope {sweep['slope']:.2f}")
    ax.set(xlabel="B (pairs per step)", ylabel="floor of (Φ* − Φ_t)²", title="Floor against B (sampled)")
    ax.legend(fontsize=8)
    bias = result["replay_bias"]
    ax = axes[3]
    t = range(1, len(bias["relative_error"]) + 1)
    ax.semilogy(t, bias["relative_error"], label="‖d_t(store) − d_t(fresh)‖ / ‖d_t(fresh)‖")
    ax.semilogy(t, [max(1 - c, 1e-16) for c in bias["cosine"]], label="1 − cosine")
    ax.set(xlabel="outer iteration t", title="exact_replay: the replayed d_t against fresh pairs'")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_lab(cfg: TheoryConfig, out: Path, log: Callable[[str], None] = print) -> dict:
    """Runs every experiment and writes theory.json and theory.png under `out`. The caller's default
    dtype and thread count are back when it returns."""
    # gaps reach 1e-10, where float32 would be the floor; tensors this small only pay for thread hand-offs
    with default_dtype(torch.float64), threads(1):
        result = ConvergenceStudy(Lab(cfg), log).all()
    out.mkdir(parents=True, exist_ok=True)
    (out / "theory.json").write_text(json.dumps(result, indent=1))
    plot(result, out / "theory.png")
    return result
