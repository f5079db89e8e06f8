"""Algorithm 1 (corrected, docs/algorithm.md): the outer loop on φ and the inner loops on λ and λ′.

Written once against the protocols of `types.py`: it runs on the exact token MDP and on a
Hugging Face model alike. `method="alternating"` is the standard online RLHF it is
compared with; `pseudocode="printed"` reproduces the paper's slips (errata 1–4) so that
tests can show they matter.

The loop is written here; its parts are: `PairQuery` (queries.py) draws the pairs the labeller
labels, `PolicyAscent` (ascent.py) gives λ's and λ′'s directions and steps, `RewardFit`
(reward_fit.py) steps φ down `Hypergradient`'s d_t (hypergradient.py), and `NonFiniteGuard`
(nonfinite.py) skips every update that is not finite.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable

import torch

from rlhf_bilevel import estimators as est
from rlhf_bilevel.ascent import PolicyAscent
from rlhf_bilevel.collectives import Collectives, World
from rlhf_bilevel.config import BilevelConfig
from rlhf_bilevel.hypergradient import Hypergradient
from rlhf_bilevel.nonfinite import NonFiniteGuard
from rlhf_bilevel.queries import PairQuery
from rlhf_bilevel.reward_fit import RewardFit
from rlhf_bilevel.store import PreferenceStore
from rlhf_bilevel.types import LAMBDA, LAMBDA_PRIME, Critic, Policy, PreferencePairs, RewardModel, Rollout, RolloutSource

if TYPE_CHECKING:
    from rlhf_bilevel.labelling import Labeller

PairsCallback = Callable[[PreferencePairs, dict], None]
InnerCallback = Callable[[int, dict], None]
PhaseCallback = Callable[[str], None]
"""Told when the loop enters a phase (lambda_step, lambda_prime_step, phi_step): what a profiler hooks."""


class Bilevel:
    def __init__(
        self,
        policy: Policy,
        reward: RewardModel,
        source: RolloutSource,
        labeller: Labeller,
        make_critic: Callable[[str], Critic],
        cfg: BilevelConfig,
        generator: torch.Generator,
        on_pairs: PairsCallback | None = None,
        on_inner: InnerCallback | None = None,
        on_phase: PhaseCallback | None = None,
        world: Collectives = World(),
        max_bad_steps: int | None = None,
    ):
        """`labeller`: asks the oracle, and keeps the preference store the reward model replays.
        `world`: the processes the batches are split over (the source draws this process's shard);
        every gradient and metric is averaged over them before it is used. `max_bad_steps`: skipped
        updates in a row of one block that stop the run; None never stops it."""
        self.policy, self.reward, self.source, self.labeller, self.cfg = policy, reward, source, labeller, cfg
        self.world, self.generator = world, generator
        self.on_pairs, self.on_inner = on_pairs, on_inner
        self.on_phase = on_phase or (lambda phase: None)
        self.bilevel = cfg.method == "bilevel"
        self.printed = cfg.pseudocode == "printed"
        adapters = (LAMBDA, LAMBDA_PRIME) if self.bilevel else (LAMBDA,)
        self.critics = {name: make_critic(name) for name in adapters}
        self.guard = NonFiniteGuard(max_bad_steps, outer_step=lambda: self.t + 1)
        self.query = PairQuery(source, reward, cfg.query)
        self.ascent = PolicyAscent(policy, reward, self.critics, cfg, self.guard)
        self.hypergradient = Hypergradient(reward, cfg, world)
        self.reward_fit = RewardFit(reward, labeller.store, self.hypergradient, cfg, generator, world, self.guard)
        self.drawn: dict[str, list[Rollout]] = {name: [] for name in adapters}  # this outer step's trajectories
        self.t = 0  # outer iterations done

    # -- oracle -----------------------------------------------------------------------------------
    @property
    def store(self) -> PreferenceStore:
        return self.labeller.store

    @property
    def oracle_pairs(self) -> int:
        """Training labels so far: the oracle budget spent."""
        return self.labeller.counts.training

    def label(self, pairs: PreferencePairs, inner_step: int) -> PreferencePairs:
        """The oracle's labels of `pairs` (labelling.py, which counts and stores them), handed to `on_pairs`."""
        self.labeller.label(pairs, self.t, self.generator, sample=self.cfg.labels == "sample")
        if self.on_pairs is not None:
            self.on_pairs(pairs, {"outer_step": self.t, "inner_step": inner_step, "policy": pairs.rollout.adapter})
        return pairs

    # -- the lower level -------------------------------------------------------------------------
    def inner_step(self, k: int) -> dict[str, float]:
        """Step k of the inner loop; its metrics come from the rollouts it drew anyway."""
        cfg = self.cfg
        self.on_phase("lambda_step")
        g = cfg.responses_per_prompt
        n = cfg.trajectories_per_step
        rollout = self.source.groups(LAMBDA, n // g, g) if g > 1 else self.source.rollouts(LAMBDA, n)
        self.drawn[LAMBDA].append(rollout)
        d_k, metrics = self.ascent.direction(LAMBDA, rollout)
        metrics["lower/d_norm"] = self.ascent.step(LAMBDA, self.world.mean(d_k))
        if not self.bilevel:
            return metrics
        self.on_phase("lambda_prime_step")
        pairs = self.label(self.query(LAMBDA_PRIME, cfg.pairs_per_step), k)
        self.drawn[LAMBDA_PRIME].append(pairs.rollout)
        if self.printed:
            d_prime = d_k  # erratum 3: line 10 steps λ′ along d_k, so λ′ ≡ λ
        else:
            with torch.no_grad():
                rewards = self.reward.token_rewards(pairs.rollout)
                losses = est.upper_loss(est.pair_margins(rewards, pairs), pairs.label, cfg.upper_loss)
            (total,) = self.world.sum([losses.sum()])
            count = len(losses) * self.world.size
            d_prime, diagnostics = self.ascent.direction(
                LAMBDA_PRIME, pairs.rollout, lambda log_probs: est.surrogate_f_lambda(log_probs, pairs, losses, total, count)
            )
            metrics["lower/J_prime"] = diagnostics["lower/J"]
        metrics["lower/d_prime_norm"] = self.ascent.step(LAMBDA_PRIME, self.world.mean(d_prime))
        return metrics

    # -- the upper level -------------------------------------------------------------------------
    def upper_step(self) -> dict[str, float]:
        """Lines 12–14: B fresh pairs labelled (B·(K+1) for the alternating method), then φ's fit, each of
        its `reward_fit.steps` steps along d_t recomputed at the current φ, and the critics' replay relabelled."""
        cfg, fit = self.cfg, self.cfg.reward_fit
        self.on_phase("phi_step")
        budget = cfg.pairs_per_step if self.bilevel else cfg.pairs_per_outer_step
        f_adapter = LAMBDA_PRIME if self.bilevel and cfg.f_at == "lambda_prime" and not self.printed else LAMBDA
        pairs = self.label(self.query(f_adapter, budget), cfg.inner_steps)
        with torch.no_grad():
            losses = est.upper_loss(est.pair_margins(self.reward.token_rewards(pairs.rollout), pairs), pairs.label, cfg.upper_loss)
        metrics = {"upper/loss": (pairs.weight * losses).sum().item()}
        n = cfg.trajectories_per_step
        coupled = self.bilevel and cfg.common_random_numbers
        traj, traj_prime = self.source.coupled((LAMBDA, LAMBDA_PRIME), n) if coupled else (self.source.rollouts(LAMBDA, n), None)
        with torch.no_grad():
            metrics["lower/J"] = est.objective_value(traj, self.reward.token_rewards(traj), cfg.beta, cfg.gamma).item()
        metrics["lower/kl"] = est.kl_to_reference(traj).item()
        sets = {}
        if self.bilevel:
            if traj_prime is None:
                traj_prime = pairs.rollout if f_adapter == LAMBDA_PRIME else self.source.rollouts(LAMBDA_PRIME, n)
            sets = {LAMBDA: [traj], LAMBDA_PRIME: [traj_prime]}
            if fit.penalty_from == "all":  # every trajectory of each policy this outer step drew, once
                sets[f_adapter] += [] if pairs.rollout is traj_prime else [pairs.rollout]
                sets = {name: self.drawn[name] + drawn for name, drawn in sets.items()}
            with torch.no_grad():
                J_prime = est.objective_value(traj_prime, self.reward.token_rewards(traj_prime), cfg.beta, cfg.gamma).item()
            metrics["penalty/gap"] = metrics["lower/J"] - J_prime
        metrics.update(self.reward_fit.fit(pairs, sets, self.t))
        self.ascent.relabel()
        return metrics

    def outer_step(self) -> dict[str, float]:
        """One outer iteration t: K inner steps on λ (and λ′), then φ's fit along d_t."""
        start = time.perf_counter()
        for name in self.drawn:
            self.drawn[name] = []
        for k in range(self.cfg.inner_steps):
            inner = self.world.mean_metrics(self.inner_step(k))
            inner.update(self.labeller.metrics())
            inner["faults/nonfinite_steps"] = float(self.guard.nonfinite_steps)
            if self.on_inner is not None:
                self.on_inner(k, inner)
        metrics = self.world.mean_metrics(self.upper_step())
        for name in self.drawn:  # nothing of this step's rollouts outlives it
            self.drawn[name] = []
        self.t += 1
        metrics.update(self.labeller.metrics())
        metrics["faults/nonfinite_steps"] = float(self.guard.nonfinite_steps)
        metrics["time/outer_s"] = time.perf_counter() - start
        return metrics

    def state_dict(self) -> dict:
        """The loop's counters, labels and step rules; the weights of φ, λ, λ′ and the critics are saved by their owners."""
        return {
            "t": self.t,
            "labelling": self.labeller.state_dict(),
            **self.guard.state_dict(),
            "policy_steps": self.ascent.state_dict(),
            "reward_step": self.reward_fit.reward_step.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.t = state["t"]
        self.guard.load_state_dict(state)
        self.ascent.load_state_dict(state["policy_steps"])
        self.reward_fit.reward_step.load_state_dict(state["reward_step"])
        self.labeller.load_state_dict(state["labelling"], device=self.reward_fit.device)
