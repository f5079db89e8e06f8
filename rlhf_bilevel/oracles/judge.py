"""`llm-judge`: a local instruct model asked which of two responses is better, read from its logits.

The judge is shown the question of `oracle.question`, the prompt and the two responses,
named by `oracle.choices` (A and B), and asked to reply with one of the two names. Its
verdict is not generated but read off the next-token distribution, restricted to the two
name tokens: P_AB(A) = softmax(logit_A, logit_B)[A], a probability rather than a coin
flip, with no sampling and no answer to parse. The judge is `positional`: the labeller asks
each pair in both orders, so a judge that likes the first position does not bias the labels. The default judge is the embedded SmolLM2-135M-Instruct: small and fast on a CPU,
and a weak judge; point `oracle.model` at a bigger instruct model for labels worth having.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from rlhf_bilevel.config import ConfigError, positive
from rlhf_bilevel.oracles.base import JudgeConfig, Offers, as_oracle_model, check_batch
from rlhf_bilevel.oracles.pairwise import ask_as_shown

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass(frozen=True)
class LLMJudgeConfig(JudgeConfig):
    model: str | None = field(
        default=None,
        metadata={"help": "the judge, as model.name (smollm2, tiny, a .gguf, a folder, a hub id); null: smollm2", "path": True},
    )
    dtype: Literal["auto", "float32", "bfloat16"] = field(
        default="float32", metadata={"help": "dtype of the judge's weights (auto as model.dtype)"}
    )
    batch_size: int = field(default=8, metadata={"help": "questions per forward pass (> 0)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        positive(self, "batch_size")


def llm_judge_oracle(cfg: LLMJudgeConfig) -> LLMJudge:
    """The judge `oracle.model` names (any `model.name`: smollm2, tiny, a .gguf, a folder, a hub id)."""
    # transformers takes seconds to import: paid only by runs that use a model as their oracle
    from rlhf_bilevel.distributed import resolve_device
    from rlhf_bilevel.lm.model import EMBEDDED, ModelConfig, load_base

    with as_oracle_model():
        model, tokenizer = load_base(ModelConfig(name=cfg.model or EMBEDDED, dtype=cfg.dtype), resolve_device())
    return LLMJudge(model, tokenizer, cfg)


class LLMJudge:
    """A pairwise judge: it offers no gold score, and answers for the order it is shown."""

    name = "llm-judge"
    offers = Offers.COMPARISON
    positional = True

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, cfg: LLMJudgeConfig):
        self.model, self.tokenizer, self.cfg = model, tokenizer, cfg
        # an instruct model answers in its chat format: the reply then starts right after the
        # assistant header, so the names are looked up without a leading space
        self.chat = bool(getattr(tokenizer, "chat_template", None))
        self.choice_ids = answer_tokens(tokenizer, cfg.choices, self.chat)

    def compare(self, prompts: Sequence[str], first: Sequence[str], second: Sequence[str]) -> Tensor:
        check_batch(prompts, first, second)
        return ask_as_shown(self.first_named, self.cfg, prompts, first, second)

    def first_named(self, questions: list[str]) -> Tensor:
        """[N] P(the judge names the response shown first), `oracle.batch_size` questions per forward pass."""
        texts = [self.render(q) for q in questions]
        size = self.cfg.batch_size
        return torch.cat([self.read(texts[i : i + size]) for i in range(0, len(texts), size)])

    def render(self, question: str) -> str:
        if self.chat:
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
            )
        return f"{question}\nAnswer:"

    @torch.no_grad()
    def read(self, texts: list[str]) -> Tensor:
        # left padding puts every question's last token in the last column; the positions count
        # real tokens only, so a padded question is read exactly as it would be alone
        batch = self.tokenizer(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=not self.chat)
        batch = batch.to(self.model.device)
        mask = batch["attention_mask"]
        logits = self.model(
            input_ids=batch["input_ids"],
            attention_mask=mask,
            position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
            logits_to_keep=1,
            use_cache=False,
        ).logits[:, -1]
        return logits[:, self.choice_ids].float().softmax(-1)[:, 0]


def answer_tokens(tokenizer: PreTrainedTokenizerBase, choices: Sequence[str], chat: bool) -> list[int]:
    """The token id of each choice as the first token of the judge's reply; each must be one known token."""
    ids = []
    for choice in choices:
        encoded = tokenizer.encode(choice if chat else f" {choice}", add_special_tokens=False)
        if len(encoded) != 1:
            raise ConfigError(f"oracle.choices: {choice!r} is {len(encoded)} tokens for this judge; each choice must be one token, e.g. A, B")
        if encoded[0] == tokenizer.unk_token_id:
            raise ConfigError(f"oracle.choices: {choice!r} is not in this judge's vocabulary; pick words it knows")
        ids.append(encoded[0])
    if ids[0] == ids[1]:
        raise ConfigError(f"oracle.choices: {list(choices)} are the same token for this judge; pick two that differ")
    return ids
