"""Step rules for the three parameter blocks (λ, λ′, φ): the paper's normalised steps, or Adam."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor


@dataclass(frozen=True)
class StepConfig:
    rule: Literal["normalized", "adam"] = field(
        default="normalized", metadata={"help": "normalized: x ± lr_k d/‖d‖ (eq. lines 9, 10, 14); adam: Adam on d"}
    )
    lr: float = field(default=0.1, metadata={"help": "lr_0, the first step size (> 0)"})
    schedule: Literal["inverse", "inverse_sqrt", "constant"] = field(
        default="inverse", metadata={"help": "inverse: lr_0/(k+1) (Theorem 1); inverse_sqrt: lr_0/√(k+1); constant: lr_0"}
    )
    max_norm: float | None = field(default=None, metadata={"help": "adam only: clip d to this norm first (> 0); null: no clipping"})
    weight_decay: float = field(
        default=0.0, metadata={"help": "ρ (≥ 0): the step follows d ∓ ρx, i.e. it optimises the objective ∓ ρ/2 ‖x‖²"}
    )



def norm(direction: list[Tensor]) -> Tensor:
    return torch.sqrt(sum((d.float() ** 2).sum() for d in direction))


class Stepper:
    """Moves `params` along a direction: +d to ascend (λ, λ′ on J), −d to descend (φ on L_σ).

    The step counter is never restarted: restarting 1/k at every outer iteration kicks
    the warm-started λ each time, and K then sets the floor (docs/algorithm.md, "Step sizes and what the theorem asks").
    """

    def __init__(self, params: list[Tensor], cfg: StepConfig, ascend: bool):
        self.params = params
        self.cfg = cfg
        self.sign = 1.0 if ascend else -1.0
        self.count = 0
        self.adam = torch.optim.Adam(params, lr=cfg.lr) if cfg.rule == "adam" else None

    def rate(self) -> float:
        if self.cfg.schedule == "inverse":
            return self.cfg.lr / (self.count + 1)
        if self.cfg.schedule == "inverse_sqrt":
            # Adam at a constant rate jitters by ~lr around the optimum, and d_t magnifies what
            # λ, λ′ miss by 1/σ; a decaying rate that does not restart lets warm starts converge
            return self.cfg.lr / (self.count + 1) ** 0.5
        return self.cfg.lr

    @torch.no_grad()
    def step(self, direction: list[Tensor]) -> float:
        """Applies one step and returns ‖d‖ (the decay term included)."""
        if self.cfg.weight_decay:
            # an L2 term gives an objective whose minimiser is attained: a bounded reward's
            # bt_nll can keep falling as ‖φ‖ → ∞ (sigmoids saturating), out of reach of 1/t steps
            direction = [d - self.sign * self.cfg.weight_decay * p for p, d in zip(self.params, direction)]
        size = norm(direction)
        if self.adam is not None:
            scale = 1.0
            if self.cfg.max_norm is not None and size > self.cfg.max_norm:
                scale = self.cfg.max_norm / size
            for p, d in zip(self.params, direction):
                p.grad = -self.sign * scale * d.to(p.dtype)
            for group in self.adam.param_groups:
                group["lr"] = self.rate()
            self.adam.step()
            self.adam.zero_grad(set_to_none=True)
        elif size > 0:
            for p, d in zip(self.params, direction):
                p.add_(d.to(p.dtype), alpha=self.sign * self.rate() / size.item())
        self.count += 1
        return size.item()

    def state_dict(self) -> dict:
        return {"count": self.count, "adam": self.adam.state_dict() if self.adam else None}

    def load_state_dict(self, state: dict) -> None:
        self.count = state["count"]
        if self.adam is not None:
            self.adam.load_state_dict(state["adam"])
