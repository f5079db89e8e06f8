"""`rlhf-bilevel train`: Algorithm 1 on a Hugging Face causal LM, and everything a run leaves behind.

A run directory holds:

    recipe.yaml          the resolved recipe (after --set), what --resume reads back
    run.json             where relative paths of the recipe were read from, and the number of
                         processes (`world_size`) it was last started with and each one's share
                         of the (global) batch sizes
    metrics.jsonl        one record per inner step ("inner") and per outer step ("outer")
    tensorboard/         the same numbers for TensorBoard
    preferences.jsonl    every pair the oracle labelled, as it arrived (TRL preference format)
    checkpoint-NNNNNN/   every `save_every` outer steps and at the end: adapters/lambda and
                         adapters/lambda_prime (plain peft), reward head, critics, optimisers, RNG
    summary.json         what the run learned: gold score of the reference and of π_λ

The x-axis `step` of metrics.jsonl and TensorBoard counts policy updates: inner step k of
outer iteration t is step t·K + k + 1, and outer iteration t ends at step (t + 1)·K.

Under `accelerate launch` with N processes the run is the same run, split (distributed.py):
batch sizes and every logged number are global, and only the main process writes files.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml

from rlhf_bilevel import estimators as est
from rlhf_bilevel.allocator import return_freed_memory
from rlhf_bilevel.bilevel import Bilevel, NonFiniteError
from rlhf_bilevel.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from rlhf_bilevel.config import ConfigError, read_text
from rlhf_bilevel.critic import MCCritic, TDCritic
from rlhf_bilevel.distributed import World, launched_world
from rlhf_bilevel.evaluate import agreement
from rlhf_bilevel.labelling import make_labeller
from rlhf_bilevel.lm.heads import REWARD_ADAPTER, TokenReward, VocabQHead
from rlhf_bilevel.lm.model import load_base, with_adapters
from rlhf_bilevel.lm.policy import LMPolicy
from rlhf_bilevel.preferences import PreferenceLog, pair_records
from rlhf_bilevel.prompts import load_prompts
from rlhf_bilevel.recipe import Recipe, parse_recipe, read_yaml, recipe_dict
from rlhf_bilevel.sampling import SampledRollouts, consecutive_pairs
from rlhf_bilevel.tracking import Tracker
from rlhf_bilevel.types import ADAPTERS, LAMBDA, Critic, PreferencePairs, Rollout

RECIPE_FILE = "recipe.yaml"
RUN_FILE = "run.json"
SUMMARY_FILE = "summary.json"
EVAL_SEED_OFFSET = 7919
"""Evaluation draws from its own generator, seeded the same at every evaluation: the
reference and every π_λ answer the same prompts with the same random stream (common random
numbers make their gold scores comparable), and training never sees evaluation draws."""


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


class Trainer:
    """Assembles a run from a recipe, then runs, checkpoints and evaluates it."""

    def __init__(self, recipe: Recipe, run_dir: Path, base_dir: Path, world: World = World()):
        """`world`: the processes the run is split over; the main one writes every file."""
        self.recipe, self.run_dir, self.base_dir, self.world = recipe, run_dir, base_dir, world
        # everything that can reject the user's input comes before anything is written
        check_shards(recipe, world)
        if recipe.train.return_freed_memory:
            return_freed_memory()
        self.train_prompts, held_out = load_prompts(recipe.prompts, base_dir)
        self.eval_prompts = held_out or self.train_prompts
        seed = recipe.train.seed
        self.labeller = make_labeller(recipe.oracle, seed, world)
        torch.manual_seed(seed)  # LoRA and head initialisation
        base, tokenizer = load_base(recipe.model, world.device)
        self.adapters = (*ADAPTERS, REWARD_ADAPTER) if recipe.reward.lora else ADAPTERS
        self.model = with_adapters(base, recipe.adapters, extra=self.adapters[len(ADAPTERS):])
        self.policy = LMPolicy(self.model, tokenizer, recipe.rollout, recipe.model.chat_template)
        self.reward = TokenReward.on(self.policy, recipe.reward).to(world.device)
        self.generator = torch.Generator().manual_seed(seed)  # on the CPU: the same draws on every device
        source = SampledRollouts(self.policy, self.train_prompts, self.generator, world)
        self.bilevel = Bilevel(
            self.policy, self.reward, source, self.labeller, self.make_critic, recipe.bilevel, self.generator,
            on_pairs=self.record_pairs, on_inner=self.log_inner, world=world, max_bad_steps=recipe.train.max_bad_steps,
        )
        self.tracker = Tracker(run_dir, enabled=world.is_main, tensorboard=recipe.train.tensorboard)
        self.preferences = PreferenceLog(run_dir / "preferences.jsonl", enabled=world.is_main)
        self.elapsed = 0.0
        self.reference: dict | None = None  # the reference policy's evaluation, made once
        # the reference's held-out pairs and the oracle's verdicts on them: the reward model is scored on
        # them again at every evaluation (not saved: a resumed run draws the same pairs again)
        self.reference_pairs: tuple[Rollout, torch.Tensor] | None = None
        self.last_eval: dict | None = None

    def make_critic(self, adapter: str) -> Critic:
        cfg = self.recipe.bilevel
        if cfg.critic.kind == "mc":
            return MCCritic(cfg.gamma, self.world)
        head = VocabQHead(self.model.get_output_embeddings().weight, self.policy.feature_dim).to(self.world.device)
        return TDCritic(self.policy.state_features, head, cfg.gamma, cfg.critic, self.generator, self.world)

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

    # -- evaluation ----------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, adapter: str | None) -> dict:
        """Two responses to each of `eval_pairs` held-out prompts: the oracle's verdicts against the
        reward model's (agreement, on pairs that never enter training) and the mean gold score.

        Each process samples and scores its shard; the main process asks the oracle about the
        whole batch and alone returns the result (the others return an empty dict).
        """
        n = self.recipe.train.eval_pairs
        prompts = [self.eval_prompts[i % len(self.eval_prompts)] for i in range(n)]
        doubled = [p for p in prompts for _ in range(2)]
        generator = torch.Generator().manual_seed(self.recipe.train.seed + EVAL_SEED_OFFSET)
        with self.policy.adapter(adapter):
            rollout = self.policy.sample(doubled, generator, rows=self.world.shard(2 * n))
        (kl,) = self.world.mean([est.kl_to_reference(rollout)])
        responses = sum(self.world.gather(rollout.responses), [])
        prob = self.labeller.evaluation_labels(prompts, responses[0::2], responses[1::2]).float()
        if adapter is None:
            self.reference_pairs = (rollout, prob)
        agree = self.agreement(rollout, prob)
        if not self.world.is_main:
            return {}
        result = {"prompts": prompts, "responses": responses[0::2]}
        if agree is not None:
            result["eval/agreement"] = agree
        if self.labeller.offers_score:
            result["gold/score"] = self.labeller.score(doubled, responses).mean().item()
        result["eval/kl"] = kl.item()
        return result

    @torch.no_grad()
    def agreement(self, rollout: Rollout, prob: torch.Tensor) -> float | None:
        """The reward model's agreement with the oracle's verdicts `prob` on consecutive pairs of this
        process's `rollout` (its shard), over the whole batch; None when the oracle called every pair a tie."""
        margins = self.world.cat(est.pair_margins(self.reward.token_rewards(rollout), consecutive_pairs(rollout)))
        agree = agreement(margins, prob)
        return agree.mean().item() if len(agree) else None

    def eval_metrics(self) -> dict[str, float]:
        if self.reference is None:
            self.reference = self.evaluate(None)
        elif self.reference_pairs is None:  # resumed: the very pairs of before, whose labels and tokens were counted
            tokens = self.policy.tokens_generated
            self.evaluate(None)
            self.policy.tokens_generated = tokens
            self.labeller.counts.evaluation -= self.recipe.train.eval_pairs
        self.last_eval = self.evaluate(LAMBDA)
        metrics = {k: v for k, v in self.last_eval.items() if "/" in k}
        # the distribution-shift signal: the same reward model on the reference's pairs and on π_λ's
        on_reference = self.agreement(*self.reference_pairs)
        if on_reference is not None:
            metrics["eval/agreement_reference"] = on_reference
        if "gold/score" in self.reference:
            metrics["gold/reference"] = self.reference["gold/score"]
        metrics["oracle/eval_pairs"] = float(self.labeller.counts.evaluation)
        return metrics

    # -- the loop ------------------------------------------------------------------------------------
    def fit(self) -> Summary | None:
        """Runs outer steps up to `bilevel.outer_steps`, from wherever the trainer stands; returns
        the summary on the main process, None on the others."""
        cfg, train = self.recipe.bilevel, self.recipe.train
        # every process has read the run folder (the check for an existing run, a resume's
        # recipe and checkpoint) before the main process writes into it
        self.world.barrier()
        self.write_run_files()
        with self.tracker:
            bar = self.tracker.progress(total=cfg.outer_steps, initial=self.bilevel.t)
            if self.reference is None:
                self.tracker.log(self.eval_metrics(), step=0, phase="outer")
            while self.bilevel.t < cfg.outer_steps:
                start = time.perf_counter()
                try:
                    metrics = self.bilevel.outer_step()
                except NonFiniteError as error:
                    raise NonFiniteError(self.stopped(error)) from None
                t = self.bilevel.t
                if t % train.eval_every == 0 or t == cfg.outer_steps:
                    metrics.update(self.eval_metrics())
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
        (self.run_dir / SUMMARY_FILE).write_text(json.dumps(asdict(summary), indent=1, ensure_ascii=False), encoding="utf-8")
        return summary

    def stopped(self, error: NonFiniteError) -> str:
        """Why the run stopped, and where to go on from: the newest checkpoint, whose weights are all finite."""
        newest = latest_checkpoint(self.run_dir)
        start = f"the newest good checkpoint is {newest}" if newest else "no checkpoint was saved yet"
        return (
            f"{error} (train.max_bad_steps={self.recipe.train.max_bad_steps}); {start}: lower the step sizes "
            f"(bilevel.policy_step.lr, bilevel.reward_step.lr, bilevel.critic.lr) and continue with --resume {self.run_dir}"
        )

    def summary(self) -> Summary:
        final = self.last_eval or {}
        reference = self.reference or {}
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
    def write_run_files(self) -> None:
        if not self.world.is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / RECIPE_FILE).write_text(yaml.safe_dump(recipe_dict(self.recipe), sort_keys=False), encoding="utf-8")
        cfg, n = self.recipe.bilevel, self.world.size
        # the recipe's batch sizes are global; each process draws this share of them
        shard = {
            "trajectories_per_step": cfg.trajectories_per_step // n,
            "pairs_per_step": cfg.pairs_per_step // n,
            "eval_pairs": self.recipe.train.eval_pairs // n,
        }
        run = {"base_dir": str(self.base_dir.resolve()), "world_size": n, "per_process": shard}
        (self.run_dir / RUN_FILE).write_text(json.dumps(run), encoding="utf-8")

    def adapter_tensors(self, adapter: str) -> dict[str, torch.Tensor]:
        return {key: p.detach() for key, p in self.model.named_parameters() if f".{adapter}." in key}

    def state_dict(self) -> dict:
        return {
            "bilevel": self.bilevel.state_dict(),
            "adapters": {name: self.adapter_tensors(name) for name in self.adapters},
            "reward": self.reward.state_dict(),
            "critics": {name: critic.state_dict() for name, critic in self.bilevel.critics.items()},
            "generator": self.generator.get_state(),
            "tokens_generated": self.tokens_generated(),
            "preferences": len(self.preferences),
            "elapsed": self.elapsed,
            "reference": self.reference,
            "last_eval": self.last_eval,
            "recipe": recipe_dict(self.recipe),
        }

    def save(self) -> Path | None:
        """The checkpoint of this step, written by the main process (every process holds the same
        state, but the token counters must be summed by all of them)."""
        state = self.state_dict()
        if not self.world.is_main:
            return None
        return save_checkpoint(
            self.run_dir, self.bilevel.t, state,
            write_extra=lambda folder: self.model.save_pretrained(folder / "adapters"),
            keep=self.recipe.train.keep,
        )

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        self.bilevel.load_state_dict(state["bilevel"])
        params = dict(self.model.named_parameters())
        for tensors in state["adapters"].values():
            for key, value in tensors.items():
                params[key].copy_(value)
        self.reward.load_state_dict(state["reward"])
        for name, critic in self.bilevel.critics.items():
            critic.load_state_dict(state["critics"][name])
        self.generator.set_state(state["generator"])
        # the processes' counters add up to the run's total
        self.policy.tokens_generated = state["tokens_generated"] if self.world.is_main else 0
        self.elapsed = state["elapsed"]
        self.reference, self.last_eval = state["reference"], state["last_eval"]
        self.tracker.truncate_after(self.bilevel.t * self.recipe.bilevel.inner_steps)
        self.preferences.truncate(state["preferences"])


def check_shards(recipe: Recipe, world: World) -> None:
    """Every global batch must split into equal shards: the mean of the per-process estimates is
    the estimate over the whole batch only when each process holds as many rows."""
    cfg = recipe.bilevel
    sizes = {
        "bilevel.trajectories_per_step": cfg.trajectories_per_step,
        "bilevel.pairs_per_step": cfg.pairs_per_step,
        "train.eval_pairs": recipe.train.eval_pairs,
    }
    if cfg.critic.kind == "td":
        sizes["bilevel.critic.batch_size"] = cfg.critic.batch_size
    for name, n in sizes.items():
        if n % world.size:
            raise ConfigError(f"{name}: {n} does not split evenly over {world.size} processes; use a multiple of {world.size}")


def train(recipe: Recipe, run_dir: Path, base_dir: Path) -> Summary | None:
    """A fresh run of `recipe` in `run_dir`; refuses a folder that already holds a run. Under
    `accelerate launch` every process calls it; the main one returns the summary, the others None."""
    world = launched_world(recipe.train.device)
    if (run_dir / RECIPE_FILE).exists():
        raise ConfigError(f"--output-dir: {run_dir} already holds a run; continue it with --resume {run_dir}, or pick another folder")
    return Trainer(recipe, run_dir, base_dir, world).fit()


def resume(run_dir: Path, overrides: list[str] = (), log: Callable[[str], None] = lambda message: None) -> Summary | None:
    """Continues the run in `run_dir` from its newest sound checkpoint (from the start if it has
    none), with as many processes as it is started with now."""
    if not (run_dir / RECIPE_FILE).is_file():
        raise ConfigError(f"--resume: {run_dir} holds no run ({RECIPE_FILE} missing)")
    recipe = parse_recipe(read_yaml(run_dir / RECIPE_FILE), overrides)
    world = launched_world(recipe.train.device)
    text = read_text(run_dir / RUN_FILE, "--resume")
    try:
        base_dir = Path(json.loads(text)["base_dir"])
    except (ValueError, KeyError, TypeError):
        raise ConfigError(f"--resume: {run_dir / RUN_FILE} is damaged; it should read {{\"base_dir\": \"<the recipe's folder>\"}}") from None
    trainer = Trainer(recipe, run_dir, base_dir, world)
    report = log if world.is_main else (lambda message: None)
    checkpoint = latest_checkpoint(run_dir, on_skip=lambda message: report(f"warning: {message}"))
    if checkpoint is not None:
        state = load_checkpoint(checkpoint)
        try:
            trainer.load_state_dict(state)
        except KeyError as error:
            raise CheckpointError(f"{checkpoint}: its state has no {error} (written by another version of rlhf-bilevel?)") from None
        report(f"resuming {run_dir} from {checkpoint.name} (outer step {trainer.bilevel.t} of {recipe.bilevel.outer_steps})")
    else:  # killed before its first checkpoint: start over, keeping no half-logged step
        report(f"{run_dir} has no checkpoint to resume from: starting the run over")
        trainer.tracker.truncate_after(-1)
        trainer.preferences.truncate(0)
    return trainer.fit()
