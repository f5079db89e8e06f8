"""Algorithm 1 (corrected, docs/algorithm.md): the outer loop on φ and the inner loops on λ and λ′.

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
from typing import TYPE_CHECKING, Any, Callable

import torch

from rlhf_bilevel import estimators as est
from rlhf_bilevel.config import BilevelConfig
from rlhf_bilevel.collectives import Collectives, World
from rlhf_bilevel.queries import most_uncertain_pairs
from rlhf_bilevel.steps import Stepper, norm
from rlhf_bilevel.store import PreferenceStore
from rlhf_bilevel.types import LAMBDA, LAMBDA_PRIME, Critic, Policy, PreferencePairs, RewardModel, Rollout, RolloutSource

if TYPE_CHECKING:
    from rlhf_bilevel.labelling import Labeller

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
        self.anchor = [p.detach().clone() for p in reward.parameters()]  # φ₀, where the fit's prior pulls
        self.drawn: dict[str, list[Rollout]] = {name: [] for name in adapters}  # this outer step's trajectories
        self.t = 0  # outer iterations done
        self.max_bad_steps = max_bad_steps
        self.bad_in_a_row: dict[str, int] = {}  # block → its updates skipped since its last good one
        self.nonfinite_steps = 0  # updates skipped so far, all blocks together

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

    def query(self, adapter: str, n: int) -> PreferencePairs:
        """n pairs of `adapter` to be labelled: random (two draws per prompt), or the most uncertain of
        `query.candidates` draws per prompt (queries.py)."""
        select = self.cfg.query
        if select.select == "random":
            return self.source.pairs(adapter, n)
        rollout = self.source.groups(adapter, n, select.candidates)
        with torch.no_grad():
            return most_uncertain_pairs(self.reward.member_rewards(rollout), rollout, select.candidates)

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
        diagnostics = {
            "lower/J": (rollout.weight * est.returns(rollout, shaped, cfg.gamma)).sum().item(),
            "lower/kl": est.kl_to_reference(rollout).item(),
        }

        def objective(log_probs: torch.Tensor) -> torch.Tensor:
            # the critic learns from π(·|s) at every visited state: its expected-SARSA target needs them
            diagnostics.update(self.fit_critic(adapter, rollout, shaped, log_probs.detach()))
            advantage = critic.advantages(rollout, shaped, log_probs)
            surrogate = est.surrogate_J_lambda(log_probs, rollout, advantage, cfg.gamma)
            if penalty is None:
                return surrogate
            # d'_k = ∇J(λ′, φ) − σ ∇f(φ, λ′)  (docs/algorithm.md step 4; erratum 2): linear in the two
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
        self.drawn[LAMBDA].append(rollout)
        d_k, metrics = self.ascent(LAMBDA, rollout)
        metrics["lower/d_norm"] = self.update(LAMBDA, self.policy_steps[LAMBDA], self.world.mean(d_k))
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

    def fit_critic(self, adapter: str, rollout: Rollout, shaped: torch.Tensor, log_probs: torch.Tensor) -> dict[str, float]:
        """Algorithm 2, undone when it leaves the critic's state non-finite (a NaN reward in the
        replay, a diverging TD step). Every process holds the same critic, so all undo it together."""
        critic = self.critics[adapter]
        before = copy.deepcopy(critic.state_dict())
        diagnostics = critic.fit(rollout, shaped, log_probs)
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
    def upper_step(self) -> dict[str, float]:
        """Lines 12–14: B fresh pairs labelled (B·(K+1) for the alternating method), then φ's fit, each of
        its `reward_fit.steps` steps along d_t recomputed at the current φ. Returns the outer step's metrics."""
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
        metrics.update(self.fit_reward(pairs, sets))
        return metrics

    def fit_reward(self, fresh: PreferencePairs, sets: dict[str, list[Rollout]]) -> dict[str, float]:
        """φ's `reward_fit.steps` steps along d_t at the current φ, on the store (or the `fresh` pairs
        alone) and the penalty's trajectories `sets`; then the critics' replay is relabelled."""
        cfg, fit = self.cfg, self.cfg.reward_fit
        device = self.anchor[0].device
        batches = self.store.batches if fit.replay else [fresh]
        weights = self.store.weights(self.t, fit.half_life, device) if fit.replay else torch.ones(1, dtype=torch.float64, device=device)
        if fit.minibatch is not None and fit.minibatch < len(batches):
            chosen = torch.randperm(len(batches), generator=self.generator)[: fit.minibatch].sort().values
            batches, weights = [batches[i] for i in chosen.tolist()], weights[chosen]
        labels = sum(len(p) for p in batches) * self.world.size  # every process holds an equal share
        metrics = {"upper/labels": float(labels)}
        for step in range(fit.steps):
            d_t, diagnostics = self.hypergradient(batches, weights, sets, labels)
            diagnostics["upper/d_norm"] = self.update("phi", self.reward_step, d_t, loss=diagnostics["upper/store_loss"])
            if step == 0:  # d_t as the theorem's single step sees it
                metrics.update(diagnostics)
        metrics["upper/store_loss_after"] = self.store_loss(batches, weights).item()
        with torch.no_grad():  # the rewards in the critics' replay were r_φ's of before the fit
            for critic in self.critics.values():
                critic.relabel(lambda rollout: est.shaped_rewards(rollout, self.reward.token_rewards(rollout), cfg.beta))
        return metrics

    def store_loss(self, batches: list[PreferencePairs], weights: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            rewards = [self.reward.member_rewards(p.rollout) for p in batches]
        (total,) = self.world.mean([est.store_loss(rewards, batches, weights, self.cfg.upper_loss)])
        return total

    def hypergradient(
        self, batches: list[PreferencePairs], weights: torch.Tensor, sets: dict[str, list[Rollout]], labels: int
    ) -> tuple[list[torch.Tensor], dict[str, float]]:
        """d_t at the current φ (docs/algorithm.md step 6, with "The φ update in practice"): ∇φ of f̂ on the
        stored `batches` plus the prior, and for the bilevel method the penalty (∇φĴ(λ) − ∇φĴ(λ′))/σ
        on the trajectories of each policy in `sets`. Averaged over processes."""
        cfg, fit = self.cfg, self.cfg.reward_fit
        phi = self.reward.parameters()
        # each member of an ensemble fits the labels on its own: trained through their mean, they would move together
        grad_f, f_hat = est.grad_f_phi([self.reward.member_rewards(p.rollout) for p in batches], phi, batches, weights, cfg.upper_loss)
        if fit.prior:
            grad_f = [g + p for g, p in zip(grad_f, est.grad_anchor_prior(phi, self.anchor, fit.prior, labels))]
        grad_f = self.world.mean(grad_f)
        (store_loss,) = self.world.mean([f_hat])
        metrics = {"upper/store_loss": store_loss.item(), "upper/grad_f_norm": norm(grad_f).item()}
        if not self.bilevel:
            return grad_f, metrics
        grad_J, grad_J_prime = (
            self.world.mean(est.grad_J_phi([self.reward.token_rewards(r) for r in sets[name]], phi, sets[name], cfg.gamma))
            for name in (LAMBDA, LAMBDA_PRIME)
        )
        if self.printed:  # erratum 1: the penalty enters with the opposite sign
            grad_J, grad_J_prime = grad_J_prime, grad_J
        # every step of the fit follows the whole penalty: counted once per outer step instead (÷S), the
        # fit's fixed point is L_{Sσ}'s, and the exact lab stalled at a gap that grew with S towards the
        # alternating method's (docs/results.md)
        d_t = est.hypergradient(grad_f, grad_J, grad_J_prime, cfg.sigma)
        penalty = [(a - b) / cfg.sigma for a, b in zip(grad_J, grad_J_prime)]
        metrics.update({"upper/penalty_norm": norm(penalty).item(), "upper/cosine_f_penalty": est.cosine(grad_f, penalty)})
        return d_t, metrics

    def outer_step(self) -> dict[str, float]:
        """One outer iteration t: K inner steps on λ (and λ′), then φ's fit along d_t."""
        start = time.perf_counter()
        for name in self.drawn:
            self.drawn[name] = []
        for k in range(self.cfg.inner_steps):
            inner = self.world.mean_metrics(self.inner_step(k))
            inner.update(self.label_metrics())
            inner["faults/nonfinite_steps"] = float(self.nonfinite_steps)
            if self.on_inner is not None:
                self.on_inner(k, inner)
        metrics = self.world.mean_metrics(self.upper_step())
        for name in self.drawn:  # nothing of this step's rollouts outlives it
            self.drawn[name] = []
        self.t += 1
        metrics.update(self.label_metrics())
        metrics["faults/nonfinite_steps"] = float(self.nonfinite_steps)
        metrics["time/outer_s"] = time.perf_counter() - start
        return metrics

    def label_metrics(self) -> dict[str, float]:
        metrics = {"oracle/pairs": float(self.oracle_pairs)}
        if self.labeller.flip:
            metrics["oracle/flipped"] = float(self.labeller.counts.flipped)
        return metrics

    def state_dict(self) -> dict:
        return {
            "t": self.t,
            "labelling": self.labeller.state_dict(),
            "bad_in_a_row": dict(self.bad_in_a_row),
            "nonfinite_steps": self.nonfinite_steps,
            "policy_steps": {k: s.state_dict() for k, s in self.policy_steps.items()},
            "reward_step": self.reward_step.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.t = state["t"]
        self.bad_in_a_row = dict(state["bad_in_a_row"])
        self.nonfinite_steps = state["nonfinite_steps"]
        for name, step in self.policy_steps.items():
            step.load_state_dict(state["policy_steps"][name])
        self.reward_step.load_state_dict(state["reward_step"])
        self.labeller.load_state_dict(state["labelling"], device=self.anchor[0].device)


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
