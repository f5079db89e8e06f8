"""Algorithm 2: the critic Q_θ ≈ Q^π_φ by TD(0), with a target network, experience replay,
projection onto a ball around the initial weights, and iterate averaging.

The Q head maps a state's features to one value per action (the vocabulary), so the
baseline V(s) = Σ_a π(a|s) Q(s, a) used by eq. 12 is exact rather than learned.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from rlhf_bilevel.types import Rollout, Transitions


@dataclass(frozen=True)
class CriticConfig:
    kind: str = "td"  # td: Algorithm 2; mc: Monte-Carlo returns (no learned weights)
    hidden: int = 64  # width of the Q head's hidden layer; 0 for a linear head
    lr: float = 0.05  # β′, the TD step size
    optimizer: str = "adam"  # sgd is the paper's plain step; adam converges in fewer steps
    blocks: int = 4  # J: target refreshes per fit
    target_every: int = 50  # L: TD steps between target refreshes
    batch_size: int = 64  # transitions replayed per TD step
    radius: float | None = None  # R of the projection ‖θ − θ0‖ ≤ R; None: 1/(1−γ) if γ < 1, else off
    replay_capacity: int = 1024  # transitions kept, newest first: older ones were sampled by older
    # policies, and their a′ biases the on-policy target towards those policies' Q


class QHead(nn.Module):
    def __init__(self, features: int, actions: int, hidden: int):
        super().__init__()
        if hidden:
            self.net = nn.Sequential(nn.Linear(features, hidden), nn.Tanh(), nn.Linear(hidden, actions))
        else:
            self.net = nn.Linear(features, actions)

    def forward(self, features: Tensor) -> Tensor:
        return self.net(features)


def project_to_ball(params: list[Tensor], centre: list[Tensor], radius: float) -> None:
    """θ ← Γ_{θ0,R}(θ): the Euclidean projection of Algorithm 2, line 7."""
    offset = torch.sqrt(sum(((p - c) ** 2).sum() for p, c in zip(params, centre)))
    if offset > radius:
        scale = radius / offset
        for p, c in zip(params, centre):
            p.copy_(c + (p - c) * scale)


class TDCritic:
    """Q_θ for one policy, fitted by Algorithm 2 on replayed transitions; warm-started across fits."""

    def __init__(
        self,
        features: Callable[[Rollout], Tensor],
        feature_dim: int,
        actions: int,
        gamma: float,
        cfg: CriticConfig,
        generator: torch.Generator,
    ):
        self.features = features
        self.gamma = gamma
        self.cfg = cfg
        self.generator = generator
        self.q = QHead(feature_dim, actions, cfg.hidden)
        self.centre = [p.detach().clone() for p in self.q.parameters()]
        self.radius = cfg.radius if cfg.radius is not None else (1 / (1 - gamma) if gamma < 1 else None)
        self.optimizer = (
            torch.optim.Adam(self.q.parameters(), lr=cfg.lr)
            if cfg.optimizer == "adam"
            else torch.optim.SGD(self.q.parameters(), lr=cfg.lr)
        )
        self.replay: Transitions | None = None

    def remember(self, transitions: Transitions) -> None:
        joined = transitions if self.replay is None else self.replay.concat(transitions)
        self.replay = joined.slice(slice(-self.cfg.replay_capacity, None))

    def fit(self, transitions: Transitions) -> dict[str, float]:
        """J blocks of L TD(0) steps; each block bootstraps from the previous block's average."""
        self.remember(transitions)
        replay = self.replay
        params = list(self.q.parameters())
        td_error = 0.0
        for _ in range(self.cfg.blocks):
            target = copy.deepcopy(self.q).requires_grad_(False)
            average = [torch.zeros_like(p) for p in params]
            for _ in range(self.cfg.target_every):
                batch = replay.slice(torch.randint(len(replay), (self.cfg.batch_size,), generator=self.generator))
                with torch.no_grad():
                    bootstrap = target(batch.next_state).gather(-1, batch.next_action.unsqueeze(-1)).squeeze(-1)
                    y = batch.reward + self.gamma * (1 - batch.done) * bootstrap
                q_sa = self.q(batch.state).gather(-1, batch.action.unsqueeze(-1)).squeeze(-1)
                loss = 0.5 * ((y - q_sa) ** 2).mean()
                self.optimizer.zero_grad()
                loss.backward()  # semi-gradient: y carries no gradient (line 6)
                self.optimizer.step()
                with torch.no_grad():
                    if self.radius is not None:
                        project_to_ball(params, self.centre, self.radius)
                    for a, p in zip(average, params):
                        a.add_(p, alpha=1 / self.cfg.target_every)
                td_error = loss.item()
            with torch.no_grad():  # Algorithm 2, line 11: return the average of the iterates
                for a, p in zip(average, params):
                    p.copy_(a)
        return {"critic/td_loss": td_error, "critic/replay": float(len(replay))}

    @torch.no_grad()
    def q_values(self, rollout: Rollout) -> Tensor:
        return self.q(self.features(rollout)[:, : rollout.horizon])

    def state_dict(self) -> dict:
        return {"q": self.q.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.q.load_state_dict(state["q"])
        self.optimizer.load_state_dict(state["optimizer"])
