"""`rlhf-bilevel train`: builds the parts of a run from its recipe and runs them (trainer.py).

What a run leaves behind is described in run_folder.py; the loop, its logs and checkpoints in
trainer.py; the algorithm in bilevel.py.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from peft import PeftModel

from rlhf_bilevel.allocator import return_freed_memory
from rlhf_bilevel.bilevel import Bilevel
from rlhf_bilevel.checkpoint import CheckpointError
from rlhf_bilevel.collectives import Collectives, World
from rlhf_bilevel.config import ConfigError
from rlhf_bilevel.critic import MCCritic, RLOOCritic, TDCritic
from rlhf_bilevel.distributed import launched_world
from rlhf_bilevel.environment import describe, reproducible, run_threads
from rlhf_bilevel.evaluate import PeriodicEval
from rlhf_bilevel.labelling import make_labeller
from rlhf_bilevel.lm.heads import REWARD_ADAPTER, TokenReward, VocabQHead
from rlhf_bilevel.lm.model import load_base, with_adapters
from rlhf_bilevel.lm.policy import LMPolicy
from rlhf_bilevel.preferences import PreferenceLog
from rlhf_bilevel.preflight import MemoryEstimate, check_output_dir, preflight
from rlhf_bilevel.prompts import load_prompts
from rlhf_bilevel.recipe import Recipe
from rlhf_bilevel.run_folder import RunFolder, run_record
from rlhf_bilevel.sampling import SampledRollouts
from rlhf_bilevel.seeding import GlobalRNG
from rlhf_bilevel.tracking import Tracker
from rlhf_bilevel.trainer import Summary, Trainer
from rlhf_bilevel.types import ADAPTERS, Critic


def initial_parts(recipe: Recipe, device: torch.device) -> tuple[PeftModel, tuple[str, ...], LMPolicy, TokenReward]:
    """What a run of `recipe` starts from: the base with its fresh adapters (the peft model and their
    names), as the policy, and the reward model as initialised. The initialisations draw from torch's
    global streams; whatever they draw, R_φ₀ is the same, as the heads' mean starts the same everywhere
    (0 with `reward.center`, leaving the judge's prior alone)."""
    base, tokenizer = load_base(recipe.model, device)
    adapters = (*ADAPTERS, REWARD_ADAPTER) if recipe.reward.lora else ADAPTERS
    model = with_adapters(base, recipe.adapters, extra=adapters[len(ADAPTERS):])
    policy = LMPolicy(model, tokenizer, recipe.rollout, recipe.model.chat_template)
    return model, adapters, policy, TokenReward.on(policy, recipe.reward).to(device)


def build(recipe: Recipe, run_dir: Path, base_dir: Path, world: Collectives = World()) -> Trainer:
    """The parts of a run of `recipe` in `run_dir`, relative paths read from `base_dir`; `world`: the
    processes the run is split over (the main one writes every file). Nothing is written yet."""
    # everything that can reject the user's input comes before anything large is allocated
    check_shards(recipe, world)
    if recipe.train.return_freed_memory:
        return_freed_memory()
    train_prompts, held_out = load_prompts(recipe.prompts, base_dir)
    seed = recipe.train.seed
    labeller = make_labeller(recipe.oracle, seed, world)
    init_rng = GlobalRNG(seed)  # LoRA and head initialisation: peft and torch draw from the global streams
    with init_rng:
        model, adapters, policy, reward = initial_parts(recipe, world.device)
    generator = torch.Generator().manual_seed(seed)  # on the CPU: the same draws on every device
    cfg = recipe.bilevel

    def make_critic(adapter: str) -> Critic:
        if cfg.critic.kind == "mc":
            return MCCritic(cfg.gamma, world)
        if cfg.critic.kind == "rloo":
            return RLOOCritic(cfg.gamma, world)
        with init_rng:
            head = VocabQHead(model.get_output_embeddings().weight, policy.feature_dim).to(world.device)
        return TDCritic(policy.state_features, head, cfg.gamma, cfg.critic, generator, world)

    source = SampledRollouts(policy, train_prompts, generator, world)
    bilevel = Bilevel(policy, reward, source, labeller, make_critic, cfg, generator, world=world, max_bad_steps=recipe.train.max_bad_steps)
    folder = RunFolder(run_dir)
    return Trainer(
        recipe, folder, world, model, adapters, policy, reward, labeller, generator, bilevel,
        evaluation=PeriodicEval(policy, labeller, reward, held_out or train_prompts, recipe.train.eval_pairs, seed, world),
        tracker=Tracker(run_dir, enabled=world.is_main, tensorboard=recipe.train.tensorboard),
        preferences=PreferenceLog(folder.preferences, enabled=world.is_main),
    )


def check_shards(recipe: Recipe, world: Collectives) -> None:
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
    # a prompt's responses baseline one another only where one process holds them all
    g = cfg.responses_per_prompt
    if cfg.critic.kind == "rloo" and (cfg.trajectories_per_step // world.size) % g:
        raise ConfigError(
            f"bilevel.trajectories_per_step: {cfg.trajectories_per_step} over {world.size} processes splits a prompt's "
            f"{g} responses; use a multiple of {g * world.size}"
        )


def run(trainer: Trainer, base_dir: Path) -> Summary | None:
    """Records this start in the run folder, then trains up to `bilevel.outer_steps`."""
    # every process has read the run folder (the check for an existing run, a resume's
    # recipe and checkpoint) before the main process writes into it
    trainer.world.barrier()
    if trainer.world.is_main:
        record = run_record(trainer.recipe, base_dir, trainer.world.size)
        record["environment"] = describe(trainer.world.device, trainer.policy.head.weight.dtype, trainer.policy.autocasting)
        trainer.folder.write_start(trainer.recipe, record)
    return trainer.fit()


def check(recipe: Recipe, run_dir: Path, base_dir: Path, world: Collectives | None = None) -> MemoryEstimate | None:
    """Everything that can refuse a fresh run of `recipe` in `run_dir` short of loading a model:
    the folder, the batch shards, the model's context, the memory estimate (returned) and the prompts."""
    world = world or launched_world(recipe.train.device)
    check_output_dir(run_dir, "--output-dir")
    RunFolder(run_dir).check_new()
    check_shards(recipe, world)
    estimate = preflight(recipe, world.device)
    load_prompts(recipe.prompts, base_dir)
    return estimate


def train(recipe: Recipe, run_dir: Path, base_dir: Path) -> Summary | None:
    """A fresh run of `recipe` in `run_dir`; refuses a folder that already holds a run. Under
    `accelerate launch` every process calls it; the main one returns the summary, the others None."""
    world = launched_world(recipe.train.device)
    check(recipe, run_dir, base_dir, world)
    with reproducible(run_threads(recipe.train.threads), world.device):
        return run(build(recipe, run_dir, base_dir, world), base_dir)


def resume(run_dir: Path, overrides: list[str] = (), log: Callable[[str], None] = lambda message: None) -> Summary | None:
    """Continues the run in `run_dir` from its newest sound checkpoint (from the start if it has
    none), with as many processes as it is started with now."""
    check_output_dir(run_dir, "--resume")
    folder = RunFolder(run_dir)
    recipe = folder.read_recipe("--resume", overrides)
    world = launched_world(recipe.train.device)
    base_dir = folder.base_dir("--resume")
    preflight(recipe, world.device)
    with reproducible(run_threads(recipe.train.threads), world.device):
        return resumed(build(recipe, run_dir, base_dir, world), folder, base_dir, log)


def resumed(trainer: Trainer, folder: RunFolder, base_dir: Path, log: Callable[[str], None]) -> Summary | None:
    """`trainer` from the newest sound checkpoint of its run (from the start if it has none), run to its end."""
    run_dir, recipe, world = folder.path, trainer.recipe, trainer.world
    report = log if world.is_main else (lambda message: None)
    checkpoint = folder.latest_checkpoint(on_skip=lambda message: report(f"warning: {message}"))
    if checkpoint is not None:
        try:
            trainer.load_state_dict(folder.load(checkpoint, trainer.model, trainer.adapters))
        except KeyError as error:
            raise CheckpointError(f"{checkpoint}: its state has no {error} (written by another version of rlhf-bilevel?)") from None
        report(f"resuming {run_dir} from {checkpoint.name} (outer step {trainer.bilevel.t} of {recipe.bilevel.outer_steps})")
    else:  # killed before its first checkpoint: start over, keeping no half-logged step
        report(f"{run_dir} has no checkpoint to resume from: starting the run over")
        trainer.tracker.truncate_after(-1)
        trainer.preferences.truncate(0)
    return run(trainer, base_dir)
