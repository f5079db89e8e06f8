"""The token-level MDP around a causal LM: the `Policy` protocol on a peft model with two adapters.

A state s_h is the prompt plus the first h response tokens, an action is the next token,
EOS is absorbing (the mask stops after it), and the horizon H is `max_new_tokens`.
The reference policy π_ref is the same model with its adapters disabled, and that one
reference forward pass also yields the hidden states that the reward head and the Q head
read: their features are the frozen base's, shared by both adapters. The reward head may read
an earlier layer of that same pass (`reward_layer`). Scoring runs the trunk (the decoder) alone
and applies the output layer by chunks (`lm/logits.py`).
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Literal, Sequence

import torch
import torch.nn.functional as F
from peft import PeftModel
from peft.helpers import disable_input_dtype_casting
from torch import Tensor
from transformers import Cache, DynamicCache, PreTrainedTokenizerBase

from rlhf_bilevel.allocator import heap_reuse
from rlhf_bilevel.compat import keep_cache_under_checkpointing
from rlhf_bilevel.config import ConfigError
from rlhf_bilevel.lm.logits import chosen_log_probs, log_softmax_head
from rlhf_bilevel.types import LAMBDA, AdapterSwitch, Rollout, rollout_context


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

    def rows(self, index: slice) -> LMContext:
        reward_features = None if self.reward_features is None else self.reward_features[index]
        return LMContext(self.input_ids[index], self.attention_mask[index], self.prompt_len, self.features[index], reward_features)


class LMPolicy(AdapterSwitch):
    """Samples from π_λ exactly (temperature 1, no top-k or top-p), so the score-function
    estimators see the distribution they differentiate."""

    def __init__(self, model: PeftModel, tokenizer: PreTrainedTokenizerBase, cfg: RolloutConfig, chat_template: bool):
        # a copy that pads and cuts prompts on the left (their end is what the response follows); the
        # caller's tokenizer keeps its own sides
        self.tokenizer = copy.deepcopy(tokenizer)
        self.tokenizer.padding_side = self.tokenizer.truncation_side = "left"
        self.model, self.cfg = model, cfg
        self.chat_template = chat_template and bool(getattr(tokenizer, "chat_template", None))
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos
        self.active: str | None = LAMBDA
        self.tokens_generated = 0
        # the hidden layer whose states each rollout keeps for the reward head, as `trunk_layers` numbers
        # them (TokenReward.on sets it); None: the last, which every rollout keeps anyway
        self.reward_layer: int | None = None
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            keep_cache_under_checkpointing(model)
        self.head: torch.nn.Linear = model.get_output_embeddings()
        self.autocasting = autocasts(cfg, self.head.weight.dtype)
        if any(p.requires_grad for p in self.head.parameters()):
            raise ConfigError("adapters.target_modules: the output layer (lm_head) cannot carry an adapter; leave it out")
        self.decoder = model.get_base_model().get_decoder()
        self.scorer = torch.compile(self.decoder, dynamic=True) if cfg.compile else self.decoder

    @property
    def device(self) -> torch.device:
        """Where the model is, and every tensor of its rollouts."""
        return self.model.get_input_embeddings().weight.device

    @property
    def feature_dim(self) -> int:
        return self.model.config.hidden_size

    @property
    def num_layers(self) -> int:
        """Decoder layers of the trunk: `trunk_layers` numbers its hidden states 0 … num_layers."""
        return self.model.config.num_hidden_layers

    @property
    def vocab_size(self) -> int:
        return self.model.get_output_embeddings().weight.shape[0]

    # -- adapters -----------------------------------------------------------------------------------
    @contextmanager
    def _activated(self) -> Iterator[None]:
        if self.active is None:
            with self.model.disable_adapter():
                yield
        else:
            self.model.set_adapter(self.active)
            for p in self.parameters_of(self.active):  # set_adapter may freeze adapters it switches off
                p.requires_grad_(True)
            yield

    def parameters_of(self, name: str, below_layer: int | None = None) -> list[Tensor]:
        """The weights of adapter `name`; with `below_layer` k, those of decoder layers before k only: all
        that hidden state k (`trunk_layers`) depends on, and so all that get a gradient through it."""
        modules = self.model if below_layer is None else self.decoder.layers[:below_layer]
        return [p for key, p in modules.named_parameters() if f".{name}." in key]

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

    @contextmanager
    def autocast(self) -> Iterator[None]:
        """bf16 autocast of the block where `rollout.autocast` asks for it; autocast then casts the adapters'
        float32 weights, and peft leaves their inputs as they are."""
        with torch.autocast(self.device.type, torch.bfloat16, enabled=self.autocasting):
            with disable_input_dtype_casting(self.model, active=self.autocasting):
                yield

    def trunk(self, input_ids: Tensor, attention_mask: Tensor, past: Cache | None = None) -> Tensor:
        """[N, T, d] the last hidden state (after the final norm) at each of `input_ids` under the active
        adapter: what the output layer reads. `input_ids` continue what `past` holds (if anything);
        `attention_mask` covers both."""
        return self.trunk_layers(input_ids, attention_mask, past)[-1]

    def trunk_layers(self, input_ids: Tensor, attention_mask: Tensor, past: Cache | None = None, layers: Sequence[int] = ()) -> list[Tensor]:
        """As `trunk`, in the same pass: the hidden states [N, T, d] at each of `layers`, then the last one.
        Layers are numbered as transformers numbers `hidden_states`: 0 the embeddings, k the output of
        decoder layer k (counting from 1), `num_layers` the last hidden state. The pass keeps the
        states of the layers asked for only."""
        position_ids = positions(attention_mask, input_ids.shape[1])
        with self._activated(), self.autocast():
            # transformers checkpoints layers in training mode only; with no dropout the mode changes nothing else
            self.model.train(self.cfg.gradient_checkpointing and torch.is_grad_enabled())
            try:
                out = self.scorer(
                    input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=past,
                    use_cache=past is not None, output_hidden_states=list(layers) if layers else False,
                )
            finally:
                self.model.eval()
        return [out.hidden_states[k] for k in layers] + [out.last_hidden_state]

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
        with self._activated(), self.autocast():
            tokens, taken = self.decode(prompt_ids, prompt_mask, self.prompt_cache(prompts, prompt_ids, prompt_mask, growing=True), uniforms)
        is_eos = tokens == self.eos
        # 1 up to and including the first EOS, then 0: EOS is absorbing
        mask = ((is_eos.long().cumsum(-1) - is_eos.long()) == 0).float()
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
        return Rollout(
            prompts=list(prompts),
            responses=responses,
            tokens=tokens,
            mask=mask,
            logp=logp * mask,
            ref_logp=ref_logp * mask,
            weight=torch.full((n,), 1.0 / n, device=self.device),
            context=LMContext(input_ids, attention_mask, prompt_len, features, reward_features),
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
            past = self.prompt_cache(prompts, input_ids[:, :prompt_len], attention_mask[:, :prompt_len])
            start = 0 if past is None else prompt_len - 1
            *at_layer, hidden = (h[:, -(horizon + 1) :] for h in self.trunk_layers(input_ids[:, start:], attention_mask, past, layers))
            with self.autocast():
                ref_logp = chosen_log_probs(hidden[:, :-1], self.head, input_ids[:, prompt_len:])
        return ref_logp, hidden.float(), at_layer[0].float() if at_layer else None

    def decode(self, prompt_ids: Tensor, prompt_mask: Tensor, past: Cache | None, uniforms: Tensor) -> tuple[Tensor, Tensor]:
        """Up to H tokens per row under the active adapter, token h of row i drawn by `inverse_cdf` at
        uniforms[i, h], with the KV cache (`past` holds all of each prompt but its last token, or is
        None). A row leaves the batch, and its cache, at its EOS: each step computes only the rows
        still running, where generate() would carry finished rows to the end (a fifth of the steps'
        rows in a default run). Returns the tokens [N, H] (padding after EOS) and log π of each drawn
        token [N, H] (0 after EOS), in float64."""
        n, horizon = uniforms.shape
        tokens = torch.full((n, horizon), self.pad, dtype=torch.long, device=self.device)
        taken = torch.zeros(n, horizon, dtype=torch.float64, device=self.device)
        running = torch.arange(n, device=self.device)  # the rows the cache holds, in its order
        inputs, mask = (prompt_ids, prompt_mask) if past is None else (prompt_ids[:, -1:], prompt_mask)
        cache = DynamicCache() if past is None else past
        for h in range(horizon):
            out = self.model(input_ids=inputs, attention_mask=mask, position_ids=positions(mask, inputs.shape[1]),
                             cache=cache, use_cache=True, logits_to_keep=1)
            token, logp = inverse_cdf(out.logits[:, -1], uniforms[running, h])
            tokens[running, h], taken[running, h] = token, logp
            going = token != self.eos
            if not going.all():
                if not going.any():
                    break
                keep = going.nonzero().squeeze(-1)
                cache.batch_select_indices(keep)
                running, token, mask = running[keep], token[keep], mask[keep]
            mask = torch.cat([mask, mask.new_ones(len(running), 1)], 1)
            inputs = token.unsqueeze(-1)
        return tokens, taken

    def prompt_cache(self, prompts: Sequence[str], prompt_ids: Tensor, prompt_mask: Tensor, growing: bool = False) -> Cache | None:
        """The KV cache of every row's prompt but its last token, under the active adapter, computed
        once per distinct prompt and copied to the rows that share it: the two responses of a pair
        (eq. 7) share their prompt, and encoding it is about a third of drawing them. A `PrefixCache`
        to be read, or with `growing` a DynamicCache that decoding extends. None for one-token
        prompts, which leave nothing to cache. Under grad mode the cache carries the graph, so the
        gradient of what reads it reaches the prompt's encoding once, through every row."""
        if prompt_ids.shape[1] < 2:
            return None
        distinct: dict[str, int] = {}
        row_of = torch.tensor([distinct.setdefault(p, len(distinct)) for p in prompts], device=self.device)
        first = torch.tensor([prompts.index(p) for p in distinct], device=self.device)
        encoding = PrefixCache(record=True)
        self.trunk(prompt_ids[first, :-1], prompt_mask[first, :-1], past=encoding)
        states = [(k.index_select(0, row_of), v.index_select(0, row_of)) for k, v in encoding.take()]
        return DynamicCache(states) if growing else PrefixCache(states)

    def log_probs(self, rollout: Rollout) -> Tensor:
        """[N, H, V] log π(·|s_h) under the active adapter, differentiable in its weights. Rows that share
        a prompt (the pairs of eq. 7) encode it once: the λ′ step's forward and backward skip a copy of
        every pair's prompt, with gradient checkpointing too (a `PrefixCache` replays as it ran). The
        output layer runs by chunks (`log_softmax_head`): its backward never holds the whole softmax."""
        ctx: LMContext = rollout.context
        shared = len(set(rollout.prompts)) < len(rollout)
        past = self.prompt_cache(rollout.prompts, ctx.input_ids[:, : ctx.prompt_len], ctx.attention_mask[:, : ctx.prompt_len]) if shared else None
        start = 0 if past is None else ctx.prompt_len - 1
        hidden = self.trunk(ctx.input_ids[:, start:-1], ctx.attention_mask[:, :-1], past=past)[:, -rollout.horizon :]
        with self.autocast():
            return log_softmax_head(hidden, self.head)

    def state_features(self, rollout: Rollout) -> Tensor:
        return rollout.context.features

    def reward_features(self, rollout: Rollout) -> Tensor:
        """[N, H + 1, d] the base's hidden states at `reward_layer` at s_0 … s_H (the last layer's,
        `state_features`, when it is None), as the rollout's reference pass kept them."""
        ctx: LMContext = rollout.context
        return ctx.features if self.reward_layer is None else ctx.reward_features

    def adapter_features(self, rollout: Rollout, adapter: str, layer: int | None = None) -> Tensor:
        """[N, H + 1, d] hidden states at s_0 … s_H under `adapter`, differentiable in its weights: the
        features of a head that trains its own LoRA (the reference pass's are frozen). Those of
        `layer`, as `trunk_layers` numbers them; None: the last."""
        ctx: LMContext = rollout.context
        with self.adapter(adapter):
            hidden = self.trunk_layers(ctx.input_ids, ctx.attention_mask, layers=() if layer is None else (layer,))[0]
        return hidden[:, ctx.prompt_len - 1 :].float()


class PrefixCache(DynamicCache):
    """A KV cache that attention reads and never extends: layer l attends to the prefix the cache was
    built with, then to the new states. A layer that gradient checkpointing replays in the backward
    pass therefore reads exactly what its first pass read, where a DynamicCache would have been
    extended a second time.

    With `record`, the new states of each layer's first pass are kept until `take` hands them out.
    Holding them no longer matters: a checkpointed layer's replay closure holds this cache, and the
    cache holding that layer's outputs would be a cycle through the autograd graph, which Python's
    garbage collector cannot see, so every step would leak its graph."""

    def __init__(self, prefix: Sequence[tuple[Tensor, Tensor]] | None = None, record: bool = False):
        super().__init__(prefix)
        self.written: dict[int, tuple[Tensor, Tensor]] | None = {} if record else None

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if self.written is not None:
            self.written.setdefault(layer_idx, (key_states, value_states))
        if layer_idx >= len(self.layers) or not self.layers[layer_idx].is_initialized:
            return key_states, value_states
        layer = self.layers[layer_idx]
        return torch.cat([layer.keys, key_states], -2), torch.cat([layer.values, value_states], -2)

    def take(self) -> list[tuple[Tensor, Tensor]]:
        """(keys, values) of every layer's new states, as its first pass wrote them; recording ends."""
        written, self.written = self.written, None
        if written is None:
            raise RuntimeError("PrefixCache.take: the cache records nothing, or its states were taken already")
        return [written[layer] for layer in range(len(written))]


def autocasts(cfg: RolloutConfig, base_dtype: torch.dtype) -> bool:
    """Whether forward passes over a base of `base_dtype` run under bf16 autocast (`rollout.autocast`)."""
    return base_dtype == torch.bfloat16 if cfg.autocast == "auto" else cfg.autocast


def positions(attention_mask: Tensor, length: int) -> Tensor:
    """Position ids of the last `length` tokens of `attention_mask`'s rows: they count real tokens
    only, as generate() numbers left-padded prompts."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, attention_mask.shape[1] - length :]


def inverse_cdf(logits: Tensor, uniforms: Tensor) -> tuple[Tensor, Tensor]:
    """One token per row of `logits` [N, V], drawn from their softmax by inverting its CDF at the
    row's uniform u [N]: token k where cdf(k − 1) ≤ u·cdf(V) < cdf(k), which has probability π(k)
    exactly (up to float64 rounding). Returns the tokens [N] and their log π [N].

    One uniform per row and step, drawn up front, rather than a multinomial on a stream shared
    by the batch: a row's tokens depend on its own logits and uniforms only, not on which
    other rows it is batched with (nor on which of them have finished).
    """
    log_probs = F.log_softmax(logits.double(), -1)
    cdf = log_probs.exp().cumsum(-1)
    token = torch.searchsorted(cdf, (uniforms * cdf[:, -1]).unsqueeze(-1), right=True).clamp(max=logits.shape[-1] - 1)
    return token.squeeze(-1), log_probs.gather(-1, token).squeeze(-1)
