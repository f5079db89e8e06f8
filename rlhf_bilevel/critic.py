"""The critics of eq. 12. `TDCritic` is Algorithm 2: Q_θ ≈ Q^π_φ by TD(0), with a target
network, experience replay, projection onto a ball around the initial weights, and iterate
averaging. `MCCritic` uses Monte-Carlo returns with a leave-one-out baseline instead, and
`RLOOCritic` the same with the baseline taken over the other responses to the same prompt.

The Q head maps a state's features to one value per action (the vocabulary), so the
baseline V(s) = Σ_a π(a|s) Q(s, a) used by eq. 12 is exact rather than learned.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Literal

import torch
from torch import Tensor, nn

from rlhf_bilevel import estimators as est
from rlhf_bilevel.collectives import Collectives, World
from rlhf_bilevel.seeding import linear
from rlhf_bilevel.types import TRANSITION_FIELDS, Rollout, Transitions


@dataclass(frozen=True)
class CriticConfig:
    kind: Literal["td", "mc", "rloo"] = field(
        default="td",
        metadata={"help": "td: Algorithm 2; mc: Monte-Carlo returns (no learned weights) less the batch's; "
                          "rloo: less those of the other responses to the same prompt (set bilevel.responses_per_prompt)"},
    )
    hidden: int = field(default=64, metadata={"help": "the exact lab's Q head: width of its hidden layer, 0 for a linear one (a language model's Q reads its output embeddings instead)"})
    lr: float = field(default=0.05, metadata={"help": "β′, the TD step size (> 0)"})
    optimizer: str = field(default="adam", metadata={"help": "adam or sgd: sgd is the paper's plain step; adam converges in fewer steps"})
    blocks: int = field(default=4, metadata={"help": "J: target refreshes per fit (> 0)"})
    target_every: int = field(default=50, metadata={"help": "L: TD steps between target refreshes (> 0)"})
    batch_size: int = field(default=64, metadata={"help": "transitions replayed per TD step (> 0)"})
    radius: float | None = field(
        default=None, metadata={"help": "R of the projection ‖θ − θ0‖ ≤ R (> 0); null: 1/(1−γ) if γ < 1, else off"}
    )
    # older transitions were sampled by older policies, and their a′ biases the on-policy target towards
    # those policies' Q. Whenever φ changes the replay's rewards are recomputed (`relabel`), so it never
    # teaches the Q of an older r_φ
    replay_capacity: int = field(default=1024, metadata={"help": "transitions kept, newest first (> 0)"})
    target: Literal["expected", "sampled"] = field(
        default="expected",
        metadata={"help": "the bootstrap of TD(0): expected, y = r + γ Σ_a′ π(a′|s′) Q(s′, a′) over the vocabulary; "
                          "sampled, y = r + γ Q(s′, a′) at the token drawn next (Algorithm 2 line 6 as printed)"},
    )
    warmup_blocks: int = field(
        default=0, metadata={"help": "extra blocks of the first fit: a critic starting from zero would steer λ's first step by noise"}
    )


class QHead(nn.Module):
    def __init__(self, features: int, actions: int, hidden: int, generator: torch.Generator):
        """Q(s, ·) from `features` to `actions` values, through a `hidden`-wide tanh layer (none when 0),
        its weights drawn from `generator`."""
        super().__init__()
        if hidden:
            self.net = nn.Sequential(linear(features, hidden, generator), nn.Tanh(), linear(hidden, actions, generator))
        else:
            self.net = linear(features, actions, generator)

    def forward(self, features: Tensor, actions: Tensor | None = None) -> Tensor:
        """Q(s, ·); with `actions`, Q(s, a) of one action per state."""
        q = self.net(features)
        return q if actions is None else q.gather(-1, actions.unsqueeze(-1)).squeeze(-1)

    def summarise(self, probs: Tensor) -> Tensor:
        """What `expectation` needs of a distribution over the actions: here, all of it."""
        return probs

    def expectation(self, features: Tensor, summary: Tensor) -> Tensor:
        """Σ_a probs(a|s) Q(s, a) per state, from `summarise(probs)`: V(s) when `probs` is the policy."""
        return (summary * self(features)).sum(-1)


def project_to_ball(params: list[Tensor], centre: list[Tensor], radius: float) -> None:
    """θ ← Γ_{θ0,R}(θ): the Euclidean projection of Algorithm 2, line 7."""
    offset = torch.sqrt(sum(((p - c) ** 2).sum() for p, c in zip(params, centre)))
    if offset > radius:
        scale = radius / offset
        for p, c in zip(params, centre):
            p.copy_(c + (p - c) * scale)


class TDCritic:
    """Q_θ for one policy, fitted by Algorithm 2 on replayed transitions; warm-started across fits.

    Across processes the critic is one: every process replays the transitions of the whole
    batch (gathered), draws the same minibatch indices, takes the TD gradient on its share
    of the minibatch, and steps along the mean of those gradients.
    """

    def __init__(
        self,
        features: Callable[[Rollout], Tensor],
        head: nn.Module,
        gamma: float,
        cfg: CriticConfig,
        generator: torch.Generator,
        world: Collectives = World(),
    ):
        """`features(rollout)` gives [N, H+1, d] state features; `head` maps them to Q(s, ·) over the
        actions, `head(features, actions)` to Q(s, a) of one action each (what TD needs), and
        `head.expectation(features, head.summarise(probs))` to Σ_a probs(a) Q(s, a) (the baseline V of
        eq. 12, and the expected-SARSA target)."""
        self.features = features
        self.gamma = gamma
        self.cfg = cfg
        self.generator = generator
        self.world = world
        self.q = head
        self.centre = [p.detach().clone() for p in self.q.parameters()]
        self.radius = cfg.radius if cfg.radius is not None else (1 / (1 - gamma) if gamma < 1 else None)
        self.optimizer = (
            torch.optim.Adam(self.q.parameters(), lr=cfg.lr)
            if cfg.optimizer == "adam"
            else torch.optim.SGD(self.q.parameters(), lr=cfg.lr)
        )
        # the rollouts behind the replay (this process's rows), each with the transitions of the whole
        # batch it gave: what `relabel` recomputes the rewards of
        self.sources: list[tuple[Rollout, Transitions]] = []
        self.replay: Transitions | None = None
        self.fits = 0

    def remember(self, rollout: Rollout, transitions: Transitions) -> None:
        """Adds a rollout's transitions; the replay is the newest `replay_capacity` of all, and a rollout
        none of whose transitions are left is dropped."""
        self.sources.append((rollout, transitions))
        while len(self.sources) > 1 and sum(len(t) for _, t in self.sources[1:]) >= self.cfg.replay_capacity:
            self.sources.pop(0)
        self.join()

    def join(self) -> None:
        joined = self.sources[0][1]
        for _, transitions in self.sources[1:]:
            joined = joined.concat(transitions)
        self.replay = joined.slice(slice(-self.cfg.replay_capacity, None))

    @torch.no_grad()
    def relabel(self, shaped_of: Callable[[Rollout], Tensor]) -> None:
        """The replay's rewards, recomputed by `shaped_of` at the current r_φ."""
        relabelled = []
        for rollout, transitions in self.sources:
            reward = self.world.cat(shaped_of(rollout)[rollout.mask.bool()])
            relabelled.append((rollout, dataclasses.replace(transitions, reward=reward)))
        self.sources = relabelled
        if self.sources:
            self.join()

    def fit(self, rollout: Rollout, shaped: Tensor, log_probs: Tensor) -> dict[str, float]:
        """J blocks of L TD(0) steps (J + `warmup_blocks` the first time); each block bootstraps from the
        previous block's average."""
        with torch.no_grad():
            policy = self.q.summarise(log_probs.detach().exp())
        local = est.transitions(rollout, self.features(rollout), shaped, policy)
        self.remember(rollout, Transitions(**{k: self.world.cat(getattr(local, k)) for k in TRANSITION_FIELDS}))
        replay = self.replay
        params = list(self.q.parameters())
        blocks = self.cfg.blocks + (self.cfg.warmup_blocks if self.fits == 0 else 0)
        self.fits += 1
        for _ in range(blocks):
            # y = r + γ Q_target(s′, ·) (line 6) bootstraps from weights frozen for the whole
            # block, which are the head's own at its start: one pass over the replay gives every y
            with torch.no_grad():
                if self.cfg.target == "expected":
                    bootstrap = self.q.expectation(replay.next_state, replay.next_policy)
                else:
                    bootstrap = self.q(replay.next_state, replay.next_action)
                y = replay.reward + self.gamma * (1 - replay.done) * bootstrap
            average = [torch.zeros_like(p) for p in params]
            for _ in range(self.cfg.target_every):
                index = torch.randint(len(replay), (self.cfg.batch_size,), generator=self.generator).to(replay.state.device)
                mine = index[self.world.shard(self.cfg.batch_size)]
                loss = 0.5 * ((y[mine] - self.q(replay.state[mine], replay.action[mine])) ** 2).mean()
                grads = torch.autograd.grad(loss, params)  # semi-gradient: y carries no gradient (line 6)
                for p, g in zip(params, self.world.mean(list(grads))):
                    p.grad = g
                self.optimizer.step()
                with torch.no_grad():
                    if self.radius is not None:
                        project_to_ball(params, self.centre, self.radius)
                    for a, p in zip(average, params):
                        a.add_(p, alpha=1 / self.cfg.target_every)
            with torch.no_grad():  # Algorithm 2, line 11: return the average of the iterates
                for a, p in zip(average, params):
                    p.copy_(a)
        return {"critic/td_loss": loss.item(), "critic/replay": float(len(replay))}

    @torch.no_grad()
    def q_values(self, rollout: Rollout) -> Tensor:
        """[N, H, V] Q_θ(s_h, ·)."""
        return self.q(self.features(rollout)[:, : rollout.horizon])

    @torch.no_grad()
    def advantages(self, rollout: Rollout, shaped: Tensor, log_probs: Tensor) -> Tensor:
        """Q of the taken tokens and V(s) by the head's expectation, which never needs Q(s, ·) of
        the whole vocabulary as a tensor (the vocabulary head's is [N, H, V], like log π itself)."""
        states = self.features(rollout)[:, : rollout.horizon]
        values = self.q.expectation(states, self.q.summarise(log_probs.detach().exp()))
        return est.advantages(self.q(states, rollout.tokens), values, rollout)

    def state_dict(self) -> dict:
        replay = [{"rollout": r.state_dict(), **{k: getattr(t, k) for k in TRANSITION_FIELDS}} for r, t in self.sources]
        return {"q": self.q.state_dict(), "optimizer": self.optimizer.state_dict(), "replay": replay, "fits": self.fits}

    def load_state_dict(self, state: dict) -> None:
        self.q.load_state_dict(state["q"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.fits = state["fits"]
        device = self.centre[0].device  # a checkpoint loads onto the CPU
        self.sources = [
            (Rollout.from_state(saved["rollout"], device), Transitions(**{k: saved[k].to(device) for k in TRANSITION_FIELDS}))
            for saved in state["replay"]
        ]
        self.replay = None
        if self.sources:
            self.join()


class MCCritic:
    """Monte-Carlo returns minus a leave-one-out baseline: A_h = G_h − mean of the other G_h.

    Unbiased with no learned weights, at the price of variance; the baseline at step h
    averages the other trajectories still running at h, so it is independent of the
    trajectory it centres. Across processes the others are those of the whole batch.
    """

    def __init__(self, gamma: float, world: Collectives = World()):
        self.gamma = gamma
        self.world = world

    def fit(self, rollout: Rollout, shaped: Tensor, log_probs: Tensor) -> dict[str, float]:
        return {}

    def relabel(self, shaped_of: Callable[[Rollout], Tensor]) -> None:
        pass  # nothing replayed: each fit's returns are its own rollout's

    def load_state_dict(self, state: dict) -> None:
        pass

    def advantages(self, rollout: Rollout, shaped: Tensor, log_probs: Tensor) -> Tensor:
        return self.batch_advantages(rollout, est.rewards_to_go(rollout, shaped, self.gamma))

    def batch_advantages(self, rollout: Rollout, to_go: Tensor) -> Tensor:
        """[N, H] `to_go` less the mean of the batch's other trajectories still running at each step."""
        alive = rollout.mask
        running, total = self.world.sum([alive.sum(0, keepdim=True), (to_go * alive).sum(0, keepdim=True)])
        others = (running - alive).clamp(min=1)
        baseline = (total - to_go * alive) / others
        return ((to_go - baseline) * alive).detach()

    def state_dict(self) -> dict:
        return {}


class RLOOCritic(MCCritic):
    """Monte-Carlo returns minus the mean return of the other responses to the same prompt (REINFORCE
    leave-one-out, RLOO): A_h = G_h − mean of G_h over the prompt's other trajectories still running at h.

    Responses to one prompt share what the prompt alone decides about their reward (some prompts
    invite warmer words than others); MCCritic's baseline, over the whole batch, leaves that in every
    advantage as noise. Still unbiased: the other responses are drawn independently of this one. A
    trajectory with no other response to its prompt running at h (on this process) is baselined
    against the batch's, as MCCritic does.
    """

    def advantages(self, rollout: Rollout, shaped: Tensor, log_probs: Tensor) -> Tensor:
        to_go = est.rewards_to_go(rollout, shaped, self.gamma)
        batch = self.batch_advantages(rollout, to_go)  # every process takes part in its sums
        alive = rollout.mask
        others = same_prompt(rollout.prompts, alive.device)
        running = others @ alive
        baseline = (others @ (to_go * alive)) / running.clamp(min=1)
        return torch.where(running > 0, ((to_go - baseline) * alive).detach(), batch)


def same_prompt(prompts: list, device: torch.device | str) -> Tensor:
    """[N, N] 1 where rows i ≠ j answer the same prompt, else 0."""
    return torch.tensor([[float(i != j and a == b) for j, b in enumerate(prompts)] for i, a in enumerate(prompts)], device=device)
