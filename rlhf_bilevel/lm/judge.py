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
Words are read in float32 (`exact`): a word's score is kept for the rest of the run, so it must not
depend on which other words shared its batch, as a bf16 one does.

With anchors, a word's score also reads the base's state after the word's prompt along the direction
from words the second answer fits to words the first answer fits (`AnchorDirection`): the base's own
sense of the words, beyond the two answer tokens it happens to put next.
"""

from __future__ import annotations

import copy
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
    anchors_first: tuple[str, ...] = field(
        default=(),
        metadata={"help": "with words: words the first answer fits, e.g. [good, nice, excellent]; with anchors_second, each word's score adds anchor_weight × its place along the direction between the two sets (docs/reward-model.md)"},
    )
    anchors_second: tuple[str, ...] = field(
        default=(), metadata={"help": "with words: words the second answer fits, e.g. [bad, nasty, poor]"}
    )
    anchor_weight: float = field(
        default=1.0, metadata={"help": "the weight (≥ 0) of a word's anchor score, which is in the judge's log-odds units, against its log-odds"}
    )

    @property
    def asks(self) -> bool:
        return self.question is not None

    @property
    def anchored(self) -> bool:
        return bool(self.anchors_first)

    def __post_init__(self) -> None:
        if self.question is not None and not self.question.strip():
            raise ConfigError("question: ask the judge something, e.g. 'Is the sentiment of this text positive or negative?'")
        if len(self.answers) != 2 or not all(a.strip() for a in self.answers):
            raise ConfigError(f"answers: two non-empty answers, the preferred first, e.g. [' positive', ' negative']; got {list(self.answers)}")
        if not self.scale >= 0:
            raise ConfigError(f"scale: must be ≥ 0, got {self.scale}")
        if not self.word_margin >= 0:
            raise ConfigError(f"word_margin: must be ≥ 0, got {self.word_margin}")
        if not self.anchor_weight >= 0:
            raise ConfigError(f"anchor_weight: must be ≥ 0, got {self.anchor_weight}")
        if bool(self.anchors_first) != bool(self.anchors_second):
            empty = "anchors_second" if self.anchors_first else "anchors_first"
            raise ConfigError(f"{empty}: anchors need words for both answers; give both lists or neither")
        for name in ("anchors_first", "anchors_second"):
            for word in getattr(self, name):
                if not WORD.fullmatch(word):
                    raise ConfigError(f"{name}: {word!r} is not one word (letters, one inner apostrophe at most)")
        if self.anchored and not self.words:
            raise ConfigError("anchors_first: anchors score words, so they need words: true")
        if set(map(str.lower, self.anchors_first)) & set(map(str.lower, self.anchors_second)):
            raise ConfigError("anchors_second: a word cannot anchor both answers")


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
        self.cfg = cfg
        tokens = [tokenizer.encode(answer, add_special_tokens=False) for answer in cfg.answers]
        if any(not t for t in tokens) or tokens[0][0] == tokens[1][0]:
            raise ConfigError(f"reward.judge.answers: {list(cfg.answers)} must begin with different tokens of the model's vocabulary")
        answer_tokens = torch.tensor([tokens[0][0], tokens[1][0]])
        # with `words`: what the base said of each word met so far, and of a typical word. Both follow from
        # the frozen base alone, read in float32 so that the batch a word came in leaves no trace (in bf16
        # up to 0.25 log-odds on SmolLM2, docs/results.md): a resumed run, or another process, asks again
        # and gets the same scores
        # (log-odds, anchor score) of each word met, and of NEUTRAL_WORDS, read apart; kept apart so that
        # any anchor weight combines them without another pass
        self.word_parts: dict[str, tuple[float, float]] = {}
        self.neutral_parts: list[tuple[float, float]] | None = None
        self.anchor: AnchorDirection | None = None
        # every judge prompt is start + text + end; start ends with the question, before the newlines that
        # part it from the text, so that splitting the prompt there changes no token
        asked = f"{cfg.question}\n\n{TEXT}"
        if chat_template:
            asked = tokenizer.apply_chat_template([{"role": "user", "content": asked}], tokenize=False, add_generation_prompt=True)
        else:
            asked = f"{asked}\n"
        start, end = asked.split(TEXT)
        cut = start.rindex(cfg.question) + len(cfg.question)
        start, self.before_text, self.end = start[:cut], start[cut:], end + cfg.answer_prefix
        self.response_reader = PromptReader(trunk, tokenizer, start, chat_template, answer_tokens)
        self.word_reader = PromptReader(exact(trunk), tokenizer, start, chat_template, answer_tokens) if cfg.words else None

    def prompts(self, texts: Sequence[str]) -> list[str]:
        return [self.response_reader.start + rest for rest in self.rests(texts)]

    def rests(self, texts: Sequence[str]) -> list[str]:
        """What follows the prompts' common start: the text, and the start of the reply."""
        return [self.before_text + text + self.end for text in texts]

    def log_odds(self, responses: Sequence[str]) -> Tensor:
        """[N] log P(answers[0]) − log P(answers[1]) of the base's next token after each judge prompt; with
        `words`, plus the `word_evidence` of each response."""
        asked = self.ask(responses)
        return asked + self.word_evidence(responses) if self.cfg.words else asked

    def word_evidence(self, responses: Sequence[str], margin: float | None = None, anchor_weight: float | None = None) -> Tensor:
        """[N] Σ over a response's words w (with repeats) of s(w) − s₀ where |s(w) − s₀| > `margin`
        (`cfg.word_margin` unless given): s(w) the `score_words` of w at `anchor_weight` (`cfg.anchor_weight`
        unless given), s₀ their median over NEUTRAL_WORDS."""
        weight = self.cfg.anchor_weight if anchor_weight is None else anchor_weight
        words = [[w.lower() for w in WORD.findall(response)] for response in responses]
        if self.neutral_parts is None:
            self.neutral_parts = self.parts(self.read_words(NEUTRAL_WORDS))
        typical = statistics.median(log_odds + weight * anchor for log_odds, anchor in self.neutral_parts)
        scores = self.scores_of({w for ws in words for w in ws}, weight)
        margin = self.cfg.word_margin if margin is None else margin
        deviations = [[scores[w] - typical for w in ws] for ws in words]
        return torch.tensor([sum(d for d in ds if abs(d) > margin) for ds in deviations], device=self.response_reader.trunk.device)

    def score_words(self, words: Sequence[str], anchor_weight: float | None = None) -> Tensor:
        """[N] s(w): the judge's log-odds for each word asked alone; with anchors, plus `anchor_weight`
        (`cfg.anchor_weight` unless given) times its anchor score, read from the same forward pass."""
        scores = self.scores_of(set(words), self.cfg.anchor_weight if anchor_weight is None else anchor_weight)
        return torch.tensor([scores[w] for w in words])

    def scores_of(self, words: set[str], weight: float) -> dict[str, float]:
        """s(w) of each word at anchor weight `weight`; a word is read once per judge, whatever the weight."""
        new = sorted(words.difference(self.word_parts))
        for start in range(0, len(new), WORD_BATCH):
            chunk = new[start : start + WORD_BATCH]
            self.word_parts.update(zip(chunk, self.parts(self.read_words(chunk))))
        return {w: self.word_parts[w][0] + weight * self.word_parts[w][1] for w in words}

    def parts(self, hidden: Tensor) -> list[tuple[float, float]]:
        """(log-odds, anchor score) of each state [N, d] of a word's prompt; the anchor score is 0 without anchors."""
        log_odds = self.word_reader.answer_log_odds(hidden)
        if not self.cfg.anchored:
            return [(x, 0.0) for x in log_odds.tolist()]
        if self.anchor is None:
            self.anchor = self.fit_anchor()
        return list(zip(log_odds.tolist(), self.anchor.score(hidden).tolist()))

    def fit_anchor(self) -> AnchorDirection:
        """The anchors' direction, standardised on the states of NEUTRAL_WORDS and the anchors: fixed words,
        so a resumed run scores every word as before."""
        first, second = ([w.lower() for w in words] for words in (self.cfg.anchors_first, self.cfg.anchors_second))
        hidden = self.read_words([*NEUTRAL_WORDS, *first, *second])
        log_odds = self.word_reader.answer_log_odds(hidden)
        _, *anchors = torch.split(torch.arange(len(hidden)), [len(NEUTRAL_WORDS), len(first), len(second)])
        return AnchorDirection.fit(hidden, log_odds, *anchors)

    def ask(self, texts: Sequence[str]) -> Tensor:
        """[N] log P(answers[0]) − log P(answers[1]) of the base's next token after each text's judge prompt."""
        return self.response_reader.answer_log_odds(self.read(texts))

    def read(self, texts: Sequence[str]) -> Tensor:
        """[N, d] the base's last hidden state after each text's judge prompt, where it puts the answer."""
        return self.response_reader.read(self.rests(texts))

    def read_words(self, words: Sequence[str]) -> Tensor:
        """[N, d] as `read`, of words, in float32."""
        return self.word_reader.read(self.rests(words))


def exact(trunk: Trunk) -> Trunk:
    """`trunk` computing in float32, without autocast: itself where it already does; over its own model
    where only autocast stands in the way; else over a float32 copy of the model (frozen, its adapters
    kept but never switched on). A row's float32 result moves with the rest of its batch by about 1e-5,
    its bf16 one by up to 0.25 log-odds on SmolLM2."""
    if trunk.head.weight.dtype == torch.float32:
        return trunk if not trunk.autocasting else Trunk(trunk.model, autocast=False, gradient_checkpointing=False, compile=False)
    model = copy.deepcopy(trunk.model).float().requires_grad_(False)
    return Trunk(model, autocast=False, gradient_checkpointing=False, compile=False)


class PromptReader:
    """The base (`trunk` with its adapters off) reading prompts that all begin with `start`, which it
    encodes once: most of a word's prompt. `tokenizer` pads on the left: the answer follows each prompt's end."""

    def __init__(self, trunk: Trunk, tokenizer: PreTrainedTokenizerBase, start: str, chat_template: bool, answer_tokens: Tensor):
        self.trunk, self.tokenizer, self.start, self.answer_tokens = trunk, tokenizer, start, answer_tokens
        self.special_tokens = not chat_template  # a chat template writes its own
        self.start_states: list[tuple[Tensor, Tensor]] | None = None

    @torch.no_grad()
    def read(self, rests: Sequence[str]) -> Tensor:
        """[N, d] the base's last hidden state after `start` + each of `rests`."""
        trunk, device = self.trunk, self.trunk.device
        rest = self.tokenizer(list(rests), return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
        with trunk.adapter(None):
            if self.start_states is None:
                start = self.tokenizer(self.start, return_tensors="pt", add_special_tokens=self.special_tokens)
                encoding = PrefixCache(record=True)
                trunk(start["input_ids"].to(device), start["attention_mask"].to(device), past=encoding)
                self.start_states = encoding.take()
            n, length = len(rests), self.start_states[0][0].shape[-2]
            past = PrefixCache([(k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1)) for k, v in self.start_states])
            # the padding of the shorter rests lies between the start and the rest: masked, and not counted in positions
            mask = torch.cat([torch.ones(n, length, dtype=torch.long, device=device), rest["attention_mask"].to(device)], 1)
            return trunk(rest["input_ids"].to(device), mask, past=past)[:, -1]

    def answer_log_odds(self, hidden: Tensor) -> Tensor:
        """[N] log P(answers[0]) − log P(answers[1]) of the next token, from the base's last hidden states [N, d]."""
        trunk = self.trunk
        with torch.no_grad(), trunk.autocast():
            # the two answers' logits alone: their difference is the log-odds, the softmax's normaliser cancelling
            logits = (hidden.to(trunk.head.weight.dtype) @ trunk.head.weight[self.answer_tokens.to(hidden.device)].T).float()
        return logits[:, 0] - logits[:, 1]


@dataclass(frozen=True)
class AnchorDirection:
    """A word's place between two sets of anchor words, in the base's state after the word's judge prompt.

    States are standardised per dimension (`mean`, `spread`) over a fixed reference set of words; the
    direction is the first anchors' mean standardised state minus the second's. A word's score is its
    projection on that direction, in units that give the two anchor sets the same separation as the
    judge's own log-odds give them, so that the two add. (Its offset is left to the typical word's
    score, which `Judge.word_evidence` subtracts.)
    """

    mean: Tensor  # [d]
    spread: Tensor  # [d]
    direction: Tensor  # [d], per log-odds unit

    @classmethod
    def fit(cls, hidden: Tensor, log_odds: Tensor, first: Tensor, second: Tensor) -> AnchorDirection:
        """From the states [N, d] and log-odds [N] of the reference words, of which `first` and `second` index the anchors."""
        mean, spread = hidden.mean(0), hidden.std(0) + 1e-6
        standard = (hidden - mean) / spread
        direction = standard[first].mean(0) - standard[second].mean(0)
        projection = standard @ direction
        # the anchors' separation in log-odds, made positive: the direction, not the base's answer, says which is first
        units = (log_odds[first].mean() - log_odds[second].mean()).abs() / (projection[first].mean() - projection[second].mean())
        return cls(mean, spread, direction * units)

    def score(self, hidden: Tensor) -> Tensor:
        """[N] the anchor score of each state [N, d]."""
        return ((hidden.float() - self.mean) / self.spread) @ self.direction
