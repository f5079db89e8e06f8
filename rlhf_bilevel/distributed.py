"""The processes of a run: one, or N started by `accelerate launch` (or torchrun), as one `World`.

A run of N processes is the run of one process with the same global batch, split: every
batch size of a recipe is global, process r draws rows [r·n/N, (r+1)·n/N) of each batch,
and every gradient is the mean of the N per-shard estimates, which with equal shards is
the estimate over the whole batch. What makes the N shards the rows of the SAME batch:
every process holds the same random generator and draws the random numbers of the whole
batch from it (prompts, sampling uniforms, labels, replay indices), then uses its rows.
So the algorithm never branches on the number of processes; it hands a few values to the
`World` (a mean of gradients, a gather of strings) and gets the global ones back.

Each process computes on its `World.device`: its own GPU (cuda:LOCAL_RANK, NCCL between
processes) when torch sees one, else the CPU (gloo). Random numbers are always drawn by
CPU generators and then moved, so a run draws the same batch on either.
"""

from __future__ import annotations

import atexit
import os
from typing import Any

import torch
import torch.distributed as dist
from accelerate import PartialState
from torch import Tensor

from rlhf_bilevel.collectives import World
from rlhf_bilevel.config import ConfigError


def resolve_device(name: str = "auto") -> torch.device:
    """Where this process computes (`train.device`): `auto` is its own GPU when torch sees one
    (cuda:LOCAL_RANK, as accelerate and torchrun number them) and the launcher did not ask for
    the CPU (ACCELERATE_USE_CPU, `use_cpu` of an accelerate config), else the CPU."""
    cpu_launch = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    if name == "cpu" or (name == "auto" and (cpu_launch or not torch.cuda.is_available())):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("train.device: cuda, but torch sees no CUDA device; use auto or cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


class ProcessGroup(World):
    """The processes of the default torch.distributed group. Collectives run on `device` (what
    the group's backend moves: CUDA tensors for NCCL, CPU ones for gloo) and give every
    result back on the device its input was on."""

    def __init__(self, rank: int, size: int, device: torch.device | str = "cpu"):
        super().__init__(device)
        self.rank, self.size = rank, size

    def sum(self, tensors: list[Tensor]) -> list[Tensor]:
        # one flat buffer, one all-reduce: an adapter has hundreds of small tensors
        flat = torch.cat([t.detach().reshape(-1).to(self.device, torch.float64) for t in tensors])
        dist.all_reduce(flat)
        out, start = [], 0
        for t in tensors:
            out.append(flat[start : start + t.numel()].reshape(t.shape).to(t.device, t.dtype))
            start += t.numel()
        return out

    def cat(self, tensor: Tensor) -> Tensor:
        sizes = [torch.zeros((), dtype=torch.long, device=self.device) for _ in range(self.size)]
        dist.all_gather(sizes, torch.tensor(tensor.shape[0], device=self.device))
        longest = int(max(sizes))
        padded = tensor.new_zeros((longest, *tensor.shape[1:]), device=self.device)
        padded[: tensor.shape[0]] = tensor
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        dist.all_gather(parts, padded.contiguous())
        return torch.cat([part[: int(n)] for part, n in zip(parts, sizes)]).to(tensor.device)

    def gather(self, value: Any) -> list[Any]:
        values: list[Any] = [None] * self.size
        dist.all_gather_object(values, value)
        return values

    def broadcast(self, value: Any) -> Any:
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        dist.barrier()


def launched_world(device: str = "auto") -> World:
    """The processes this one was started with, computing on `device` (`resolve_device`): itself
    alone, or (WORLD_SIZE > 1, as `accelerate launch` and torchrun set it) the group that
    accelerate's `PartialState` joins, over NCCL between GPUs and gloo between CPUs."""
    placed = resolve_device(device)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return World(placed)
    state = PartialState(cpu=placed.type == "cpu")
    # left to the interpreter's shutdown, gloo's threads can outlive it and abort the process
    atexit.register(dist.destroy_process_group)
    return ProcessGroup(state.process_index, state.num_processes, state.device)

