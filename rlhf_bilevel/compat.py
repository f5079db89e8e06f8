"""Where rlhf-bilevel reaches into the internals of the libraries it builds on.

Each reach is one function here, named for what it needs; tests/test_compat.py holds a test per
function that fails when the upstream behaviour it relies on changes, and pyproject.toml caps
the library's version, so that a new major release is taken on by choice, after those tests.
"""

from __future__ import annotations

from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer


def keep_cache_under_checkpointing(model: nn.Module) -> None:
    """Lets every checkpointed decoder layer of `model` read the KV cache it is handed.

    Under gradient checkpointing transformers drops a layer's cache (`cache=None`), because the
    backward pass replays the layer and would extend the cache a second time. Every cache read
    with gradients here is a `PrefixCache` (lm/trunk.py), which replays as it first ran; the
    layers' own switch for keeping it, `_can_checkpoint_with_cache`, is private to transformers.
    """
    for module in model.modules():
        if isinstance(module, GradientCheckpointingLayer):
            module._can_checkpoint_with_cache = True
