"""The frozen base model asked about each response: a prior for the reward model before any label.

A head on frozen hidden states learns the oracle only as fast as labels come (docs/reward-model.md),
yet the base model, asked the oracle's question in words, already orders many pairs as the oracle
does. `Judge` asks that question of the base (adapters off) once per sampled response and keeps the
log-odds of the first answer against the second; `TokenReward` adds them, times a weight that φ
learns, as a reward on the response's last token. The weight starts at `scale` and the reward fit's
prior anchors it there, so labels correct the judge rather than replace it.

With `words`, the judge is also asked about each word of a response on its own, once per distinct
word, and the log-odds of the words that stand out from a typical word's add to the response's: the
oracle's notion of sentiment (VADER) is a sum over words, which asking about the whole text blurs.
"""

from __future__ import annotations

import re
import statistics
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from rlhf_bilevel.config import ConfigError
from rlhf_bilevel.lm.trunk import PrefixCache, Trunk


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
    words: bool = field(
        default=False,
        metadata={"help": "also ask about each word of a response alone (once per distinct word) and add the log-odds of those that stand out from a typical word's by over word_margin"},
    )
    word_margin: float = field(
        default=0.4, metadata={"help": "how far (≥ 0, in log-odds) a word's must lie from a typical word's to count"}
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
        if not self.word_margin >= 0:
            raise ConfigError(f"word_margin: must be ≥ 0, got {self.word_margin}")


# what a word is: letters, with one inner apostrophe ("don't"); lower-cased, so "Happy" is asked once
WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)?")
# words with no sentiment of their own: the median of their log-odds is a typical word's, which the judge
# rarely puts at 0 (it leans to one answer whatever it reads)
NEUTRAL_WORDS = (
    "the a an of and or to in on at for with by from as is are was were be been it this that these those i you he "
    "she we they his her its their my your our not no but if so than then there here what which who when where how"
).split()
TEXT = "\ue000"  # a private-use character: where the text goes in the judge's prompt template
WORD_BATCH = 256  # words asked in one forward: short prompts, so a wide batch


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
        # with `words`: what the base said of each word met so far, and of a typical word. Both follow from
        # the frozen base alone, so a resumed run asks again and gets the same
        self.word_log_odds: dict[str, float] = {}
        self.typical: float | None = None
        # every judge prompt is start + text + end; start ends with the question, before the newlines that
        # part it from the text, so that splitting the prompt there changes no token
        asked = f"{cfg.question}\n\n{TEXT}"
        if chat_template:
            asked = tokenizer.apply_chat_template([{"role": "user", "content": asked}], tokenize=False, add_generation_prompt=True)
        else:
            asked = f"{asked}\n"
        start, end = asked.split(TEXT)
        cut = start.rindex(cfg.question) + len(cfg.question)
        self.start, self.before_text, self.end = start[:cut], start[cut:], end + cfg.answer_prefix
        self.start_states: list[tuple[Tensor, Tensor]] | None = None  # the start's KV cache, encoded once

    def prompts(self, texts: Sequence[str]) -> list[str]:
        return [self.start + self.before_text + text + self.end for text in texts]

    def log_odds(self, responses: Sequence[str]) -> Tensor:
        """[N] log P(answers[0]) − log P(answers[1]) of the base's next token after each judge prompt; with
        `words`, plus the `word_evidence` of each response."""
        asked = self.ask(responses)
        return asked + self.word_evidence(responses) if self.cfg.words else asked

    def word_evidence(self, responses: Sequence[str], margin: float | None = None) -> Tensor:
        """[N] Σ over a response's words w (with repeats) of s(w) − s₀ where |s(w) − s₀| > `margin`
        (`cfg.word_margin` unless given): s(w) the judge's log-odds for w asked alone, s₀ the median
        over NEUTRAL_WORDS."""
        words = [[w.lower() for w in WORD.findall(response)] for response in responses]
        if self.typical is None:
            self.typical = statistics.median(self.ask(NEUTRAL_WORDS).tolist())
        new = sorted({w for ws in words for w in ws}.difference(self.word_log_odds))
        for start in range(0, len(new), WORD_BATCH):
            chunk = new[start : start + WORD_BATCH]
            self.word_log_odds.update(zip(chunk, self.ask(chunk).tolist()))
        margin = self.cfg.word_margin if margin is None else margin
        deviations = [[self.word_log_odds[w] - self.typical for w in ws] for ws in words]
        return torch.tensor([sum(d for d in ds if abs(d) > margin) for ds in deviations], device=self.trunk.device)

    @torch.no_grad()
    def ask(self, texts: Sequence[str]) -> Tensor:
        """[N] log P(answers[0]) − log P(answers[1]) of the base's next token after each text's judge prompt.
        The prompts' common start is encoded once per judge: it is most of a word's prompt."""
        trunk, device = self.trunk, self.trunk.device
        rest = [self.before_text + text + self.end for text in texts]
        rest = self.tokenizer(rest, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
        with trunk.adapter(None):
            if self.start_states is None:
                start = self.tokenizer(self.start, return_tensors="pt", add_special_tokens=not self.chat_template)
                encoding = PrefixCache(record=True)
                trunk(start["input_ids"].to(device), start["attention_mask"].to(device), past=encoding)
                self.start_states = encoding.take()
            n, length = len(texts), self.start_states[0][0].shape[-2]
            past = PrefixCache([(k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1)) for k, v in self.start_states])
            # the padding of the shorter rests lies between the start and the rest: masked, and not counted in positions
            mask = torch.cat([torch.ones(n, length, dtype=torch.long, device=device), rest["attention_mask"].to(device)], 1)
            hidden = trunk(rest["input_ids"].to(device), mask, past=past)[:, -1]
            with trunk.autocast():
                # the two answers' logits alone: their difference is the log-odds, the softmax's normaliser cancelling
                logits = (hidden @ trunk.head.weight[self.answer_tokens.to(device)].T).float()
        return logits[:, 0] - logits[:, 1]
