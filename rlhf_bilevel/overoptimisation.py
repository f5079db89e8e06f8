"""The over-optimisation curve of a run: gold and proxy reward against √KL, as in Gao, Schulman and
Hilton, "Scaling Laws for Reward Model Overoptimization" (ICML 2023).

Every saved checkpoint of the run is one point, measured on held-out prompts by `evaluate_checkpoint`
with the responses `eval` draws (common random numbers, so the points differ by the policy alone):

    gold          the oracle's mean gold score of π_λ's responses
    proxy         the mean return R_φ(τ) = Σ_h r_φ(s_h, a_h) under the checkpoint's own reward
                  model φ_t: the reward π_λ was being pushed up when the checkpoint was saved
    proxy_final   the same under the run's newest φ, one fixed function for every point
    kl            Σ_h log π_λ/π_ref along π_λ's responses, averaged (the reference is the point KL 0)

Gao et al. optimise against one frozen proxy, which is at once the reward each point was trained on
and a fixed yardstick. Online, φ moves with λ, and the two part: `proxy` is the one that shows a
policy exploiting its reward (over-optimisation is the gap between it and gold), `proxy_final` is the
one the best-of-n curve ranks by, so the two curves are read against the same function.

Best-of-n: for each n, n responses of π_ref per prompt, the one `proxy_final` ranks first kept. Its
expected gold and proxy are estimated without bias from N = 2·max(n) draws per prompt (`best_of_n`),
and its KL to π_ref is log n − (n − 1)/n (Stiennon et al. 2020): exact when no single response
carries probability mass, an upper bound otherwise.

Gao et al.'s two reward models are trained alike, so their scores share a scale; a run's gold (an
oracle's score) and proxy (a bounded head per token) do not. The plot therefore draws each
measure as its gain over the reference in units of its spread over the reference's responses: a
proxy that is any increasing affine map of gold draws the gold curve exactly, so where the two
curves part, the proxy ranks responses differently from gold. The JSON table keeps the raw means.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

from rlhf_bilevel import estimators as est
from rlhf_bilevel.config import ConfigError
from rlhf_bilevel.evaluate import Estimate, EvalConfig, bootstrap, pairs_each, per_prompt
from rlhf_bilevel.labelling import Labeller
from rlhf_bilevel.types import LAMBDA, Rollout

CURVE_FILE = "overoptimisation.json"
PLOT_FILE = "overoptimisation.png"
BEST_OF = (1, 2, 4, 8, 16)
MAX_BEST_OF = 512  # 1024 draws of π_ref per prompt: beyond it an evaluation on a CPU runs for hours
ROWS_PER_CALL = 256  # responses scored or drawn at once: the best-of-n draws of every prompt would not fit at once on a large model


@dataclass(frozen=True)
class CurveConfig:
    eval: EvalConfig = EvalConfig()  # prompts, seed, intervals, and 2·samples responses per prompt at each checkpoint
    best_of: tuple[int, ...] = BEST_OF  # the n of the best-of-n curve

    def __post_init__(self) -> None:
        if not self.best_of or any(not 1 <= n <= MAX_BEST_OF for n in self.best_of):
            raise ConfigError(f"--best-of: each n must be between 1 and {MAX_BEST_OF}, got {list(self.best_of)}")

    @property
    def best_of_draws(self) -> int:
        """N responses per prompt from which every best-of-n is estimated: twice the largest n, so that
        even that one averages over many subsets."""
        return 2 * max(self.best_of)


def best_of_n_kl(n: int) -> float:
    """KL(best-of-n ‖ π_ref) = log n − (n − 1)/n: its limit as the probability of every single response goes to 0,
    and an upper bound before it."""
    return math.log(n) - (n - 1) / n


def best_of_n(proxy: Tensor, gold: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """[P] expected proxy and gold, per prompt, of the response the proxy ranks first among n drawn,
    estimated without bias from N ≥ n draws [P, N]: over a uniformly random n-subset of the N, the
    draw of rank i (1-based, ascending in proxy) is the best with probability C(i−1, n−1)/C(N, n).
    Draws the proxy ties share their mean gold, as a random tie-break would give them."""
    draws = proxy.shape[-1]
    if not 1 <= n <= draws:
        raise ValueError(f"best-of-{n} needs at least {n} draws per prompt, got {draws}")
    proxy, order = proxy.double().sort(-1)
    gold = gold.double().gather(-1, order)
    for row in range(len(gold)):
        _, group, size = torch.unique_consecutive(proxy[row], return_inverse=True, return_counts=True)
        gold[row] = (torch.zeros(len(size), dtype=gold.dtype).index_add_(0, group, gold[row]) / size)[group]
    weight = torch.tensor([math.comb(i, n - 1) for i in range(draws)], dtype=torch.double) / math.comb(draws, n)
    return proxy @ weight, gold @ weight


def proxy_returns(reward, rollout: Rollout) -> Tensor:
    """[N] R_φ(τ) = Σ_h r_φ(s_h, a_h) of each response on the CPU, a slice of rows at a time."""
    slices = [rollout.rows(slice(i, i + ROWS_PER_CALL)) for i in range(0, len(rollout), ROWS_PER_CALL)]
    with torch.no_grad():
        return torch.cat([reward.token_rewards(part).sum(-1).double().cpu() for part in slices])


def estimate(values: Tensor, prompts: int, cfg: EvalConfig, seed_offset: int = 0) -> Estimate:
    """Mean of `values` (consecutive rows per prompt) with its bootstrap interval over prompts."""
    return bootstrap(per_prompt(values, prompts), cfg.resamples, cfg.confidence, np.random.default_rng(cfg.seed + seed_offset))


def evaluate_checkpoint(policy, adapter: str | None, labeller: Labeller, prompts: Sequence[Any], cfg: EvalConfig, reward) -> tuple[dict, Rollout]:
    """One point of the curve: gold, proxy under `reward` and KL of `adapter` (None: π_ref) on `prompts`,
    with the rollout they were measured on (to be scored by another reward model later)."""
    rollout = pairs_each(policy, adapter, prompts, cfg.seed, cfg.samples)
    gold = labeller.score(rollout.prompts, rollout.responses).double()
    proxy = proxy_returns(reward, rollout)
    kl = est.kl_to_reference(rollout).item()
    point = {
        "kl": kl,
        "sqrt_kl": math.sqrt(max(kl, 0.0)),  # a sampled KL of π_ref itself may come out a rounding error below 0
        "gold": estimate(gold, len(prompts), cfg),
        "gold_std": spread(gold)["std"],
        "proxy": estimate(proxy, len(prompts), cfg),
        "proxy_std": spread(proxy)["std"],
    }
    return point, rollout


def spread(values: Tensor) -> dict[str, float]:
    return {"mean": values.mean().item(), "std": values.std().item() if len(values) > 1 else 0.0}


def best_of_n_curve(policy, labeller: Labeller, prompts: Sequence[Any], cfg: CurveConfig, reward) -> dict:
    """The best-of-n rows under `reward`, from `cfg.best_of_draws` responses of π_ref per prompt, drawn from a
    stream of their own (seed + 1): the n = 1 row is an estimate of the reference independent of the curve's."""
    draws, generator = cfg.best_of_draws, torch.Generator().manual_seed(cfg.eval.seed + 1)
    per_call = max(1, ROWS_PER_CALL // draws)
    proxy, gold = [], []
    with torch.no_grad(), policy.adapter(None):
        for i in range(0, len(prompts), per_call):
            rollout = policy.sample([p for p in prompts[i : i + per_call] for _ in range(draws)], generator)
            proxy.append(proxy_returns(reward, rollout))
            gold.append(labeller.score(rollout.prompts, rollout.responses).double())
    proxy, gold = torch.cat(proxy).reshape(len(prompts), draws), torch.cat(gold).reshape(len(prompts), draws)
    rows = []
    for n in sorted(set(cfg.best_of)):
        best_proxy, best_gold = best_of_n(proxy, gold, n)
        kl = best_of_n_kl(n)
        rows.append({"n": n, "kl": kl, "sqrt_kl": math.sqrt(kl), "gold": estimate(best_gold, len(prompts), cfg.eval, 1),
                     "proxy": estimate(best_proxy, len(prompts), cfg.eval, 1)})
    return {"draws_per_prompt": draws, "reference": {"gold": spread(gold.flatten()), "proxy": spread(proxy.flatten())}, "rows": rows}


def curve(
    policy, reward, labeller: Labeller, prompts: Sequence[Any], states: Iterable[tuple[int, dict]], cfg: CurveConfig
) -> dict:
    """The curve's points, one per (step, checkpoint state) of `states`, oldest first: an iterator that puts each
    checkpoint's adapters into `policy` as it yields its state, whose reward head goes into `reward` here; the
    reference, and best-of-n under the last state's φ. `reward` must hold that last φ on entry: it scores the
    reference before the states are walked."""
    reference, reference_rollout = evaluate_checkpoint(policy, None, labeller, prompts, cfg.eval, reward)
    reference["proxy_final"], reference["proxy_final_std"] = reference.pop("proxy"), reference.pop("proxy_std")
    points, rollouts = [], []
    for step, state in states:
        reward.load_state_dict(state["reward"])
        point, rollout = evaluate_checkpoint(policy, LAMBDA, labeller, prompts, cfg.eval, reward)
        points.append({"step": step, "oracle_pairs": state["bilevel"]["labelling"]["counts"]["training"], **point,
                       "reference_proxy": spread(proxy_returns(reward, reference_rollout))})
        rollouts.append(rollout)
    # the last state is loaded: `reward` is the final φ again
    for point, rollout in zip(points, rollouts):
        point["proxy_final"] = estimate(proxy_returns(reward, rollout), len(prompts), cfg.eval)
    return {
        "prompts": len(prompts), "responses_per_prompt": 2 * cfg.eval.samples, "seed": cfg.eval.seed, "confidence": cfg.eval.confidence,
        "reference": reference,
        "checkpoints": points,
        "best_of_n": best_of_n_curve(policy, labeller, prompts, cfg, reward),
    }


def gain(mean: float, reference_mean: float, reference_std: float) -> float:
    """(mean − reference mean) / reference std; NaN (not drawn) where the reference's responses all score alike."""
    return (mean - reference_mean) / reference_std if reference_std > 0 else math.nan


def plot(result: dict, path: Path, title: str) -> None:
    """Gold and proxy gains over the reference against √KL: the run's checkpoints and best-of-n."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref, points, bon = result["reference"], result["checkpoints"], result["best_of_n"]
    x = [0.0] + [p["sqrt_kl"] for p in points]  # the reference is every curve's origin
    runs = {
        "run: gold": [gain(p["gold"].mean, ref["gold"].mean, ref["gold_std"]) for p in points],
        "run: proxy (its own φ)": [gain(p["proxy"].mean, p["reference_proxy"]["mean"], p["reference_proxy"]["std"]) for p in points],
        "run: proxy (final φ)": [gain(p["proxy_final"].mean, ref["proxy_final"].mean, ref["proxy_final_std"]) for p in points],
    }
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (label, y), style in zip(runs.items(), ("-", "--", ":")):
        ax.plot(x, [0.0, *y], style, marker="o", color="C0" if label.endswith("gold") else "C1", label=label)
    for p, y in zip(points, runs["run: gold"]):
        ax.annotate(f"step {p['step']}", (p["sqrt_kl"], y), textcoords="offset points", xytext=(4, -10), fontsize=7)
    b, bx = bon["reference"], [r["sqrt_kl"] for r in bon["rows"]]
    gold, proxy = ([gain(r[k].mean, b[k]["mean"], b[k]["std"]) for r in bon["rows"]] for k in ("gold", "proxy"))
    ax.plot(bx, gold, "-", marker="s", color="C2", label="best-of-n: gold")
    ax.plot(bx, proxy, "--", marker="s", color="C3", label="best-of-n: proxy (final φ)")
    for r, y in zip(bon["rows"], gold):
        ax.annotate(f"n={r['n']}", (r["sqrt_kl"], y), textcoords="offset points", xytext=(4, 4), fontsize=7, color="C2")
    ax.axhline(0.0, color="grey", linewidth=0.5)
    ax.set(title=f"Over-optimisation: {title}", xlabel="√KL(π ‖ π_ref)  (nats^½)", ylabel="gain over π_ref (σ of π_ref's responses)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
