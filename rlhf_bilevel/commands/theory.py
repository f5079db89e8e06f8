"""`rlhf-bilevel theory`: runs the convergence lab (exact/lab.py) in float64 on one thread, and
writes theory.json and theory.png."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable

import torch

from rlhf_bilevel.environment import default_dtype, threads
from rlhf_bilevel.exact.fixed_points import Unsettled
from rlhf_bilevel.exact.lab import ConvergenceStudy, Lab, TheoryConfig

__all__ = ["TheoryConfig", "plot", "run_fixed_points", "run_lab"]


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


def run_fixed_points(cfg: TheoryConfig, problems: int, out: Path, log: Callable[[str], None] = print) -> dict:
    """Where bilevel and alternating come to rest (`exact/fixed_points.py`) on `problems` problems, the
    testbed seeds cfg.seed, cfg.seed + 1, …, and the gold of each one's policy: per problem and over
    problems, mean and Student-t 95% interval, with the paired difference bilevel − alternating. A problem
    where the alternating refits do not settle is listed under "unsettled" and left out of the figures.
    Writes fixed_points.json under `out`; no convergence runs."""
    from rlhf_bilevel.commands.compare import t_interval

    rows, unsettled = [], []
    with default_dtype(torch.float64), threads(1):
        for seed in range(cfg.seed, cfg.seed + problems):
            lab = Lab(dataclasses.replace(cfg, testbed=dataclasses.replace(cfg.testbed, seed=seed), seed=seed))
            star = lab.phi_star()
            try:
                rest = lab.fixed_points()
            except Unsettled as error:
                unsettled.append({"problem": seed, "reason": str(error)})
                log(f"problem {seed}: left out, {error}")
                continue
            rows.append({"problem": seed, "phi_star_reached": star["reached"], **rest})
            log(
                f"problem {seed}: gold π_ref {rest['reference']['gold']:.4f}, "
                + ", ".join(
                    f"{name} {rest[key]['gold']:.4f} (KL {rest[key]['kl']:.3f}, short of the best at its KL by {rest[key]['shortfall']:.4f})"
                    for name, key in (("argmin Φ", "bilevel"), ("alternating", "alternating"), ("gold-optimal", "gold_optimal"))
                )
            )
    summary, difference = None, None  # where the refits settled on no problem, there is nothing to compare
    if rows:
        summary = {
            name: {measure: dataclasses.asdict(t_interval([row[name][measure] for row in rows], 0.95)) for measure in ("gold", "kl", "shortfall")}
            for name in ("reference", "bilevel", "alternating", "gold_optimal")
        }
        gap = [row["bilevel"]["gold"] - row["alternating"]["gold"] for row in rows]
        shortfall = [row["bilevel"]["shortfall"] - row["alternating"]["shortfall"] for row in rows]
        difference = {
            "gold": dataclasses.asdict(t_interval(gap, 0.95)),
            "shortfall": dataclasses.asdict(t_interval(shortfall, 0.95)),
            "bilevel_higher": sum(g > 0 for g in gap),
            "problems": len(gap),
        }
    result = {
        "config": dataclasses.asdict(cfg),
        "problems": rows,
        "unsettled": unsettled,
        "summary": summary,
        "bilevel_minus_alternating": difference,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "fixed_points.json").write_text(json.dumps(result, indent=1))
    return result
