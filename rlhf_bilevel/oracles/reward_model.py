"""`reward-model`: a trained reward model as the gold scorer, Bradley–Terry labels on its scores.

Any Hugging Face sequence-classification model with one output (the usual shape of a
reward model: Skywork-Reward, the OpenAssistant DeBERTa reward models, TRL's
`RewardTrainer` output) scores each (prompt, response); `ScoredOracle` turns two scores
into P(first ≻ second) and exposes `score`, so a run logs the gold reward of its policy.

A model whose classification head was never trained (a plain causal LM loaded as a
classifier gets a random one) is refused: its scores would be noise that looks like labels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from rlhf_bilevel.config import ConfigError, positive
from rlhf_bilevel.oracles.base import ScoredConfig, ScoredOracle, as_oracle_model


@dataclass(frozen=True)
class RewardModelConfig(ScoredConfig):
    model: str | None = field(default=None, metadata={"help": "the reward model: a local folder or a hub id (required)", "path": True})
    dtype: Literal["auto", "float32", "bfloat16"] = field(
        default="float32", metadata={"help": "dtype of the reward model's weights (auto as model.dtype)"}
    )
    batch_size: int = field(default=8, metadata={"help": "conversations per forward pass (> 0)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        positive(self, "batch_size")


def reward_model_oracle(cfg: RewardModelConfig) -> ScoredOracle:
    """The reward model at `oracle.model`: a local folder, or a hub id (local files only unless it is one)."""
    if cfg.model is None:
        raise ConfigError(
            "oracle.model: the reward-model oracle needs a sequence-classification model, "
            "a local folder or a hub id, e.g. oracle.model=path/to/reward-model"
        )
    # transformers takes seconds to import: paid only by runs that use a model as their oracle
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rlhf_bilevel.distributed import resolve_device
    from rlhf_bilevel.lm.model import freeze, resolve, resolve_dtype

    device = resolve_device()
    with as_oracle_model():
        source, local = resolve(cfg.model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local)
        model, info = AutoModelForSequenceClassification.from_pretrained(
            source, dtype=resolve_dtype(cfg.dtype, device), local_files_only=local, output_loading_info=True, use_safetensors=True
        )
    except (OSError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"oracle.model: cannot load {cfg.model!r} as a sequence-classification model: {first}") from None
    if info["missing_keys"]:
        raise ConfigError(
            f"oracle.model: {cfg.model!r} has no trained classification head ({min(info['missing_keys'])} would be random); "
            "the reward-model oracle needs a model trained as a reward model"
        )
    if model.config.num_labels != 1:
        raise ConfigError(f"oracle.model: {cfg.model!r} has {model.config.num_labels} outputs; a reward model has one, the score")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        # the classifier reads its score at the last token that is not padding, found by this id
        model.config.pad_token_id = tokenizer.pad_token_id
    scorer = RewardModelScorer(freeze(model.to(device)), tokenizer, cfg.batch_size)
    return ScoredOracle("reward-model", scorer, cfg)


class RewardModelScorer:
    """fn(prompts, responses) -> [N] scores, `batch_size` conversations per forward pass."""

    def __init__(self, model, tokenizer, batch_size: int):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        # a chat reward model was trained on conversations in its template; others take the
        # prompt and the response as a text pair, as an encoder classifier expects
        self.chat = bool(getattr(tokenizer, "chat_template", None))

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> Tensor:
        size = self.batch_size
        return torch.cat([self.read(prompts[i : i + size], responses[i : i + size]) for i in range(0, len(prompts), size)])

    @torch.no_grad()
    def read(self, prompts: Sequence[str], responses: Sequence[str]) -> Tensor:
        common = dict(return_tensors="pt", padding=True, padding_side="right", truncation=True)
        if self.chat:
            conversations = [
                self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": p}, {"role": "assistant", "content": r}], tokenize=False
                )
                for p, r in zip(prompts, responses)
            ]
            batch = self.tokenizer(conversations, add_special_tokens=False, **common)
        else:
            batch = self.tokenizer(list(prompts), list(responses), **common)
        return self.model(**batch.to(self.model.device)).logits[:, 0].float()
