"""Where initial weights draw their random numbers: from a stream the caller owns, never from a
reseeded global one, so that building a model leaves torch's global RNG as it was.

`linear` initialises as `nn.Linear` does, from a generator: a module seeded by
`torch.Generator().manual_seed(s)` gets the very weights that `torch.manual_seed(s)` gave it
(both are the CPU's Mersenne twister). `GlobalRNG` is for code that draws from the global
streams only (peft's LoRA initialisation, torch's layers): a private copy of them, swapped in
for a block and back out after it.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def linear(inputs: int, outputs: int, generator: torch.Generator, bias: bool = True) -> nn.Linear:
    """`nn.Linear(inputs, outputs)` in the default dtype, its weights drawn from `generator` in the
    order and from the distributions of `nn.Linear.reset_parameters`."""
    layer = nn.Linear(inputs, outputs, bias=bias, device="meta").to_empty(device="cpu")  # meta: no global draw
    with torch.no_grad():
        nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)
        if bias:
            bound = 1 / math.sqrt(inputs) if inputs > 0 else 0
            nn.init.uniform_(layer.bias, -bound, bound, generator=generator)
    return layer


class GlobalRNG:
    """torch's global random streams (the CPU's and each GPU's), held privately and seeded with `seed`.

    Within `with rng:` they are the global ones; after the block the caller's streams are back, and
    the next block draws on where this one stopped: a run's initialisations draw the numbers that
    `torch.manual_seed(seed)` followed by the same constructions would, whatever else the process
    draws in between."""

    def __init__(self, seed: int):
        self.seed = seed
        self.states: tuple[torch.Tensor, list[torch.Tensor]] | None = None  # where the last block stopped
        self.outside: list[tuple[torch.Tensor, list[torch.Tensor]]] = []

    def __enter__(self) -> GlobalRNG:
        self.outside.append(captured())
        if self.states is None:
            torch.manual_seed(self.seed)
        else:
            restore(self.states)
        return self

    def __exit__(self, *exc) -> None:
        self.states = captured()
        restore(self.outside.pop())


def cuda_devices() -> list[int]:
    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []


def captured() -> tuple[torch.Tensor, list[torch.Tensor]]:
    return torch.get_rng_state(), [torch.cuda.get_rng_state(device) for device in cuda_devices()]


def restore(states: tuple[torch.Tensor, list[torch.Tensor]]) -> None:
    cpu, cuda = states
    torch.set_rng_state(cpu)
    for device, state in enumerate(cuda):
        torch.cuda.set_rng_state(state, device)
