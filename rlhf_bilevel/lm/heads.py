"""Small heads on the frozen base's hidden states: the reward r_φ(s, a) and the critic's Q(s, ·).

Both read the features of the reference forward pass that every rollout already makes,
so neither costs a pass through the trunk of its own, unless the reward model is given a
LoRA adapter of its own (`reward.lora`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rlhf_bilevel.lm.policy import LMPolicy
from rlhf_bilevel.types import Rollout


REWARD_ADAPTER = "reward"
"""The LoRA adapter of the reward model, when it has one (`reward.lora`)."""


@dataclass(frozen=True)
class RewardConfig:
    hidden: int = 0  # width of the head's hidden layer; 0: a linear head (logistic per token)
    # φ also trains a LoRA adapter of its own on the trunk (the `adapters` settings), so the reward can
    # see what the frozen features miss; it costs a forward and backward pass of the trunk per evaluation
    lora: bool = False


class TokenReward(nn.Module):
    """r_φ(s_h, a_h) = sigmoid(head(features of s_{h+1})) ∈ [0, 1]: s_{h+1} = s_h ⊕ a_h is the
    state the action leads to, so its hidden state has read both. φ is the head's weights,
    and `trunk`, the weights of a LoRA adapter the features depend on, if any."""

    def __init__(self, features: Callable[[Rollout], Tensor], dim: int, cfg: RewardConfig, trunk: Sequence[Tensor] = ()):
        super().__init__()
        self.features = features
        self.trunk = list(trunk)  # a plain list: the adapter lives (and is saved) in the peft model
        layers = [nn.Linear(dim, cfg.hidden), nn.Tanh(), nn.Linear(cfg.hidden, 1)] if cfg.hidden else [nn.Linear(dim, 1)]
        self.net = nn.Sequential(normalised(dim), *layers)
        # r_φ starts at 1/2 everywhere: a random reward would send the policy somewhere random
        # before the first preference has been seen
        nn.init.zeros_(layers[-1].weight)
        nn.init.zeros_(layers[-1].bias)

    @classmethod
    def on(cls, policy: LMPolicy, cfg: RewardConfig) -> TokenReward:
        """The reward model of a run on `policy`: on the reference pass's features, or with `cfg.lora`
        on those of the policy model's adapter `reward` (which `with_adapters` must have made)."""
        if not cfg.lora:
            return cls(policy.state_features, policy.feature_dim, cfg)
        features = functools.partial(policy.adapter_features, adapter=REWARD_ADAPTER)
        return cls(features, policy.feature_dim, cfg, trunk=policy.parameters_of(REWARD_ADAPTER))

    def parameters(self, recurse: bool = True) -> list[Tensor]:  # the protocol wants a list
        return list(super().parameters(recurse)) + self.trunk

    def token_rewards(self, rollout: Rollout) -> Tensor:
        after = self.features(rollout)[:, 1:]
        return torch.sigmoid(self.net(after)).squeeze(-1) * rollout.mask


class VocabQHead(nn.Module):
    """Q(s, a) = v(s) + ⟨e_a, U h(s)⟩ for every token a, with e_a the frozen output embedding.

    A full linear map to a 49k-token vocabulary would train tens of millions of weights
    per critic; sharing the LM's own token geometry keeps the head at d² + d weights while
    still giving a value for every action, so V(s) = Σ_a π(a|s) Q(s, a) stays exact.
    U starts at zero: Q starts as the state value alone.
    """

    def __init__(self, embedding: Tensor, dim: int):
        super().__init__()
        # a plain tensor, not a Parameter: never registered, saved, trained or averaged into
        self.embedding = embedding.detach()
        self.norm = normalised(dim)
        self.value = nn.Linear(dim, 1)
        self.mix = nn.Linear(dim, dim, bias=False)
        nn.init.zeros_(self.mix.weight)

    def forward(self, features: Tensor, actions: Tensor | None = None) -> Tensor:
        """Q(s, ·) over the vocabulary; with `actions`, Q(s, a) of one action per state, without
        scoring the whole vocabulary (what TD needs)."""
        features = self.norm(features)
        mixed = self.mix(features)
        if actions is not None:
            return self.value(features).squeeze(-1) + (mixed * self.embedding[actions].float()).sum(-1)
        scores = F.linear(mixed.to(self.embedding.dtype), self.embedding).float()
        return self.value(features) + scores

    def expectation(self, features: Tensor, probs: Tensor) -> Tensor:
        """Σ_a probs(a) Q(s, a) = v(s) + ⟨Σ_a probs(a) e_a, U h(s)⟩ (probabilities sum to one): the
        mean embedding under `probs` [.., V] stands in for the [.., V] scores, which are never made."""
        features = self.norm(features)
        mean_embedding = (probs.to(self.embedding.dtype) @ self.embedding).float()
        return self.value(features).squeeze(-1) + (self.mix(features) * mean_embedding).sum(-1)


def normalised(dim: int) -> nn.Module:
    """Hidden states of LMs have norms in the tens and differ from model to model; standardised
    features let one learning rate serve every base model."""
    return nn.LayerNorm(dim, elementwise_affine=False)
