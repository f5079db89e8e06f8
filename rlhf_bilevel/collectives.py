"""What the algorithm asks of the processes a run is split over: a few collectives, as a protocol.

`bilevel.py`, `critic.py` and `sampling.py` are written against `Collectives` and never start,
join or name a process: a run of one process hands them `World()` (every collective is the
identity), a run of N hands them `distributed.ProcessGroup`, which joins torch.distributed.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import Tensor


class Collectives(Protocol):
    """The processes of a run, seen from one of them: their number, this one's rank, and the
    collectives that turn per-shard values into whole-batch ones."""

    size: int
    rank: int
    device: torch.device

    @property
    def is_main(self) -> bool: ...

    def shard(self, n: int) -> slice: ...

    def sum(self, tensors: list[Tensor]) -> list[Tensor]: ...

    def mean(self, tensors: list[Tensor]) -> list[Tensor]: ...

    def mean_metrics(self, metrics: dict[str, float]) -> dict[str, float]: ...

    def cat(self, tensor: Tensor) -> Tensor: ...

    def gather(self, value: Any) -> list[Any]: ...

    def broadcast(self, value: Any) -> Any: ...

    def barrier(self) -> None: ...


class World:
    """One process: every collective is the identity. `distributed.ProcessGroup` is the same API across N processes."""

    size = 1
    rank = 0

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)

    @property
    def is_main(self) -> bool:
        """The process that queries the oracle and writes every file of the run."""
        return self.rank == 0

    def shard(self, n: int) -> slice:
        """This process's rows of a global batch of n (the run checks that every batch splits evenly)."""
        if n % self.size:
            raise ValueError(f"a batch of {n} does not split evenly over {self.size} processes")
        part = n // self.size
        return slice(self.rank * part, (self.rank + 1) * part)

    def sum(self, tensors: list[Tensor]) -> list[Tensor]:
        """Elementwise sums over the processes."""
        return tensors

    def mean(self, tensors: list[Tensor]) -> list[Tensor]:
        """The mean of each tensor over the processes: of per-shard estimates, the whole-batch estimate."""
        if self.size == 1:
            return tensors
        return [t / self.size for t in self.sum(tensors)]

    def mean_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """Per-shard means of the batch (J, KL, loss) as means over the whole batch; values
        that every process already shares (step norms, counters) come back unchanged."""
        if self.size == 1:
            return metrics
        names = sorted(metrics)
        (values,) = self.mean([torch.tensor([float(metrics[name]) for name in names], dtype=torch.float64, device=self.device)])
        return dict(zip(names, values.tolist()))

    def cat(self, tensor: Tensor) -> Tensor:
        """Every process's tensor, concatenated along dim 0 in rank order (the rows of the global batch)."""
        return tensor

    def gather(self, value: Any) -> list[Any]:
        """Every process's `value` (picklable), in rank order, on every process."""
        return [value]

    def broadcast(self, value: Any) -> Any:
        """The main process's `value` on every process (what the others pass is ignored)."""
        return value

    def barrier(self) -> None:
        """Waits until every process gets here."""
