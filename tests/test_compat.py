"""The upstream behaviour each reach into another library relies on (compat.py, and peft's public
switch that LMPolicy uses): each test fails when a new version changes it."""

import functools
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from peft import LoraConfig, get_peft_model
from peft.helpers import disable_input_dtype_casting
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from rlhf_bilevel.compat import keep_cache_under_checkpointing

PYPROJECT = Path(__file__).parents[1] / "pyproject.toml"


class CacheReader(GradientCheckpointingLayer):
    """A layer that adds what its cache holds, checkpointed as transformers checkpoints decoder layers."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(2))
        self.gradient_checkpointing = True
        self._gradient_checkpointing_func = functools.partial(checkpoint, use_reentrant=False)

    def forward(self, hidden, cache=None):
        return hidden * self.weight + (0 if cache is None else cache)


def test_checkpointed_layers_drop_their_cache_unless_told_to_keep_it():
    hidden, cache = torch.ones(2), torch.full((2,), 10.0)
    layer = CacheReader().train()
    assert torch.equal(layer(hidden, cache=cache), hidden)  # dropped: what keep_cache_under_checkpointing is for
    keep_cache_under_checkpointing(layer)
    kept = layer(hidden, cache=cache)
    assert torch.equal(kept, hidden + cache)
    kept.sum().backward()  # the replay reads the same cache
    assert torch.equal(layer.weight.grad, hidden)
    assert issubclass(LlamaDecoderLayer, GradientCheckpointingLayer)  # the layers the switch reaches


def test_disable_input_dtype_casting_leaves_adapter_inputs_in_the_bases_dtype():
    # under bf16 autocast, LMPolicy keeps peft from copying every adapted layer's input to float32
    base = nn.Sequential(nn.Linear(4, 4)).to(torch.bfloat16)
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["0"]))
    seen = []
    lora_a = next(module for name, module in model.named_modules() if name.endswith("lora_A.default"))
    lora_a.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    x = torch.ones(1, 4, dtype=torch.bfloat16)
    with torch.autocast("cpu", torch.bfloat16):
        model(x)
        with disable_input_dtype_casting(model):
            model(x)
        model(x)
    assert lora_a.weight.dtype == torch.float32 and seen == [torch.float32, torch.bfloat16, torch.float32]


@pytest.mark.parametrize("name", ["transformers", "peft"])
def test_libraries_whose_internals_are_reached_are_pinned_and_installed_within_the_pins(name):
    requirements = [Requirement(line) for line in tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]]
    (requirement,) = [r for r in requirements if r.name == name]
    assert any(spec.operator in ("<", "<=", "~=") for spec in requirement.specifier), f"{name}: no upper pin"
    assert metadata.version(name) in requirement.specifier
