"""The frozen base model asked about each response: a prior for the reward model before any label.

A head on frozen hidden states learns the oracle only as fast as labels come (docs/reward-model.md),
yet the base model, asked the oracle's question in words, already orders many pairs as the oracle
does. `Judge` asks that question of the base (adapters off) once per sampled response and keeps the
log-odds of the first answer against the second; `TokenReward` adds them, times a weight that φ
learns, as a reward on the response's last token. The weight starts at `scale` and the reward fit's
prior anchors it there, so labels correct the judge rather than replace it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from rlhf_bilevel.config import ConfigError
from rlhf_bilevel.lm.trunk import Trunk


@dataclass(frozen=True)
class JudgeConfig:
    question: str | None = field(
        default=None,
        metadata={"help": "what the base model is asked about each response, e.g. 'Is the sentiment of this text positive or negative?'; null: no judge"},
    )
    answers: tuple[str, str] = field(
        default=(" positive", " negative"),
        metadata={"help": "the preferred answer, then the other: the judge's score is log P(first) − log P(second) of their first tokens (two)"},
    )
    answer_prefix: str = field(
        default="The answer is", metadata={"help": "the start of the base's reply, which the answer continues"}
    )
    scale: float = field(
        default=1.0, metadata={"help": "the weight of the judge's log-odds in R_φ before any label (≥ 0); φ learns it from there"}
    )

    @property
    def asks(self) -> bool:
        return self.question is not None

    def __post_init__(self) -> None:
        if self.question is not None and not self.question.strip():
            raise ConfigError("question: ask the judge something, e.g. 'Is the sentiment of this text positive or negative?'")
        if len(self.answers) != 2 or not all(a.strip() for a in self.answers):
            raise ConfigError(f"answers: two non-empty answers, the preferred first, e.g. [' positive', ' negative']; got {list(self.answers)}")
        if not self.scale >= 0:
            raise ConfigError(f"scale: must be ≥ 0, got {self.scale}")


class Judge:
    """The log-odds of the base model (`trunk` with its adapters off) answering `cfg.answers[0]`
    rather than `cfg.answers[1]` when asked `cfg.question` about a response, in the chat format
    where `chat_template`. `tokenizer` pads on the left: the answer follows each prompt's end."""

    def __init__(self, trunk: Trunk, tokenizer: PreTrainedTokenizerBase, chat_template: bool, cfg: JudgeConfig):
        self.trunk, self.tokenizer, self.chat_template, self.cfg = trunk, tokenizer, chat_template, cfg
        tokens = [tokenizer.encode(answer, add_special_tokens=False) for answer in cfg.answers]
        if any(not t for t in tokens) or tokens[0][0] == tokens[1][0]:
            raise ConfigError(f"reward.judge.answers: {list(cfg.answers)} must begin with different tokens of the model's vocabulary")
        self.answer_tokens = torch.tensor([tokens[0][0], tokens[1][0]])

    def prompts(self, responses: Sequence[str]) -> list[str]:
        asked = [f"{self.cfg.question}\n\n{response}" for response in responses]
        if not self.chat_template:
            return [f"{question}\n{self.cfg.answer_prefix}" for question in asked]
        template = self.tokenizer.apply_chat_template
        return [
            template([{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True) + self.cfg.answer_prefix
            for question in asked
        ]

    @torch.no_grad()
    def log_odds(self, responses: Sequence[str]) -> Tensor:
        """[N] log P(answers[0]) − log P(answers[1]) of the base's next token after each judge prompt."""
        trunk = self.trunk
        batch = self.tokenizer(self.prompts(responses), return_tensors="pt", padding=True, add_special_tokens=not self.chat_template)
        with trunk.adapter(None):
            hidden = trunk(batch["input_ids"].to(trunk.device), batch["attention_mask"].to(trunk.device))[:, -1]
            with trunk.autocast():
                logits = trunk.head(hidden).float()
        chosen = logits.log_softmax(-1)[:, self.answer_tokens.to(logits.device)]
        return chosen[:, 0] - chosen[:, 1]
