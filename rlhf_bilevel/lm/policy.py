"""The token-level MDP around a causal LM: the `Policy` protocol on a peft model with two adapters.

A state s_h is the prompt plus the first h response tokens, an action is the next token,
EOS is absorbing (the mask stops after it), and the horizon H is `max_new_tokens`.
The reference policy π_ref is the same model with its adapters disabled, and that one
reference forward pass also yields the hidden states that the reward head and the Q head
read: their features are the frozen base's, shared by both adapters. The reward head may read
an earlier layer of that same pass (`reward_layer`). Scoring runs the trunk (`lm/trunk.py`) and
applies the output layer by chunks (`lm/logits.py`).
"""

from __future__ import annotations

import copy
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Literal, Sequence

import torch
from peft import PeftModel
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from rlhf_bilevel.allocator import heap_reuse
from rlhf_bilevel.lm.decoding import decode, through_eos
from rlhf_bilevel.lm.judge import Judge
from rlhf_bilevel.lm.logits import chosen_log_probs, log_softmax_head
from rlhf_bilevel.lm.trunk import Trunk
from rlhf_bilevel.types import Rollout, rollout_context


@dataclass(frozen=True)
class RolloutConfig:
    max_new_tokens: int = field(default=32, metadata={"help": "the horizon H: tokens generated per response (> 0)"})
    max_prompt_tokens: int = field(
        default=256, metadata={"help": "longer prompts are cut from the left, keeping their end (> 0); with max_new_tokens within the model's context"}
    )
    # auto: where the base's weights are bf16, whose adapters then compute in bf16 off the activations
    # as they are, where peft would keep a float32 copy of every adapted layer's input for the backward
    # pass (measured on SmolLM2: 966 → 692 MB saved by log π of 8 rows). The adapters' weights, their
    # gradients and Adam stay float32
    autocast: Literal["auto", True, False] = field(
        default="auto", metadata={"help": "bf16 autocast of every forward, adapters included; auto: where the base's weights are bf16"}
    )
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "recompute the trunk's activations in the backward of log π: memory for time"}
    )
    # each adapter, and the reference, compiles once on first use (seconds on a CPU, which needs a C++
    # compiler), then every call reuses it
    compile: bool = field(
        default=False,
        metadata={"help": "torch.compile the scoring forwards with dynamic shapes (the reference pass, log π, the reward adapter's features); sampling stays eager"},
    )


@rollout_context
@dataclass
class LMContext:
    """What a rollout needs to be scored again: the token ids and the base's state features."""

    input_ids: Tensor  # [N, P + H]: the left-padded prompt, then the response padded after EOS
    attention_mask: Tensor  # [N, P + H]
    prompt_len: int  # P
    features: Tensor  # [N, H + 1, d] the base's last hidden state at s_0 … s_H, float32, detached
    # [N, H + 1, d] the base's hidden state at the policy's `reward_layer` at s_0 … s_H, float32, detached;
    # None when the reward reads the last layer, whose states are `features`
    reward_features: Tensor | None = None
    judged: Tensor | None = None  # [N] the policy's `judge`'s log-odds of each response; None without one

    def rows(self, index: slice) -> LMContext:
        reward_features = None if self.reward_features is None else self.reward_features[index]
        judged = None if self.judged is None else self.judged[index]
        return LMContext(self.input_ids[index], self.attention_mask[index], self.prompt_len, self.features[index], reward_features, judged)


class LMPolicy:
    """Samples from π_λ exactly (`lm/decoding.py`), and scores its rollouts, on the `trunk` of a peft
    model whose adapters are λ and λ′."""

    def __init__(self, model: PeftModel, tokenizer: PreTrainedTokenizerBase, cfg: RolloutConfig, chat_template: bool):
        # a copy that pads and cuts prompts on the left (their end is what the response follows); the
        # caller's tokenizer keeps its own sides
        self.tokenizer = copy.deepcopy(tokenizer)
        self.tokenizer.padding_side = self.tokenizer.truncation_side = "left"
        self.model, self.cfg = model, cfg
        self.chat_template = chat_template and bool(getattr(tokenizer, "chat_template", None))
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos
        self.tokens_generated = 0
        # the hidden layer whose states each rollout keeps for the reward head, as `Trunk.hidden_states`
        # numbers them (TokenReward.on sets it); None: the last, which every rollout keeps anyway
        self.reward_layer: int | None = None
        # asked about every response sampled from now on (TokenReward.on sets it with `reward.judge`)
        self.judge: Judge | None = None
        self.autocasting = autocasts(cfg, model.get_output_embeddings().weight.dtype)
        self.trunk = Trunk(model, self.autocasting, cfg.gradient_checkpointing, cfg.compile)
        self.head = self.trunk.head

    @property
    def active(self) -> str | None:
        return self.trunk.active

    def adapter(self, name: str | None) -> AbstractContextManager[None]:
        """`None` disables the adapters: the reference policy."""
        return self.trunk.adapter(name)

    def parameters_of(self, name: str, below_layer: int | None = None) -> list[Tensor]:
        return self.trunk.parameters_of(name, below_layer)

    @property
    def device(self) -> torch.device:
        """Where the model is, and every tensor of its rollouts."""
        return self.trunk.device

    @property
    def feature_dim(self) -> int:
        return self.trunk.feature_dim

    @property
    def vocab_size(self) -> int:
        return self.head.weight.shape[0]

    # -- the MDP ------------------------------------------------------------------------------------
    def encode(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        if self.chat_template:
            texts = [
                self.tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
                for p in prompts
            ]
        else:
            texts = list(prompts)
        batch = self.tokenizer(
            texts, return_tensors="pt", padding=True, truncation=True,
            max_length=self.cfg.max_prompt_tokens, add_special_tokens=not self.chat_template,
        )
        return batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)

    @torch.no_grad()
    @heap_reuse()
    def sample(self, prompts: Sequence[str], generator: torch.Generator, rows: slice = slice(None)) -> Rollout:
        """One response per prompt; with `rows`, only those rows of the batch (one process's shard),
        each with the very tokens it gets when the whole batch is drawn at once: the batch is padded
        and its random numbers drawn as a whole, and row i reads only its own."""
        prompt_ids, prompt_mask = self.encode(prompts)
        horizon = self.cfg.max_new_tokens
        uniforms = torch.rand(len(prompts), horizon, generator=generator, dtype=torch.float64)[rows].to(self.device)
        prompts, prompt_ids, prompt_mask = list(prompts)[rows], prompt_ids[rows], prompt_mask[rows]
        n, prompt_len = len(prompts), prompt_ids.shape[1]
        with self.trunk.activated(), self.trunk.autocast():
            past = self.trunk.prompt_cache(prompts, prompt_ids, prompt_mask, growing=True)
            tokens, taken = decode(self.model, prompt_ids, prompt_mask, past, uniforms, self.eos, self.pad)
        mask = through_eos(tokens, self.eos)
        logp = taken.float()
        input_ids = torch.cat([prompt_ids, tokens], 1)
        attention_mask = torch.cat([prompt_mask, torch.ones_like(tokens)], 1)
        ref_logp, features, reward_features = self.reference(prompts, input_ids, attention_mask, prompt_len)
        self.tokens_generated += int(mask.sum())
        lengths = mask.sum(-1).long()
        responses = [
            self.tokenizer.decode(row[: int(length) - int(row[int(length) - 1] == self.eos)], skip_special_tokens=True).strip()
            for row, length in zip(tokens, lengths)
        ]
        judged = None if self.judge is None else self.judge.log_odds(responses)
        return Rollout(
            prompts=list(prompts),
            responses=responses,
            tokens=tokens,
            mask=mask,
            logp=logp * mask,
            ref_logp=ref_logp * mask,
            weight=torch.full((n,), 1.0 / n, device=self.device),
            context=LMContext(input_ids, attention_mask, prompt_len, features, reward_features, judged),
            adapter=self.active,
        )

    def reference(
        self, prompts: Sequence[str], input_ids: Tensor, attention_mask: Tensor, prompt_len: int
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """The reference pass over sampled rows: log π_ref of each response token [N, H], the base's
        features at s_0 … s_H [N, H + 1, d] (float32), which the reward and Q heads read, and those
        of `reward_layer` [N, H + 1, d] (None when it is None), which the reward head reads instead."""
        horizon = input_ids.shape[1] - prompt_len
        layers = () if self.reward_layer is None else (self.reward_layer,)
        with self.adapter(None):
            past = self.trunk.prompt_cache(prompts, input_ids[:, :prompt_len], attention_mask[:, :prompt_len])
            start = 0 if past is None else prompt_len - 1
            *at_layer, hidden = (h[:, -(horizon + 1) :] for h in self.trunk.hidden_states(input_ids[:, start:], attention_mask, past, layers))
            with self.trunk.autocast():
                ref_logp = chosen_log_probs(hidden[:, :-1], self.head, input_ids[:, prompt_len:])
        return ref_logp, hidden.float(), at_layer[0].float() if at_layer else None

    def log_probs(self, rollout: Rollout) -> Tensor:
        """[N, H, V] log π(·|s_h) under the active adapter, differentiable in its weights. Rows that share
        a prompt (the pairs of eq. 7) encode it once: the λ′ step's forward and backward skip a copy of
        every pair's prompt, with gradient checkpointing too (a `PrefixCache` replays as it ran). The
        output layer runs by chunks (`log_softmax_head`): its backward never holds the whole softmax."""
        ctx: LMContext = rollout.context
        shared = len(set(rollout.prompts)) < len(rollout)
        past = self.trunk.prompt_cache(rollout.prompts, ctx.input_ids[:, : ctx.prompt_len], ctx.attention_mask[:, : ctx.prompt_len]) if shared else None
        start = 0 if past is None else ctx.prompt_len - 1
        hidden = self.trunk(ctx.input_ids[:, start:-1], ctx.attention_mask[:, :-1], past=past)[:, -rollout.horizon :]
        with self.trunk.autocast():
            return log_softmax_head(hidden, self.head)

    def state_features(self, rollout: Rollout) -> Tensor:
        return rollout.context.features

    def reward_features(self, rollout: Rollout) -> Tensor:
        """[N, H + 1, d] the base's hidden states at `reward_layer` at s_0 … s_H (the last layer's,
        `state_features`, when it is None), as the rollout's reference pass kept them."""
        ctx: LMContext = rollout.context
        return ctx.features if self.reward_layer is None else ctx.reward_features

    def judged(self, rollout: Rollout) -> Tensor:
        """[N] the `judge`'s log-odds of each response, as sampling kept them."""
        return rollout.context.judged

    def adapter_features(self, rollout: Rollout, adapter: str, layer: int | None = None) -> Tensor:
        """[N, H + 1, d] hidden states at s_0 … s_H under `adapter`, differentiable in its weights: the
        features of a head that trains its own LoRA (the reference pass's are frozen). Those of
        `layer`, as `Trunk.hidden_states` numbers them; None: the last."""
        ctx: LMContext = rollout.context
        with self.adapter(adapter):
            hidden = self.trunk.hidden_states(ctx.input_ids, ctx.attention_mask, layers=() if layer is None else (layer,))[0]
        return hidden[:, ctx.prompt_len - 1 :].float()


def autocasts(cfg: RolloutConfig, base_dtype: torch.dtype) -> bool:
    """Whether forward passes over a base of `base_dtype` run under bf16 autocast (`rollout.autocast`)."""
    return base_dtype == torch.bfloat16 if cfg.autocast == "auto" else cfg.autocast
