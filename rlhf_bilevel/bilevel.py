"""Algorithm 1 (corrected, ALGORITHM.md): the outer loop on φ and the inner loops on λ and λ′.

Written once against the protocols of `types.py`: it runs on the exact token MDP and on a
Hugging Face model alike. `method="alternating"` is the standard online RLHF it is
compared with; `pseudocode="printed"` reproduces the paper's slips (errata 1–4) so that
tests can show they matter.

An update whose direction (or loss) is not finite is skipped, never applied: one NaN in λ,
λ′, φ or a critic's weights would poison every later step. Skips are counted per block, and
`max_bad_steps` of them in a row in one block stop the run (NonFiniteError).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterator
from typing import Any, Callable

import torch

from rlhf_bilevel import estimators as est
from rlhf_bilevel.config import BilevelConfig
from rlhf_bilevel.distributed import World
from rlhf_bilevel.steps import Stepper
from rlhf_bilevel.types import LAMBDA, LAMBDA_PRIME, Critic, Oracle, Policy, PreferencePairs, RewardModel, Rollout, RolloutSource

PairsCallback = Callable[[PreferencePairs, dict], None]
InnerCallback = Callable[[int, dict], None]
PhaseCallback = Callable[[str], None]
"""Told when the loop enters a phase (lambda_step, lambda_prime_step, phi_step): what a profiler hooks."""
BLOCKS = {LAMBDA: "λ", LAMBDA_PRIME: "λ′", "phi": "φ"}
"""What each parameter block is called in messages; a critic is called after its policy's block."""


class NonFiniteError(RuntimeError):
    """One parameter block had `max_bad_steps` non-finite updates in a row, all skipped."""


class Bilevel:
    def __init__(
        self,
        policy: Policy,
        reward: RewardModel,
        source: RolloutSource,
        oracle: Oracle,
        make_critic: Callable[[str], Critic],
        cfg: BilevelConfig,
        generator: torch.Generator,
        on_pairs: PairsCallback | None = None,
        on_inner: InnerCallback | None = None,
        on_phase: PhaseCallback | None = None,
        world: World = World(),
        max_bad_steps: int | None = None,
    ):
        """`world`: the processes the batches are split over (the source draws this process's shard);
        every gradient and metric is averaged over them before it is used. `max_bad_steps`: skipped
        updates in a row of one block that stop the run; None never stops it."""
        self.policy, self.reward, self.source, self.oracle, self.cfg = policy, reward, source, oracle, cfg
        self.world = world
        self.generator = generator
        self.on_pairs = on_pairs
        self.on_inner = on_inner
        self.on_phase = on_phase or (lambda phase: None)
        self.bilevel = cfg.method == "bilevel"
        self.printed = cfg.pseudocode == "printed"
        adapters = (LAMBDA, LAMBDA_PRIME) if self.bilevel else (LAMBDA,)
        self.critics = {name: make_critic(name) for name in adapters}
        self.policy_steps = {name: Stepper(policy.parameters_of(name), cfg.policy_step, ascend=True) for name in adapters}
        self.reward_step = Stepper(reward.parameters(), cfg.reward_step, ascend=False)
        self.t = 0  # outer iterations done
        self.oracle_pairs = 0
        self.max_bad_steps = max_bad_steps
        self.bad_in_a_row: dict[str, int] = {}  # block → its updates skipped since its last good one
        self.nonfinite_steps = 0  # updates skipped so far, all blocks together

    # -- oracle -----------------------------------------------------------------------------------
    def label(self, pairs: PreferencePairs, inner_step: int) -> PreferencePairs:
        """Asks the oracle once per pair; every labelled pair is counted and handed to `on_pairs`.

        Across processes the main one asks about the pairs of the whole batch in one call, as a
        single process would, and each process keeps the verdicts on its own pairs.
        """
        rollout = pairs.rollout
        prompts = [rollout.prompts[i] for i in pairs.first.tolist()]
        first = [rollout.responses[i] for i in pairs.first.tolist()]
        second = [rollout.responses[i] for i in pairs.second.tolist()]
        shards = self.world.gather((prompts, first, second))
        prob = self.oracle.compare(*(sum(lists, []) for lists in zip(*shards))).float() if self.world.is_main else None
        prob = self.world.broadcast(prob)
        # the labels of the whole batch are drawn on every process: the generators stay in step
        label = torch.bernoulli(prob, generator=self.generator) if self.cfg.labels == "sample" else prob
        rows = self.world.shard(len(prob))
        pairs.prob, pairs.label = prob[rows].to(rollout.mask.device), label[rows].to(rollout.mask.device)
        self.oracle_pairs += len(prob)
        if self.on_pairs is not None:
            self.on_pairs(pairs, {"outer_step": self.t, "inner_step": inner_step, "policy": rollout.adapter})
        return pairs

    # -- the lower level -------------------------------------------------------------------------
    def ascent(
        self, adapter: str, rollout: Rollout, penalty: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> tuple[list[torch.Tensor], dict[str, float]]:
        """Critic fit (Algorithm 2), then one adapter's ascent direction: ∇J by eq. 12, or with
        `penalty` (log π ↦ the surrogate f̂ of eq. 17) d'_k. Returns (direction, diagnostics)."""
        cfg = self.cfg
        with torch.no_grad():
            shaped = est.shaped_rewards(rollout, self.reward.token_rewards(rollout), cfg.beta)
        critic = self.critics[adapter]
        diagnostics = self.fit_critic(adapter, rollout, shaped)
        diagnostics["lower/J"] = (rollout.weight * est.returns(rollout, shaped, cfg.gamma)).sum().item()
        diagnostics["lower/kl"] = est.kl_to_reference(rollout).item()

        def objective(log_probs: torch.Tensor) -> torch.Tensor:
            advantage = critic.advantages(rollout, shaped, log_probs)
            surrogate = est.surrogate_J_lambda(log_probs, rollout, advantage, cfg.gamma)
            if penalty is None:
                return surrogate
            # d'_k = ∇J(λ′, φ) − σ ∇f(φ, λ′)  (ALGORITHM.md step 4; erratum 2): linear in the two
            # surrogates, so one backward pass through the trunk gives it rather than two
            (surrogate,) = est.penalised_direction([surrogate], [penalty(log_probs)], cfg.sigma)
            return surrogate

        return self.gradient(adapter, rollout, objective), diagnostics

    def gradient(self, adapter: str, rollout: Rollout, objective: Callable[[torch.Tensor], torch.Tensor]) -> list[torch.Tensor]:
        """∇ of objective(log π(rollout)) in `adapter`'s weights. With `micro_batch`, by the chain rule in
        pieces: ∂objective/∂log π on the whole batch's log π (taken without a graph), then each piece of
        rows backpropagated alone with its share of it, so the trunk holds one piece's activations."""
        params = self.policy.parameters_of(adapter)
        size = self.cfg.micro_batch
        with self.policy.adapter(adapter):
            if size is None or size >= len(rollout):
                # no retained graph: the trunk's activations are freed before the next rollout is drawn
                return list(torch.autograd.grad(objective(self.policy.log_probs(rollout)), params))
            with torch.no_grad():
                log_probs = self.policy.log_probs(rollout)
            (outer,) = torch.autograd.grad(objective(log_probs.requires_grad_()), log_probs)
            total = [torch.zeros_like(p) for p in params]
            for start in range(0, len(rollout), size):
                rows = slice(start, start + size)
                piece = torch.autograd.grad(self.policy.log_probs(rollout.rows(rows)), params, grad_outputs=outer[rows])
                for acc, grad in zip(total, piece):
                    acc.add_(grad)
            return total

    def inner_step(self, k: int) -> dict[str, float]:
        """Step k of the inner loop; its metrics come from the rollouts it drew anyway."""
        cfg = self.cfg
        self.on_phase("lambda_step")
        rollout = self.source.rollouts(LAMBDA, cfg.trajectories_per_step)
        d_k, metrics = self.ascent(LAMBDA, rollout)
        metrics["lower/d_norm"] = self.update(LAMBDA, self.policy_steps[LAMBDA], self.world.mean(d_k))
        if not self.bilevel:
            return metrics
        self.on_phase("lambda_prime_step")
        pairs = self.label(self.source.pairs(LAMBDA_PRIME, cfg.pairs_per_step), k)
        if self.printed:
            d_prime = d_k  # erratum 3: line 10 steps λ′ along d_k, so λ′ ≡ λ
        else:
            with torch.no_grad():
                rewards = self.reward.token_rewards(pairs.rollout)
                losses = est.upper_loss(est.pair_margins(rewards, pairs), pairs.label, cfg.upper_loss)
            (total,) = self.world.sum([losses.sum()])
            count = len(losses) * self.world.size
            d_prime, diagnostics = self.ascent(
                LAMBDA_PRIME, pairs.rollout, lambda log_probs: est.surrogate_f_lambda(log_probs, pairs, losses, total, count)
            )
            metrics["lower/J_prime"] = diagnostics["lower/J"]
        metrics["lower/d_prime_norm"] = self.update(LAMBDA_PRIME, self.policy_steps[LAMBDA_PRIME], self.world.mean(d_prime))
        return metrics

    # -- non-finite updates ------------------------------------------------------------------------
    def update(self, block: str, stepper: Stepper, direction: list[torch.Tensor], loss: float = 0.0) -> float:
        """Steps `block` along `direction` and returns ‖d‖; a non-finite direction or loss is skipped (NaN returned)."""
        if math.isfinite(loss) and all(torch.isfinite(d).all() for d in direction):
            self.bad_in_a_row[block] = 0
            return stepper.step(direction)
        self.skipped(block, BLOCKS[block], "its loss was not finite" if not math.isfinite(loss) else "its gradient was not finite")
        return math.nan

    def fit_critic(self, adapter: str, rollout: Rollout, shaped: torch.Tensor) -> dict[str, float]:
        """Algorithm 2, undone when it leaves the critic's state non-finite (a NaN reward in the
        replay, a diverging TD step). Every process holds the same critic, so all undo it together."""
        critic = self.critics[adapter]
        before = copy.deepcopy(critic.state_dict())
        diagnostics = critic.fit(rollout, shaped)
        block = f"critic/{adapter}"
        if all(torch.isfinite(t).all() for t in tensors_in(critic.state_dict())):
            self.bad_in_a_row[block] = 0
        else:
            critic.load_state_dict(before)
            self.skipped(block, f"the critic of {BLOCKS[adapter]}", "its TD fit left non-finite weights")
        return diagnostics

    def skipped(self, block: str, name: str, reason: str) -> None:
        self.nonfinite_steps += 1
        self.bad_in_a_row[block] = self.bad_in_a_row.get(block, 0) + 1
        if self.max_bad_steps is not None and self.bad_in_a_row[block] >= self.max_bad_steps:
            raise NonFiniteError(
                f"the last {self.bad_in_a_row[block]} updates of {name} were skipped, {reason} "
                f"(outer step {self.t + 1}; {self.nonfinite_steps} updates skipped in all)"
            )

    # -- the upper level -------------------------------------------------------------------------
    def hypergradient(self) -> tuple[list[torch.Tensor], dict[str, float]]:
        cfg = self.cfg
        self.on_phase("phi_step")
        phi = self.reward.parameters()
        budget = cfg.pairs_per_step if self.bilevel else cfg.pairs_per_outer_step
        f_adapter = LAMBDA_PRIME if self.bilevel and cfg.f_at == "lambda_prime" and not self.printed else LAMBDA
        pairs = self.label(self.source.pairs(f_adapter, budget), cfg.inner_steps)
        grad_f, losses = est.grad_f_phi(self.reward.token_rewards(pairs.rollout), phi, pairs, cfg.upper_loss)
        metrics = {"upper/loss": (pairs.weight * losses).sum().item()}
        n = cfg.trajectories_per_step
        coupled = self.bilevel and cfg.common_random_numbers
        traj, traj_prime = self.source.coupled((LAMBDA, LAMBDA_PRIME), n) if coupled else (self.source.rollouts(LAMBDA, n), None)
        rewards = self.reward.token_rewards(traj)
        metrics["lower/J"] = est.objective_value(traj, rewards.detach(), cfg.beta, cfg.gamma).item()
        metrics["lower/kl"] = est.kl_to_reference(traj).item()
        if not self.bilevel:
            return grad_f, metrics
        grad_J = est.grad_J_phi(rewards, phi, traj, cfg.gamma)
        if traj_prime is None:
            traj_prime = pairs.rollout if f_adapter == LAMBDA_PRIME else self.source.rollouts(LAMBDA_PRIME, n)
        rewards_prime = self.reward.token_rewards(traj_prime)
        grad_J_prime = est.grad_J_phi(rewards_prime, phi, traj_prime, cfg.gamma)
        J_prime = est.objective_value(traj_prime, rewards_prime.detach(), cfg.beta, cfg.gamma).item()
        metrics["penalty/gap"] = metrics["lower/J"] - J_prime
        if self.printed:  # erratum 1: the penalty enters with the opposite sign
            grad_J, grad_J_prime = grad_J_prime, grad_J
        return est.hypergradient(grad_f, grad_J, grad_J_prime, cfg.sigma), metrics

    def outer_step(self) -> dict[str, float]:
        """One outer iteration t: K inner steps on λ (and λ′), then one step of φ along d_t."""
        start = time.perf_counter()
        metrics: dict[str, float] = {}
        for k in range(self.cfg.inner_steps):
            inner = self.world.mean_metrics(self.inner_step(k))
            inner["oracle/pairs"] = float(self.oracle_pairs)
            inner["faults/nonfinite_steps"] = float(self.nonfinite_steps)
            if self.on_inner is not None:
                self.on_inner(k, inner)
        d_t, upper = self.hypergradient()
        metrics.update(self.world.mean_metrics(upper))
        metrics["upper/d_norm"] = self.update("phi", self.reward_step, self.world.mean(d_t), loss=metrics["upper/loss"])
        self.t += 1
        metrics["oracle/pairs"] = float(self.oracle_pairs)
        metrics["faults/nonfinite_steps"] = float(self.nonfinite_steps)
        metrics["time/outer_s"] = time.perf_counter() - start
        return metrics

    def state_dict(self) -> dict:
        return {
            "t": self.t,
            "oracle_pairs": self.oracle_pairs,
            "bad_in_a_row": dict(self.bad_in_a_row),
            "nonfinite_steps": self.nonfinite_steps,
            "policy_steps": {k: s.state_dict() for k, s in self.policy_steps.items()},
            "reward_step": self.reward_step.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.t = state["t"]
        self.oracle_pairs = state["oracle_pairs"]
        self.bad_in_a_row = dict(state["bad_in_a_row"])
        self.nonfinite_steps = state["nonfinite_steps"]
        for name, step in self.policy_steps.items():
            step.load_state_dict(state["policy_steps"][name])
        self.reward_step.load_state_dict(state["reward_step"])


def tensors_in(tree: Any) -> Iterator[torch.Tensor]:
    """Every tensor of a state_dict-like tree of dicts, lists and tuples."""
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, dict):
        for value in tree.values():
            yield from tensors_in(value)
    elif isinstance(tree, (list, tuple)):
        for value in tree:
            yield from tensors_in(value)
