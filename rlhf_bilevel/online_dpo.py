"""The baseline we compare with: TRL's Online DPO trainer on the same problem, at the same oracle budget.

Everything the two methods could differ in but the algorithm is taken from one `Recipe`:
the base model (`load_base`, so `tiny` and `smollm2` work offline), the LoRA settings
(the λ adapter of `with_adapters`, alone), the train prompts and their chat template, the
horizon, sampling at temperature 1 with no top-k/top-p, the seed, and the oracle.

TRL 1.16's Online DPO takes reward functions, not pairwise judges. It scores the 2B
completions of a step in one call, ordered [first of each prompt …, second of each prompt …],
and prefers the higher-scored one of each pair. `OracleJudge` is such a function that asks
our oracle P(first ≻ second) for the B pairs and scores the Bernoulli-drawn winner 1 and the
loser 0, so every oracle works (pairwise ones too), labels are drawn exactly as
`bilevel.labels: sample` draws them, and every call is B oracle pairs, counted.

A run folder holds:

    adapters/lambda/     the trained LoRA adapter, plain peft (PeftModel.from_pretrained on the base)
    preferences.jsonl    every labelled pair, in the format of `rlhf_bilevel.preferences`
    online_dpo.json      oracle pairs, tokens generated, wall seconds (in all and at each snapshot), and the settings used

It trains on the recipe's `train.device` (`resolve_device`), as `train` does: TRL's own
trainer is told to use the CPU only where that is the CPU.
"""

from __future__ import annotations

import json
import shutil
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Sequence

import datasets
import torch
from peft import PeftModel
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback

from rlhf_bilevel.config import ConfigError
from rlhf_bilevel.distributed import resolve_device
from rlhf_bilevel.lm.model import AdapterConfig, adapter_settings, load_base, with_adapters
from rlhf_bilevel.lm.policy import autocasts
from rlhf_bilevel.labelling import Labeller, make_labeller
from rlhf_bilevel.preferences import PreferenceLog, pair_records
from rlhf_bilevel.prompts import load_prompts
from rlhf_bilevel.recipe import Recipe
from rlhf_bilevel.seeding import GlobalRNG
from rlhf_bilevel.types import LAMBDA, LAMBDA_PRIME, PreferencePairs

RESULT_FILE = "online_dpo.json"
POLICY_NAME = "trl_online_dpo"  # the `policy` field of its preference records


@dataclass(frozen=True)
class OnlineDPOResult:
    oracle_pairs: int
    labels_flipped: int  # training labels flipped by oracle.flip
    tokens_generated: int  # response tokens up to and including EOS, as `LMPolicy.tokens_generated` counts them
    seconds: float  # wall time of the training loop (model loading excluded)
    steps: int
    pairs_per_step: int
    beta: float
    learning_rate: float
    adapter_dir: str
    snapshots: dict[int, str]  # oracle pairs used -> the adapter as it was then (peft folder); the last is adapter_dir
    snapshot_seconds: dict[int, float]  # oracle pairs used -> wall seconds of the training loop by then; the last is `seconds`
    # what TRL ran with, read from its arguments and the trained model: max_new_tokens, pairs_per_step,
    # lora_r, lora_alpha, lora_targets, base_dtype, autocast (TRL's bf16), device
    settings: dict[str, Any]


class OracleJudge:
    """A TRL reward function that is really a pairwise judge: see the module docstring."""

    __name__ = "oracle"  # TRL names its reward columns after the function

    def __init__(self, labeller: Labeller, eos: int, generator: torch.Generator, log: PreferenceLog):
        self.labeller, self.eos, self.generator, self.log = labeller, eos, generator, log
        self.tokens = 0
        self.calls = 0

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], completion_ids: Sequence[list[int]],
                 query: Sequence[str], **_: Any) -> list[float]:
        n = len(completions) // 2
        first, second = list(completions[:n]), list(completions[n:])
        prob, label = self.labeller.training_labels(list(query[:n]), first, second, self.generator)
        self.tokens += sum(response_length(ids, self.eos) for ids in completion_ids)
        rollout = SimpleNamespace(prompts=list(query[:n]) * 2, responses=first + second)  # all pair_records reads
        pairs = PreferencePairs(rollout=rollout, first=torch.arange(n), second=torch.arange(n, 2 * n),
                                weight=torch.full((n,), 1.0 / n), prob=prob, label=label)
        self.log.append(pair_records(pairs, {"policy": POLICY_NAME, "step": self.calls}))
        self.calls += 1
        return torch.cat([label, 1 - label]).tolist()

    @property
    def pairs(self) -> int:
        """Oracle pairs labelled so far."""
        return self.labeller.counts.training


def response_length(ids: Sequence[int], eos: int) -> int:
    """Tokens up to and including the first EOS (TRL pads after it with the pad token, which may be EOS)."""
    return ids.index(eos) + 1 if eos in ids else len(ids)


def rendered(prompts: Sequence[str], tokenizer: PreTrainedTokenizerBase, chat_template: bool) -> list[str]:
    """Each prompt as the text the model reads: in the chat template when `LMPolicy` would use it.

    With a template TRL adds no special tokens, as `LMPolicy` does; without one TRL still
    adds none (a BOS, for tokenizers that have one, is the only difference).
    """
    if not (chat_template and getattr(tokenizer, "chat_template", None)):
        return list(prompts)
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]


def single_adapter(base: PreTrainedModel, cfg: AdapterConfig) -> PeftModel:
    """The λ adapter of `with_adapters` alone, trainable: one policy with the project's LoRA settings."""
    model = with_adapters(base, cfg)
    model.delete_adapter(LAMBDA_PRIME)
    model.set_adapter(LAMBDA)
    for key, p in model.named_parameters():
        p.requires_grad_(f".{LAMBDA}." in key)
    return model


class Snapshots(TrainerCallback):
    """Saves the adapter whenever another `every` oracle pairs have been used, for curves against feedback;
    the final adapter is saved by the caller."""

    def __init__(self, model: PeftModel, judge: OracleJudge, folder: Path, every: int | None, budget: int):
        self.model, self.judge, self.folder, self.every, self.budget = model, judge, folder, every, budget
        self.saved: dict[int, str] = {}
        self.clock: dict[int, float] = {}  # time.perf_counter() at each snapshot, before its saving

    def on_step_end(self, args, state, control, **kwargs):
        if self.every and self.judge.pairs % self.every == 0 and self.judge.pairs < self.budget:
            self.clock[self.judge.pairs] = time.perf_counter()
            target = self.folder / f"pairs-{self.judge.pairs:06d}"
            self.model.save_pretrained(target, selected_adapters=[LAMBDA])
            self.saved[self.judge.pairs] = str(target / LAMBDA)


def train_online_dpo(recipe: Recipe, output_dir: Path, base_dir: Path, pairs: int, beta: float = 0.1,
                     learning_rate: float | None = None, snapshot_every: int | None = None) -> OnlineDPOResult:
    """Trains TRL's Online DPO on `recipe`'s problem until the oracle has labelled exactly `pairs` pairs.

    Each step labels `recipe.bilevel.pairs_per_step` pairs (B prompts × 2 completions), so
    `pairs` must be a multiple of B. `beta` is DPO's β; `learning_rate` (AdamW, constant,
    no weight decay) defaults to the recipe's `bilevel.policy_step.lr`. Relative prompt
    paths are read from `base_dir`, as `train` reads them. With `snapshot_every`, the
    adapter is also saved to `snapshots/` each time that many more pairs have been used.
    """
    with warnings.catch_warnings():  # its "experimental API" notice is for us: tests/test_online_dpo.py catches a change
        warnings.simplefilter("ignore")
        from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    per_step = recipe.bilevel.pairs_per_step
    if pairs <= 0 or pairs % per_step:
        raise ConfigError(f"pairs: must be a positive multiple of bilevel.pairs_per_step={per_step}, got {pairs}")
    if beta <= 0:
        raise ConfigError(f"beta: must be > 0, got {beta}")
    lr = recipe.bilevel.policy_step.lr if learning_rate is None else learning_rate
    if (output_dir / RESULT_FILE).exists():
        raise ConfigError(f"--output-dir: {output_dir} already holds an Online DPO run; pick another folder")
    train_prompts, _ = load_prompts(recipe.prompts, base_dir)
    seed = recipe.train.seed
    labeller = make_labeller(recipe.oracle, seed)
    device = resolve_device(recipe.train.device)
    with GlobalRNG(seed):  # LoRA initialisation, as in `train`
        base, tokenizer = load_base(recipe.model, device)
        eos = tokenizer.eos_token_id
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        # the model's own generation defaults would change the sampled distribution (see LMPolicy)
        base.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=pad)
        model = single_adapter(base, recipe.adapters)

    output_dir.mkdir(parents=True, exist_ok=True)
    log = PreferenceLog(output_dir / "preferences.jsonl")
    judge = OracleJudge(labeller, eos, torch.Generator().manual_seed(seed), log)
    dataset = datasets.Dataset.from_dict(
        {"prompt": rendered(train_prompts, tokenizer, recipe.model.chat_template), "query": list(train_prompts)}
    )
    steps = pairs // per_step
    args = OnlineDPOConfig(
        output_dir=str(output_dir / "trl"), max_steps=steps, per_device_train_batch_size=per_step,
        gradient_accumulation_steps=1, learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, beta=[beta], max_new_tokens=recipe.rollout.max_new_tokens,
        max_length=recipe.rollout.max_prompt_tokens + recipe.rollout.max_new_tokens,
        temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0, missing_eos_penalty=None,
        seed=seed, data_seed=seed, use_cpu=device.type == "cpu", report_to=[], save_strategy="no", logging_steps=1,
        disable_tqdm=True, dataloader_num_workers=0,
        # TRL autocasts to bf16 by default; the comparison runs it as our trainer computes, where a
        # CPU without avx512_bf16 would otherwise emulate every matmul of its LoRA (several times slower)
        bf16=autocasts(recipe.rollout, base.dtype),
    )
    snapshots = Snapshots(model, judge, output_dir / "snapshots", snapshot_every, pairs)
    trainer = OnlineDPOTrainer(model=model, reward_funcs=judge, args=args, train_dataset=dataset,
                               processing_class=tokenizer, callbacks=[snapshots])
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    if judge.pairs != pairs:  # TRL decides how many steps run; the budget is the point of the comparison
        raise RuntimeError(f"Online DPO used {judge.pairs} oracle pairs, expected {pairs}")
    model.save_pretrained(output_dir / "adapters", selected_adapters=[LAMBDA])
    shutil.rmtree(output_dir / "trl", ignore_errors=True)  # TRL's scratch folder: with save_strategy "no", empty
    settings = {
        "max_new_tokens": args.max_new_tokens, "pairs_per_step": args.per_device_train_batch_size * args.gradient_accumulation_steps,
        **adapter_settings(model), "base_dtype": str(base.dtype).removeprefix("torch."), "autocast": args.bf16,
        "device": str(next(model.parameters()).device),
    }
    result = OnlineDPOResult(
        oracle_pairs=judge.pairs, labels_flipped=labeller.counts.flipped, tokens_generated=judge.tokens, seconds=seconds, steps=steps,
        pairs_per_step=per_step, beta=beta, learning_rate=lr, adapter_dir=str(output_dir / "adapters" / LAMBDA),
        snapshots={**snapshots.saved, judge.pairs: str(output_dir / "adapters" / LAMBDA)},
        snapshot_seconds={**{p: t - start for p, t in snapshots.clock.items()}, judge.pairs: seconds}, settings=settings,
    )
    (output_dir / RESULT_FILE).write_text(json.dumps(asdict(result), indent=1), encoding="utf-8")
    return result
