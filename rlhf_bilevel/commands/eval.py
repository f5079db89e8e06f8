"""`rlhf-bilevel eval`: loads a trained policy (a run's newest checkpoint, or a peft adapter) with its
recipe's oracle and held-out prompts, evaluates it (evaluate.py) and writes the report (report.py);
with `--all-checkpoints`, the over-optimisation curve of every checkpoint (overoptimisation.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Sequence

from peft import PeftModel

from rlhf_bilevel.checkpoint import CheckpointError, checkpoints, load_checkpoint
from rlhf_bilevel.config import ConfigError
from rlhf_bilevel.distributed import resolve_device
from rlhf_bilevel.evaluate import EvalConfig, evaluate
from rlhf_bilevel.labelling import make_labeller
from rlhf_bilevel.lm.heads import REWARD_ADAPTER, TokenReward
from rlhf_bilevel.lm.model import load_base
from rlhf_bilevel.lm.policy import LMPolicy
from rlhf_bilevel.overoptimisation import BEST_OF, CURVE_FILE, PLOT_FILE, CurveConfig, curve, plot
from rlhf_bilevel.preflight import check_output_dir
from rlhf_bilevel.prompts import load_prompts
from rlhf_bilevel.recipe import load_recipe
from rlhf_bilevel.report import plain, write_eval
from rlhf_bilevel.run_folder import RunFolder, adapter_folder
from rlhf_bilevel.types import LAMBDA

__all__ = [
    "BEST_OF", "CurveConfig", "EvalConfig", "curve_run", "describe", "describe_curve", "eval_adapter", "eval_checkpoint", "eval_run",
    "held_out_prompts", "load_checkpoint_policy", "load_policy", "load_run",
]


def load_policy(recipe, adapter: Path):
    """The recipe's base model with the peft adapter at `adapter` as π_λ; π_ref is the same base with it disabled."""
    if not (adapter / "adapter_config.json").is_file():
        raise ConfigError(f"--adapter: {adapter} is not a peft adapter folder (adapter_config.json missing)")
    base, tokenizer = load_base(recipe.model, resolve_device(recipe.train.device))
    model = PeftModel.from_pretrained(base, str(adapter), adapter_name=LAMBDA)
    model.eval()
    return LMPolicy(model, tokenizer, recipe.rollout, recipe.model.chat_template)


def load_checkpoint_policy(folder: RunFolder, checkpoint: Path, recipe):
    """(policy, reward) of one checkpoint of a run: π_λ's adapter on the recipe's base, and the reward model."""
    policy = load_policy(recipe, adapter_folder(checkpoint, LAMBDA))
    if recipe.reward.lora:
        policy.model.load_adapter(str(adapter_folder(checkpoint, REWARD_ADAPTER)), adapter_name=REWARD_ADAPTER)
    reward = TokenReward.on(policy, recipe.reward).to(policy.device)
    reward.load_state_dict(load_checkpoint(checkpoint)["reward"])
    return policy, reward


def load_run(run_dir: Path, overrides: Sequence[str] = ()):
    """(recipe, base_dir, policy, reward) of the newest sound checkpoint of the run in `run_dir`.

    `overrides` change the recipe for this evaluation only, e.g. `oracle.kind=llm-judge`.
    """
    folder = RunFolder(run_dir)
    recipe = folder.read_recipe("--run", overrides)
    base_dir = folder.base_dir("--run")
    checkpoint = folder.latest_checkpoint()
    if checkpoint is None:
        raise ConfigError(f"--run: {run_dir} has no checkpoint yet; train it further (--resume) or evaluate an --adapter")
    return (recipe, base_dir, *load_checkpoint_policy(folder, checkpoint, recipe))


def held_out_prompts(recipe, base_dir: Path) -> list[str]:
    train, held_out = load_prompts(recipe.prompts, base_dir)
    return held_out or train


def eval_checkpoint(folder: RunFolder, checkpoint: Path, cfg: EvalConfig, overrides: Sequence[str] = ()) -> dict:
    """`evaluate` on one checkpoint of the run in `folder` (policy and reward model), with the run's oracle and held-out prompts."""
    recipe = folder.read_recipe("--run", overrides)
    policy, reward = load_checkpoint_policy(folder, checkpoint, recipe)
    result = evaluate(policy, make_labeller(recipe.oracle), held_out_prompts(recipe, folder.base_dir("--run")), cfg, reward)
    result["source"] = {"run": str(folder.path), "checkpoint": checkpoint.name, "oracle": recipe.oracle.kind, "model": recipe.model.name}
    return result


def eval_run(run_dir: Path, cfg: EvalConfig, out: Path | None = None, overrides: Sequence[str] = ()) -> dict:
    """Evaluates the newest checkpoint of the run in `run_dir` and writes the report to `out` (default RUN/eval)."""
    check_output_dir(out or run_dir / "eval", "--out")
    folder = RunFolder(run_dir)
    folder.read_recipe("--run", overrides)  # a folder without a run is named before its checkpoints are looked for
    checkpoint = folder.latest_checkpoint()
    if checkpoint is None:
        raise ConfigError(f"--run: {run_dir} has no checkpoint yet; train it further (--resume) or evaluate an --adapter")
    result = eval_checkpoint(folder, checkpoint, cfg, overrides)
    write_eval(result, out or run_dir / "eval", name=run_dir.name, metrics_file=folder.metrics)
    return result


def eval_adapter(adapter: Path, recipe_file: Path, cfg: EvalConfig, out: Path | None = None, overrides: Sequence[str] = ()) -> dict:
    """Evaluates a peft adapter trained by any tool on the recipe's model, oracle and held-out prompts."""
    check_output_dir(out or adapter / "eval", "--out")
    recipe = load_recipe(recipe_file, list(overrides))
    labeller = make_labeller(recipe.oracle)
    prompts = held_out_prompts(recipe, recipe_file.resolve().parent)
    result = evaluate(load_policy(recipe, adapter), labeller, prompts, cfg)
    result["source"] = {"adapter": str(adapter), "oracle": recipe.oracle.kind, "model": recipe.model.name}
    write_eval(result, out or adapter / "eval", name=adapter.name)
    return result


def describe(result: dict) -> str:
    """The few lines the command prints."""
    lines = [f"win rate vs reference: {result['win_rate']} over {result['prompts']} prompts"]
    if "gold" in result:
        lines.append(f"gold score: policy {result['gold']['policy']}, reference {result['gold']['reference']}")
    if "agreement" in result:
        lines.append(
            f"reward-model agreement: on policy pairs {result['agreement']['policy']}, on reference pairs {result['agreement']['reference']}"
        )
    lines.append(f"KL to reference {result['kl']:.3f}; response tokens {result['length']['policy']:.1f} (reference {result['length']['reference']:.1f})")
    return "\n".join(lines)


def curve_run(run_dir: Path, cfg: CurveConfig, out: Path | None = None, overrides: Sequence[str] = ()) -> dict:
    """The over-optimisation curve of the run in `run_dir`, one point per checkpoint that loads, and the
    best-of-n curve under its newest reward model; writes overoptimisation.json and .png to `out` (default RUN/eval)."""
    recipe, base_dir, policy, reward = load_run(run_dir, overrides)  # the newest checkpoint that loads: the final φ
    labeller = make_labeller(recipe.oracle)
    if not labeller.offers_score:
        kind = recipe.oracle.kind
        raise ConfigError(f"--all-checkpoints: the oracle '{kind}' gives no gold score; pick one that does, e.g. --set oracle.kind=sentiment")
    prompts = held_out_prompts(recipe, base_dir)
    prompts = list(prompts[: cfg.eval.prompts] if cfg.eval.prompts else prompts)
    skipped = []

    folder = RunFolder(run_dir)
    adapters = (LAMBDA, REWARD_ADAPTER) if recipe.reward.lora else (LAMBDA,)

    def states() -> Iterator[tuple[int, dict]]:
        for step, path in checkpoints(run_dir):
            try:
                yield step, folder.load(path, policy.model, adapters)
            except CheckpointError as error:
                skipped.append(str(error))

    result = {
        "source": {"run": str(run_dir), "oracle": recipe.oracle.kind, "model": recipe.model.name},
        **curve(policy, reward, labeller, prompts, states(), cfg),
        "skipped": skipped,
    }
    out = out or run_dir / "eval"
    out.mkdir(parents=True, exist_ok=True)
    (out / CURVE_FILE).write_text(json.dumps(plain(result), indent=1, ensure_ascii=False), encoding="utf-8")
    plot(result, out / PLOT_FILE, title=run_dir.name)
    return result


def describe_curve(result: dict) -> str:
    """The table `eval --all-checkpoints` prints."""
    ref = result["reference"]
    lines = [
        f"over-optimisation curve of {result['source']['run']} on {result['prompts']} prompts × {result['responses_per_prompt']} responses",
        f"{'point':>12} {'√KL':>6} {'gold':>22} {'proxy (own φ)':>22} {'proxy (final φ)':>22}",
        f"{'reference':>12} {0.0:6.3f} {str(ref['gold']):>22} {'':>22} {str(ref['proxy_final']):>22}",
    ]
    for p in result["checkpoints"]:
        lines.append(f"{'step ' + str(p['step']):>12} {p['sqrt_kl']:6.3f} {str(p['gold']):>22} {str(p['proxy']):>22} {str(p['proxy_final']):>22}")
    for r in result["best_of_n"]["rows"]:
        lines.append(f"{'best-of-' + str(r['n']):>12} {r['sqrt_kl']:6.3f} {str(r['gold']):>22} {'':>22} {str(r['proxy']):>22}")
    lines += [f"skipped: {reason}" for reason in result["skipped"]]
    return "\n".join(lines)
