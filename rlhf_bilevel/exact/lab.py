"""The convergence lab: Algorithm 1 on the exact testbed, measured against Φ* (Theorem 1).

Its experiments (`ConvergenceStudy`; `rlhf-bilevel theory` writes them to `theory.json` and
`theory.png`): (Φ* − Φ_t)² against t for exact and sampled gradients with fitted slopes; against σ, the gap the algorithm reached next to the gap of
argmin L_σ itself (the bias it converges to, Theorem 1's σ term); against B, the floor of
sampled runs (its 1/B term); the alternating and printed-pseudo-code runs beside them; and
the practical φ update (docs/algorithm.md, "Deviations from Algorithm 1"): the preference store
replayed, one step or several, with the store's d_t measured against the theorem's exact one; and
where each method comes to rest, with its policy's gold (`exact/fixed_points.py`).

The upper objective carries ρ/2 ‖φ‖² (ρ = `reward_decay`), in the algorithm's φ step and in
every exact value alike: without it the bt_nll of the sigmoid reward keeps falling as
‖φ‖ → ∞ (rewards saturating at 0 or 1), L-BFGS "minimisers" from different starts lie
~26 apart at ‖φ‖ ≈ 75–96 with 9 of 16 Hessian eigenvalues below 1e-12, and 1/t steps,
which travel only η_0 ln T, never get there — the gap then measures the distance left,
the same for every σ.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from rlhf_bilevel import estimators as est
from rlhf_bilevel.bilevel import Bilevel
from rlhf_bilevel.config import BilevelConfig, ConfigError, positive
from rlhf_bilevel.critic import CriticConfig
from rlhf_bilevel.exact import fixed_points, solve
from rlhf_bilevel.exact.models import ExactReward
from rlhf_bilevel.exact.testbed import Testbed, TestbedConfig
from rlhf_bilevel.steps import StepConfig, norm
from rlhf_bilevel.store import RewardFitConfig
from rlhf_bilevel.types import LAMBDA, LAMBDA_PRIME


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
    # d_t's two ∇φĴ on coupled draws (BilevelConfig.common_random_numbers): at B = 64, n = 128 it cut
    # d_t's noise 10× (cosine to ∇L_σ 0.05 → 0.42) and the sampled gap at T = 20 from 0.093 to 0.049
    common_random_numbers: bool = True
    sigmas: tuple[float, ...] = (0.8, 0.4, 0.2, 0.1)
    batch_sizes: tuple[int, ...] = (8, 32, 128)
    starts: int = 6  # random starts for Φ* = min Φ
    reward_lr: float = 2.0  # η_0 of η_t = η_0 / t
    reward_decay: float = 1e-3  # ρ of the upper objective's ρ/2 ‖φ‖² (module docstring)
    policy_lr: float = 0.1  # Adam on λ, λ′ at lr_0/√(k+1): plain ascent on softmax logits is badly conditioned
    window: float = 0.2  # floors summarise the last 20% of a run
    # the practical φ update (`replay_fit`): T of its exact runs, which replay the whole store at every
    # step of φ, O(T²) in all (at T = 200, K = 10: 220k enumerated batches per pass)
    replay_outer_steps: int = 100
    # S of the multi-step runs: steps of φ per outer iteration (on this problem any S ≥ 2 stalls at a gap that
    # grows with S, docs/results.md; the runs show it beside the one-step replay, which converges)
    replay_steps: int = 3
    replay_prior: float = 10.0  # c of the sampled replay run's prior (c/N)‖φ − φ₀‖², as recipes/smollm2-sentiment.yaml
    seed: int = 0

    def __post_init__(self) -> None:
        positive(self, "beta", "sigma", "outer_steps", "inner_steps", "sampled_outer_steps", "pairs", "trajectories", "starts")
        positive(self, "replay_outer_steps", "replay_steps")
        if self.replay_outer_steps > self.outer_steps:  # its figures are set beside the `exact` run's first T
            raise ConfigError(f"replay_outer_steps: at most outer_steps ({self.outer_steps}), got {self.replay_outer_steps}")
        if self.replay_prior < 0:
            raise ConfigError(f"replay_prior: must be ≥ 0, got {self.replay_prior}")
        positive(self, "reward_lr", "policy_lr", "window")
        if self.reward_decay < 0:
            raise ConfigError(f"reward_decay: must be ≥ 0, got {self.reward_decay}")
        if len(self.sigmas) < 2 or min(self.sigmas) <= 0:
            raise ConfigError(f"sigmas: at least two, every σ > 0; got {self.sigmas}")
        if len(self.batch_sizes) < 2 or min(self.batch_sizes) < 2:
            raise ConfigError(f"batch_sizes: at least two, every B ≥ 2; got {self.batch_sizes}")

    @classmethod
    def quick(cls, **changes) -> TheoryConfig:
        """About 100 s on 2 cores (100 s measured with the replay runs, on a loaded machine): shorter runs, fewer sweep points."""
        base = dict(
            outer_steps=40, inner_steps=8, sampled_outer_steps=8, replay_outer_steps=40, sigmas=(0.8, 0.4), batch_sizes=(8, 32), starts=2
        )
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
            common_random_numbers=self.common_random_numbers,
            policy_step=StepConfig(rule="adam", lr=self.policy_lr, schedule="inverse_sqrt"),
            reward_step=StepConfig(rule="normalized", lr=self.reward_lr, schedule="inverse", weight_decay=self.reward_decay),
            # Theorem 1's update: one step on the B fresh pairs, the penalty on the final draws
            reward_fit=RewardFitConfig(replay=False, steps=1, penalty_from="final"),
            # replay only the latest step's transitions: older ones came from older policies
            critic=CriticConfig(hidden=0, lr=0.05, blocks=2, target_every=50, batch_size=128, replay_capacity=400),
        )
        return dataclasses.replace(base, **changes)

    def replay_fit(self, steps: int, exact: bool) -> RewardFitConfig:
        """The practical φ update on the lab: every label of the run replayed, `steps` steps of φ.

        The step rule stays the theorem's (normalised, η_0/t, decay ρ): the stepper counts φ's steps,
        so S steps of η_0/(count + 1) travel about η_0/t in an outer iteration, as its one step does,
        and a run differs from `exact` only in the data φ learns from and how often d_t is recomputed.
        Adam at the LM recipe's constant rate would add a floor of its own, its jitter; with S ≥ 2 it
        stalls where the normalised steps do (S = 3 and 5 measured, docs/results.md).
        """
        return RewardFitConfig(
            replay=True,
            steps=steps,
            # enumerated batches count every pair of the tree (thousands each) in N, so any c/N vanishes
            # at once; ρ already makes the minimiser a point. Sampled labels are real ones, as on the LM.
            prior=0.0 if exact else self.replay_prior,
            # an enumeration has no noise for `all` to average, only the older inner iterates' bias
            # to add; the sampled run pools every draw, as the LM recipe does
            penalty_from="final" if exact else "all",
        )


def fit_slope(x: list[float], y: list[float]) -> float:
    """Least-squares slope of log y against log x."""
    lx = [math.log(v) for v in x]
    ly = [math.log(max(v, 1e-300)) for v in y]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def last_window(series: list[float], window: float) -> list[float]:
    return series[-max(1, int(len(series) * window)) :]


def summarise(gap: list[float], window: float) -> dict:
    """The figures of one run's Φ_t − Φ* series."""
    gap_sq = [g**2 for g in gap]
    # the slope of the envelope max_{s ≥ t} (Φ* − Φ_s)², the quantity a bound holds for: the
    # raw series crosses zero under normalised steps, and a fit through it is noise
    envelope = [max(gap_sq[i:]) for i in range(len(gap))]
    return {
        "gap_sq": gap_sq,
        # normalised 1/t steps make single values swing: the max of the last window is the
        # floor of (Φ* − Φ_t)²; the median |Φ_t − Φ*| is where the run sits
        "floor": max(last_window(gap_sq, window)),
        "median_gap": statistics.median(abs(g) for g in last_window(gap, window)),
        "slope": fit_slope(list(range(1, len(gap) + 1)), envelope),
    }


class Lab:
    """The exact testbed, Φ and Φ* on it, and one run of Algorithm 1 measured against Φ*."""

    def __init__(self, cfg: TheoryConfig):
        self.cfg = cfg
        self.testbed = Testbed(cfg.testbed, beta=cfg.beta, gamma=cfg.gamma, loss="bt_nll")
        self.problem = self.testbed.problem

    def phi(self, reward: ExactReward) -> float:
        with torch.no_grad():
            return solve.phi(self.problem, reward, self.cfg.reward_decay).item()

    def phi_star(self) -> dict:
        """Φ* = min_φ Φ(φ) by exact L-BFGS from several random starts; reports how many agree,
        and keeps the best minimiser (the start of the L_σ minimisations)."""
        rewards = [self.testbed.reward(seed=1000 + start) for start in range(self.cfg.starts)]
        values = [solve.minimise(r, lambda r: solve.phi(self.problem, r, self.cfg.reward_decay)) for r in rewards]
        best = min(values)
        self.minimiser = rewards[values.index(best)]
        return {"phi_star": best, "starts": values, "reached": sum(v - best < 1e-6 for v in values)}

    def bias(self, phi_star: float, sigma: float) -> float:
        """Φ(argmin L_σ) − Φ*: where exact descent on the penalty objective stops, the point
        Algorithm 1 converges to when its inner loops are exact (from the minimiser of Φ)."""
        reward = self.testbed.reward(seed=0)
        reward.load_state_dict(self.minimiser.state_dict())
        solve.minimise(reward, solve.PenaltyValue(self.problem, sigma, self.cfg.reward_decay), max_iter=200)
        return self.phi(reward) - phi_star

    def fixed_points(self) -> dict:
        """Each method's resting point and its policy's gold (`exact/fixed_points.py`): argmin Φ as
        `phi_star` found it (call that first), and the alternating method's fixed point reached from the
        runs' initial reward model."""
        start = self.testbed.reward(seed=self.cfg.seed)
        return fixed_points.fixed_points(self.problem, self.minimiser, start, self.cfg.reward_decay)

    def run(
        self, phi_star: float, exact: bool, outer_steps: int, probe: Callable[[Bilevel], dict] | None = None, **changes
    ) -> dict:
        """One run of Algorithm 1 from a fixed reward initialisation; Φ_t − Φ* after every t, and
        `probe`'s measurements of the algorithm after every t (under "probe")."""
        algo_cfg = self.cfg.algorithm(**changes)
        reward = self.testbed.reward(seed=self.cfg.seed)
        algorithm = self.testbed.algorithm(algo_cfg, reward, exact=exact, seed=self.cfg.seed)
        start = time.perf_counter()
        gap, probed = [], []
        for _ in range(outer_steps):
            algorithm.outer_step()
            gap.append(self.phi(reward) - phi_star)
            if probe is not None:
                probed.append(probe(algorithm))
        fit = algo_cfg.reward_fit
        return {
            "exact": exact,
            "method": algo_cfg.method,
            "pseudocode": algo_cfg.pseudocode,
            "sigma": algo_cfg.sigma,
            "K": algo_cfg.inner_steps,
            "B": algo_cfg.pairs_per_step,
            "replay": fit.replay,
            "reward_steps": fit.steps,
            "gap": gap,
            **summarise(gap, self.cfg.window),
            "oracle_pairs": algorithm.oracle_pairs,
            "seconds": time.perf_counter() - start,
            **({"probe": probed} if probe is not None else {}),
        }

    def store_bias(self, algorithm: Bilevel) -> dict[str, float]:
        """The replayed d_t against the theorem's, both exact, at the current φ, λ, λ′ of an exact run.

        On enumerated rollouts the store's last batch is every pair of the current π_λ′ with its exact
        label (which does not depend on φ): fresh exact pairs, on which d_t is the theorem's. The
        replayed d_t takes f̂ over the whole store, as the fit does. Both take the penalty on
        enumerations of the current λ and λ′ and add ρφ, the decay the step adds: each is then the
        gradient of the objective its fit descends, and the theorem's is ∇L_σ up to what K inner
        steps leave of λ*(φ), λ_σ(φ).
        """
        store, fit = algorithm.store, algorithm.cfg.reward_fit
        n = algorithm.cfg.trajectories_per_step
        sets = {name: [algorithm.source.rollouts(name, n)] for name in (LAMBDA, LAMBDA_PRIME)}
        # the fit ran before the outer step's counter moved on: its batches' ages are counted from t − 1
        replayed, _ = algorithm.hypergradient(store.batches, store.weights(algorithm.t - 1, fit.half_life), sets, len(store))
        fresh, _ = algorithm.hypergradient(store.batches[-1:], torch.ones(1), sets, len(store.batches[-1]))
        decay = [self.cfg.reward_decay * p.detach() for p in algorithm.reward.parameters()]
        replayed, fresh = ([g + r for g, r in zip(d, decay)] for d in (replayed, fresh))
        error = norm([a - b for a, b in zip(replayed, fresh)]) / norm(fresh)
        return {"relative_error": error.item(), "cosine": est.cosine(replayed, fresh)}


class ConvergenceStudy:
    """Every experiment of the lab, each a set of `Lab` runs: the theorem's update with exact and
    sampled gradients, the alternating and printed-pseudo-code runs, the practical φ update against
    the theorem's, and the σ and B sweeps."""

    def __init__(self, lab: Lab, log: Callable[[str], None] = print):
        self.lab, self.cfg, self.log = lab, lab.cfg, log

    def practical(self, phi_star: float, theorem: dict, theorem_sampled: dict) -> tuple[dict, dict]:
        """The practical φ update's runs (`TheoryConfig.replay_fit`), and its figures against the
        theorem's update (`theorem`, `theorem_sampled`: the `exact` and `sampled` runs) over the same
        outer steps: the exact run's store bias along the way, floors and median gaps side by side."""
        cfg = self.cfg
        T = cfg.replay_outer_steps
        runs = {
            "exact_replay": self.lab.run(phi_star, True, T, probe=self.lab.store_bias, reward_fit=cfg.replay_fit(1, exact=True)),
            "exact_replay_steps": self.lab.run(phi_star, True, T, reward_fit=cfg.replay_fit(cfg.replay_steps, exact=True)),
            "sampled_replay": self.lab.run(
                phi_star, False, cfg.sampled_outer_steps, labels="sample", reward_fit=cfg.replay_fit(cfg.replay_steps, exact=False)
            ),
        }
        probed = runs["exact_replay"].pop("probe")
        error, cosine = ([p[key] for p in probed] for key in ("relative_error", "cosine"))
        exact = summarise(theorem["gap"][:T], cfg.window)
        reference = {"exact_replay": exact, "exact_replay_steps": exact, "sampled_replay": summarise(theorem_sampled["gap"], cfg.window)}
        bias = {
            # ‖d_t(store) − d_t(fresh exact pairs)‖ / ‖d_t(fresh exact pairs)‖ and their cosine after every t
            "relative_error": error,
            "cosine": cosine,
            "median_relative_error": statistics.median(error),
            "last_window_relative_error": statistics.median(last_window(error, cfg.window)),
            "median_cosine": statistics.median(cosine),
            "min_cosine": min(cosine),
            "outer_steps": T,
            "S": cfg.replay_steps,
            # each replay run's figures beside the theorem's update over the same steps
            "floor": {name: {"replay": runs[name]["floor"], "theorem": reference[name]["floor"]} for name in runs},
            "median_gap": {name: {"replay": runs[name]["median_gap"], "theorem": reference[name]["median_gap"]} for name in runs},
        }
        return runs, bias

    def sigma_sweep(self, phi_star: float) -> dict:
        cfg = self.cfg
        runs = [self.lab.run(phi_star, True, cfg.outer_steps, sigma=s) for s in cfg.sigmas]
        bias = [self.lab.bias(phi_star, s) for s in cfg.sigmas]
        reached = [r["median_gap"] for r in runs]
        return {
            "sigma": list(cfg.sigmas),
            "gap": reached,  # median |Φ_t − Φ*| over the last window
            "slope": fit_slope(list(cfg.sigmas), reached),
            "bias": bias,  # Φ(argmin L_σ) − Φ*, exact
            "bias_slope": fit_slope(list(cfg.sigmas), [abs(b) for b in bias]),
            "floor": [r["floor"] for r in runs],  # max (Φ* − Φ_t)² over the last window
            "floor_slope": fit_slope(list(cfg.sigmas), [r["floor"] for r in runs]),
            "gap_sq": [r["gap_sq"] for r in runs],
            "oracle_pairs": [r["oracle_pairs"] for r in runs],
        }

    def batch_sweep(self, phi_star: float) -> dict:
        cfg = self.cfg
        runs = [self.lab.run(phi_star, False, cfg.sampled_outer_steps, labels="sample", pairs_per_step=b) for b in cfg.batch_sizes]
        return {
            "B": list(cfg.batch_sizes),
            "floor": [r["floor"] for r in runs],  # max (Φ* − Φ_t)² over the last window of a sampled run
            "oracle_pairs": [r["oracle_pairs"] for r in runs],
            "slope": fit_slope(list(cfg.batch_sizes), [r["floor"] for r in runs]),
        }

    def all(self) -> dict:
        """Every experiment, as theory.json holds them; Φ* first: the σ sweep's exact bias starts from its minimiser."""
        cfg = self.cfg
        star = self.lab.phi_star()
        phi_star = star["phi_star"]
        self.log(f"Φ* = {phi_star:.6f} ({star['reached']}/{cfg.starts} starts reached it; ρ = {cfg.reward_decay:g})")
        try:
            rest = self.lab.fixed_points()
            self.log(
                f"fixed points: gold of λ*(φ) {rest['bilevel']['gold']:.4f} at argmin Φ (KL {rest['bilevel']['kl']:.3f}), "
                f"{rest['alternating']['gold']:.4f} where alternating rests (KL {rest['alternating']['kl']:.3f}); "
                f"π_ref {rest['reference']['gold']:.4f}"
            )
        except fixed_points.Unsettled as error:
            rest = {"unsettled": str(error)}
            self.log(f"fixed points: {error}")
        runs = {}
        runs["exact"] = self.lab.run(phi_star, True, cfg.outer_steps)
        self.log(f"exact gradients: slope {runs['exact']['slope']:.2f}, floor {runs['exact']['floor']:.2e}")
        runs["sampled"] = self.lab.run(phi_star, False, cfg.sampled_outer_steps, labels="sample")
        self.log(f"sampled gradients: slope {runs['sampled']['slope']:.2f}, floor {runs['sampled']['floor']:.2e}")
        runs["alternating"] = self.lab.run(phi_star, True, cfg.outer_steps, method="alternating")
        runs["printed"] = self.lab.run(phi_star, True, cfg.outer_steps, pseudocode="printed")
        self.log(f"alternating floor {runs['alternating']['floor']:.2e}, printed pseudo-code floor {runs['printed']['floor']:.2e}")
        practical, replay = self.practical(phi_star, runs["exact"], runs["sampled"])
        runs.update(practical)
        gaps = replay["median_gap"]
        self.log(
            f"replayed store: d_t's relative error {replay['median_relative_error']:.2f}, cosine {replay['median_cosine']:.2f} "
            f"(medians, exact); median |Φ_t − Φ*| replay vs theorem: exact {gaps['exact_replay']['replay']:.1e} vs "
            f"{gaps['exact_replay']['theorem']:.1e}, {cfg.replay_steps} φ steps {gaps['exact_replay_steps']['replay']:.1e}, "
            f"sampled ({cfg.replay_steps} steps) {gaps['sampled_replay']['replay']:.1e} vs {gaps['sampled_replay']['theorem']:.1e}"
        )
        sigma_sweep = self.sigma_sweep(phi_star)
        self.log(
            f"σ sweep: |Φ_T − Φ*| ∝ σ^{sigma_sweep['slope']:.2f} (reached), "
            f"Φ(argmin L_σ) − Φ* ∝ σ^{sigma_sweep['bias_slope']:.2f} (exact bias)"
        )
        batch_sweep = self.batch_sweep(phi_star)
        self.log(f"B sweep: floor ∝ B^{batch_sweep['slope']:.2f}")
        return {
            "config": dataclasses.asdict(cfg),
            "phi_star": phi_star,
            "phi_star_starts": star,
            "fixed_points": rest,
            "runs": runs,
            "gap_sq": {name: run["gap_sq"] for name, run in runs.items()},
            "slope": {name: run["slope"] for name, run in runs.items()},
            "sigma": sigma_sweep,
            "B": batch_sweep,
            "replay_bias": replay,
            "oracle_pairs": {name: run["oracle_pairs"] for name, run in runs.items()},
        }
