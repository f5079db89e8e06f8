"""The loop of a run: outer steps of Algorithm 1, with its evaluations, logs and checkpoints.

The x-axis `step` of metrics.jsonl and TensorBoard counts policy updates: inner step k of
outer iteration t is step t·K + k + 1, and outer iteration t ends at step (t + 1)·K.

Under `accelerate launch` with N processes the run is the same run, split (distributed.py):
batch sizes and every logged number are global, and only the main process writes files.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from peft import PeftModel

from rlhf_bilevel.bilevel import Bilevel
from rlhf_bilevel.collectives import Collectives
from rlhf_bilevel.evaluate import PeriodicEval
from rlhf_bilevel.labelling import Labeller
from rlhf_bilevel.nonfinite import NonFiniteError
from rlhf_bilevel.preferences import PreferenceLog, pair_records
from rlhf_bilevel.recipe import Recipe, recipe_dict
from rlhf_bilevel.run_folder import RunFolder
from rlhf_bilevel.tracking import Tracker
from rlhf_bilevel.types import Policy, PreferencePairs, RewardModel


@dataclass
class Summary:
    outer_steps: int
    oracle_pairs: int
    tokens_generated: int
    seconds: float
    gold_reference: float | None
    gold_final: float | None
    agreement: float | None
    examples: list[dict[str, str]] = field(default_factory=list)

    def describe(self) -> str:
        lines = [f"{self.outer_steps} outer steps, {self.oracle_pairs} oracle pairs, {self.tokens_generated} tokens, {self.seconds:.0f} s"]
        if self.gold_reference is not None and self.gold_final is not None:
            change = self.gold_final - self.gold_reference
            lines.append(f"gold score on held-out prompts: reference {self.gold_reference:.3f} -> policy {self.gold_final:.3f} ({change:+.3f})")
        if self.agreement is not None:
            lines.append(f"reward model agrees with the oracle on {self.agreement:.0%} of fresh held-out pairs")
        for example in self.examples:
            lines += [f"  prompt:    {example['prompt']}", f"  reference: {example['reference']}", f"  policy:    {example['policy']}"]
        return "\n".join(lines)


@dataclass(eq=False)
class Trainer:
    """The parts of a run (commands/train.py assembles them) and the loop that runs, evaluates and checkpoints them."""

    recipe: Recipe
    folder: RunFolder
    world: Collectives
    model: PeftModel
    adapters: tuple[str, ...]  # the model's adapters: λ, λ′ and, with a LoRA reward model, its own
    policy: Policy
    reward: RewardModel
    labeller: Labeller  # the only asker of the oracle; its state is saved with bilevel's
    generator: torch.Generator
    bilevel: Bilevel
    evaluation: PeriodicEval
    tracker: Tracker
    preferences: PreferenceLog
    elapsed: float = 0.0

    def __post_init__(self) -> None:
        self.bilevel.on_pairs, self.bilevel.on_inner = self.record_pairs, self.log_inner

    # -- what arrives during a step ------------------------------------------------------------------
    def record_pairs(self, pairs: PreferencePairs, meta: dict) -> None:
        # every process's pairs, in the order of the whole batch; only the main process writes
        self.preferences.append(sum(self.world.gather(pair_records(pairs, meta)), []))

    def tokens_generated(self) -> int:
        """Tokens sampled by every process together: each counts the rows it drew."""
        (total,) = self.world.sum([torch.tensor(self.policy.tokens_generated, device=self.world.device)])
        return int(total)

    def log_inner(self, k: int, metrics: dict[str, float]) -> None:
        metrics["tokens/generated"] = float(self.tokens_generated())
        self.tracker.log(metrics, step=self.bilevel.t * self.recipe.bilevel.inner_steps + k + 1, phase="inner")

    # -- the loop ------------------------------------------------------------------------------------
    def fit(self) -> Summary | None:
        """Runs outer steps up to `bilevel.outer_steps`, from wherever the trainer stands; returns
        the summary on the main process, None on the others."""
        cfg, train = self.recipe.bilevel, self.recipe.train
        with self.tracker:
            bar = self.tracker.progress(total=cfg.outer_steps, initial=self.bilevel.t)
            if self.evaluation.reference is None:
                self.tracker.log(self.evaluation(), step=0, phase="outer")
            while self.bilevel.t < cfg.outer_steps:
                start = time.perf_counter()
                try:
                    metrics = self.bilevel.outer_step()
                except NonFiniteError as error:
                    raise NonFiniteError(self.stopped(error)) from None
                t = self.bilevel.t
                if t % train.eval_every == 0 or t == cfg.outer_steps:
                    metrics.update(self.evaluation())
                self.elapsed += time.perf_counter() - start
                metrics.update({"outer_step": float(t), "tokens/generated": float(self.tokens_generated()), "time/elapsed_s": self.elapsed})
                metrics["dist/world_size"] = float(self.world.size)
                self.tracker.log(metrics, step=t * cfg.inner_steps, phase="outer")
                self.tracker.show(metrics)
                bar.update(1)
                if t % train.save_every == 0 or t == cfg.outer_steps:
                    self.save()
        summary = self.summary()
        if not self.world.is_main:
            return None
        self.folder.write_summary(asdict(summary))
        return summary

    def stopped(self, error: NonFiniteError) -> str:
        """Why the run stopped, and where to go on from: the newest checkpoint, whose weights are all finite."""
        newest = self.folder.latest_checkpoint()
        start = f"the newest good checkpoint is {newest}" if newest else "no checkpoint was saved yet"
        return (
            f"{error} (train.max_bad_steps={self.recipe.train.max_bad_steps}); {start}: lower the step sizes "
            f"(bilevel.policy_step.lr, bilevel.reward_step.lr, bilevel.critic.lr) and continue with --resume {self.folder.path}"
        )

    def summary(self) -> Summary:
        final, reference = self.evaluation.last or {}, self.evaluation.reference or {}
        examples = [
            {"prompt": p, "reference": r, "policy": q}
            for p, r, q in list(zip(final.get("prompts", []), reference.get("responses", []), final.get("responses", [])))[:2]
        ]
        return Summary(
            outer_steps=self.bilevel.t,
            oracle_pairs=self.bilevel.oracle_pairs,
            tokens_generated=self.tokens_generated(),
            seconds=self.elapsed,
            gold_reference=reference.get("gold/score"),
            gold_final=final.get("gold/score"),
            agreement=final.get("eval/agreement"),
            examples=examples,
        )

    # -- checkpoints ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything of the run but the adapters' weights, which the checkpoint keeps as peft folders."""
        return {
            "bilevel": self.bilevel.state_dict(),
            "reward": self.reward.state_dict(),
            "critics": {name: critic.state_dict() for name, critic in self.bilevel.critics.items()},
            "generator": self.generator.get_state(),
            "tokens_generated": self.tokens_generated(),
            "preferences": len(self.preferences),
            **self.evaluation.state_dict(),
            "elapsed": self.elapsed,
            "recipe": recipe_dict(self.recipe),
        }

    def save(self) -> Path | None:
        """The checkpoint of this step, written by the main process (every process holds the same
        state, but the token counters must be summed by all of them)."""
        state = self.state_dict()
        if not self.world.is_main:
            return None
        return self.folder.save(self.bilevel.t, state, self.model, keep=self.recipe.train.keep)

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        self.bilevel.load_state_dict(state["bilevel"])
        self.reward.load_state_dict(state["reward"])
        for name, critic in self.bilevel.critics.items():
            critic.load_state_dict(state["critics"][name])
        self.generator.set_state(state["generator"])
        # the processes' counters add up to the run's total
        self.policy.tokens_generated = state["tokens_generated"] if self.world.is_main else 0
        self.evaluation.load_state_dict(state)
        self.elapsed = state["elapsed"]
        self.tracker.truncate_after(self.bilevel.t * self.recipe.bilevel.inner_steps)
        self.preferences.truncate(state["preferences"])
