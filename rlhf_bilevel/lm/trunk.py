"""The trunk of a peft causal LM: its decoder, run under one of its adapters (or none) at a time.

The trunk yields the hidden states that the output layer, the reward head and the Q head read.
It runs without the output layer, which its callers apply by chunks (`lm/logits.py`), and it
encodes a prompt that several rows share once (`prompt_cache`).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from peft import PeftModel
from peft.helpers import disable_input_dtype_casting
from torch import Tensor
from transformers import Cache, DynamicCache

from rlhf_bilevel.compat import keep_cache_under_checkpointing
from rlhf_bilevel.config import ConfigError
from rlhf_bilevel.types import AdapterSwitch


class Trunk(AdapterSwitch):
    """The decoder of `model` under the `active` adapter (`adapter(name)` switches it; None: the base)."""

    def __init__(self, model: PeftModel, autocast: bool, gradient_checkpointing: bool, compile: bool):
        self.model, self.autocasting, self.checkpointing = model, autocast, gradient_checkpointing
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            keep_cache_under_checkpointing(model)
        self.head: torch.nn.Linear = model.get_output_embeddings()
        if any(p.requires_grad for p in self.head.parameters()):
            raise ConfigError("adapters.target_modules: the output layer (lm_head) cannot carry an adapter; leave it out")
        self.decoder = model.get_base_model().get_decoder()
        self.scorer = torch.compile(self.decoder, dynamic=True) if compile else self.decoder

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @property
    def feature_dim(self) -> int:
        return self.model.config.hidden_size

    @property
    def num_layers(self) -> int:
        """Decoder layers: `hidden_states` numbers the trunk's states 0 … num_layers."""
        return self.model.config.num_hidden_layers

    @contextmanager
    def activated(self) -> Iterator[None]:
        """The `active` adapter set on the peft model for the block."""
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
        that hidden state k (`hidden_states`) depends on, and so all that get a gradient through it."""
        modules = self.model if below_layer is None else self.decoder.layers[:below_layer]
        return [p for key, p in modules.named_parameters() if f".{name}." in key]

    @contextmanager
    def autocast(self) -> Iterator[None]:
        """bf16 autocast of the block where `rollout.autocast` asks for it; autocast then casts the adapters'
        float32 weights, and peft leaves their inputs as they are."""
        with torch.autocast(self.device.type, torch.bfloat16, enabled=self.autocasting):
            with disable_input_dtype_casting(self.model, active=self.autocasting):
                yield

    def __call__(self, input_ids: Tensor, attention_mask: Tensor, past: Cache | None = None) -> Tensor:
        """[N, T, d] the last hidden state (after the final norm) at each of `input_ids` under the active
        adapter: what the output layer reads. `input_ids` continue what `past` holds (if anything);
        `attention_mask` covers both."""
        return self.hidden_states(input_ids, attention_mask, past)[-1]

    def hidden_states(self, input_ids: Tensor, attention_mask: Tensor, past: Cache | None = None, layers: Sequence[int] = ()) -> list[Tensor]:
        """As calling the trunk, in the same pass: the hidden states [N, T, d] at each of `layers`, then the
        last one. Layers are numbered as transformers numbers `hidden_states`: 0 the embeddings, k the
        output of decoder layer k (counting from 1), `num_layers` the last hidden state. The pass keeps
        the states of the layers asked for only."""
        position_ids = positions(attention_mask, input_ids.shape[1])
        with self.activated(), self.autocast():
            # transformers checkpoints layers in training mode only; with no dropout the mode changes nothing else
            self.model.train(self.checkpointing and torch.is_grad_enabled())
            try:
                out = self.scorer(
                    input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=past,
                    use_cache=past is not None, output_hidden_states=list(layers) if layers else False,
                )
            finally:
                self.model.eval()
        return [out.hidden_states[k] for k in layers] + [out.last_hidden_state]

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
        self(prompt_ids[first, :-1], prompt_mask[first, :-1], past=encoding)
        states = [(k.index_select(0, row_of), v.index_select(0, row_of)) for k, v in encoding.take()]
        return DynamicCache(states) if growing else PrefixCache(states)


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


def positions(attention_mask: Tensor, length: int) -> Tensor:
    """Position ids of the last `length` tokens of `attention_mask`'s rows: they count real tokens
    only, as generate() numbers left-padded prompts."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, attention_mask.shape[1] - length :]
