"""The convergence lab: Algorithm 1 on the exact testbed, measured against Φ* (Theorem 1).

Writes `theory.json` and `theory.png`: (Φ* − Φ_t)² against t for exact and sampled
gradients with fitted slopes, the floor against σ (Theorem 1's Õ(σ²) term), the floor
against B (its Õ(1/B) term), and the alternating and printed-pseudo-code runs beside them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from rlhf_bilevel.config import BilevelConfig, ConfigError, positive
from rlhf_bilevel.critic import CriticConfig
from rlhf_bilevel.exact import solve
from rlhf_bilevel.exact.testbed import Testbed, TestbedConfig
from rlhf_bilevel.steps import StepConfig


@dataclass(frozen=True)
class TheoryConfig:
    testbed: TestbedConfig = field(default_factory=lambda: TestbedConfig(reward_hidden=0))
    beta: float = 0.6
    gamma: float = 0.9
    sigma: float = 0.1
    outer_steps: int = 200  # T of the exact-gradient runs
    inner_steps: int = 10  # K
    sampled_outer_steps: int = 100
    pairs: int = 64  # B of the sampled run
    trajectories: int = 128  # n of the sampled runs
    sigmas: tuple[float, ...] = (0.8, 0.4, 0.2, 0.1)
    batch_sizes: tuple[int, ...] = (8, 32, 128)
    starts: int = 6  # random starts for Φ* = min Φ
    reward_lr: float = 2.0  # η_0 of η_t = η_0 / t
    policy_lr: float = 0.1  # Adam on λ, λ′ (plain ascent on softmax logits is badly conditioned)
    seed: int = 0

    def __post_init__(self) -> None:
        positive(self, "beta", "sigma", "outer_steps", "inner_steps", "sampled_outer_steps", "pairs", "trajectories", "starts")
        for s in self.sigmas:
            if s <= 0:
                raise ConfigError(f"sigmas: every σ must be > 0, got {s}")
        for b in self.batch_sizes:
            if b < 2:
                raise ConfigError(f"batch_sizes: every B must be ≥ 2, got {b}")

    @classmethod
    def quick(cls, **changes) -> TheoryConfig:
        """Under a minute on 2 cores: shorter runs, fewer sweep points."""
        base = dict(outer_steps=40, inner_steps=8, sampled_outer_steps=8, sigmas=(0.4, 0.2, 0.1), batch_sizes=(8, 32), starts=3)
        return cls(**{**base, **changes})

    def algorithm(self, **changes) -> BilevelConfig:
        base = BilevelConfig(
            sigma=self.sigma,
            outer_steps=self.outer_steps,
            inner_steps=self.inner_steps,
            pairs_per_step=self.pairs,
            trajectories_per_step=self.trajectories,
            gamma=self.gamma,
            beta=self.beta,
            upper_loss="bt_nll",  # with `disagreement` the infimum lies at ‖φ‖ → ∞
            labels="expected",
            policy_step=StepConfig(rule="adam", lr=self.policy_lr, schedule="constant"),
            reward_step=StepConfig(rule="normalized", lr=self.reward_lr, schedule="inverse"),
            # replay only the latest step's transitions: older ones came from older policies
            critic=CriticConfig(hidden=0, lr=0.05, blocks=2, target_every=50, batch_size=128, replay_capacity=400),
        )
        return dataclasses.replace(base, **changes)


def fit_slope(x: list[float], y: list[float]) -> float:
    """Least-squares slope of log y against log x."""
    lx = [math.log(v) for v in x]
    ly = [math.log(max(v, 1e-300)) for v in y]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def floor(series: list[float], window: float = 0.2) -> float:
    """The max over the last window: normalised 1/t steps make single values swing."""
    return max(series[-max(1, int(len(series) * window)) :])


class Lab:
    def __init__(self, cfg: TheoryConfig, log: Callable[[str], None] = print):
        self.cfg = cfg
        self.log = log
        self.testbed = Testbed(cfg.testbed, beta=cfg.beta, gamma=cfg.gamma, loss="bt_nll")
        self.problem = self.testbed.problem

    def phi(self, reward) -> float:
        with torch.no_grad():
            return solve.phi(self.problem, reward).item()

    def phi_star(self) -> dict:
        """Φ* = min_φ Φ(φ) by exact L-BFGS from several random starts; reports how many agree."""
        values = []
        for start in range(self.cfg.starts):
            reward = self.testbed.reward(seed=1000 + start)
            optimizer = torch.optim.LBFGS(
                reward.parameters(), lr=1, max_iter=1000, tolerance_grad=1e-12, tolerance_change=1e-15, line_search_fn="strong_wolfe"
            )

            def closure() -> torch.Tensor:
                optimizer.zero_grad()
                value = solve.phi(self.problem, reward)
                value.backward()
                return value

            optimizer.step(closure)
            values.append(self.phi(reward))
        best = min(values)
        return {"phi_star": best, "starts": values, "reached": sum(v - best < 1e-6 for v in values)}

    def run(self, phi_star: float, exact: bool, outer_steps: int, **changes) -> dict:
        """One run of Algorithm 1 from a fixed reward initialisation; (Φ_t − Φ*)² after every t."""
        algo_cfg = self.cfg.algorithm(**changes)
        reward = self.testbed.reward(seed=self.cfg.seed)
        algorithm = self.testbed.algorithm(algo_cfg, reward, exact=exact, seed=self.cfg.seed)
        start = time.perf_counter()
        gap_sq = []
        for _ in range(outer_steps):
            algorithm.outer_step()
            gap_sq.append((self.phi(reward) - phi_star) ** 2)
        half = outer_steps // 2
        t = list(range(half + 1, outer_steps + 1))
        return {
            "exact": exact,
            "method": algo_cfg.method,
            "pseudocode": algo_cfg.pseudocode,
            "sigma": algo_cfg.sigma,
            "B": algo_cfg.pairs_per_step,
            "gap_sq": gap_sq,
            "floor": floor(gap_sq),
            "slope": fit_slope(t, gap_sq[half:]),
            "oracle_pairs": algorithm.oracle_pairs,
            "seconds": time.perf_counter() - start,
        }

    def all(self) -> dict:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        star = self.phi_star()
        self.log(f"Φ* = {star['phi_star']:.6f} ({star['reached']}/{cfg.starts} starts reached it)")
        runs = {}
        runs["exact"] = self.run(star["phi_star"], True, cfg.outer_steps)
        self.log(f"exact gradients: slope {runs['exact']['slope']:.2f}, floor {runs['exact']['floor']:.2e}")
        runs["sampled"] = self.run(star["phi_star"], False, cfg.sampled_outer_steps, labels="sample")
        self.log(f"sampled gradients: slope {runs['sampled']['slope']:.2f}, floor {runs['sampled']['floor']:.2e}")
        runs["alternating"] = self.run(star["phi_star"], True, cfg.outer_steps, method="alternating")
        runs["printed"] = self.run(star["phi_star"], True, cfg.outer_steps, pseudocode="printed")
        self.log(f"alternating floor {runs['alternating']['floor']:.2e}, printed pseudo-code floor {runs['printed']['floor']:.2e}")
        sigma_runs = [self.run(star["phi_star"], True, cfg.outer_steps, sigma=s) for s in cfg.sigmas]
        sigma_sweep = {
            "sigma": list(cfg.sigmas),
            "floor": [r["floor"] for r in sigma_runs],
            "slope": fit_slope(list(cfg.sigmas), [r["floor"] for r in sigma_runs]),
        }
        self.log(f"σ sweep: floor ∝ σ^{sigma_sweep['slope']:.2f}")
        batch_runs = [
            self.run(star["phi_star"], False, cfg.sampled_outer_steps, labels="sample", pairs_per_step=b)
            for b in cfg.batch_sizes
        ]
        batch_sweep = {
            "B": list(cfg.batch_sizes),
            "floor": [r["floor"] for r in batch_runs],
            "oracle_pairs": [r["oracle_pairs"] for r in batch_runs],
            "slope": fit_slope(list(cfg.batch_sizes), [r["floor"] for r in batch_runs]),
        }
        self.log(f"B sweep: floor ∝ B^{batch_sweep['slope']:.2f}")
        return {
            "config": dataclasses.asdict(cfg),
            "phi_star": star["phi_star"],
            "phi_star_starts": star,
            "runs": runs,
            "gap_sq": {name: run["gap_sq"] for name, run in runs.items()},
            "slope": {name: run["slope"] for name, run in runs.items()},
            "sigma": sigma_sweep,
            "B": batch_sweep,
            "oracle_pairs": {name: run["oracle_pairs"] for name, run in runs.items()},
        }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    for name, run in result["runs"].items():
        t = range(1, len(run["gap_sq"]) + 1)
        ax.loglog(t, [max(g, 1e-30) for g in run["gap_sq"]], label=f"{name} (slope {run['slope']:.2f})")
    ax.set(xlabel="outer iteration t", ylabel="(Φ* − Φ_t)²", title="Convergence of Algorithm 1")
    ax.legend(fontsize=8)
    for ax, key, label in ((axes[1], "sigma", "σ"), (axes[2], "B", "B (pairs per step)")):
        sweep = result[key]
        ax.loglog(sweep[key], sweep["floor"], "o-", label=f"slope {sweep['slope']:.2f}")
        ax.set(xlabel=label, ylabel="floor of (Φ* − Φ_t)²", title=f"Floor against {label}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_lab(cfg: TheoryConfig, out: Path, log: Callable[[str], None] = print) -> dict:
    """Runs every experiment and writes theory.json and theory.png under `out`."""
    torch.set_default_dtype(torch.float64)  # gaps reach 1e-10; float32 would be the floor
    torch.set_num_threads(1)  # tensors this small only pay for thread hand-offs
    result = Lab(cfg, log).all()
    out.mkdir(parents=True, exist_ok=True)
    (out / "theory.json").write_text(json.dumps(result, indent=1))
    plot(result, out / "theory.png")
    return result
