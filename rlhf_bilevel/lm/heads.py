"""Small heads on the frozen base's hidden states: the reward r_φ(s, a) and the critic's Q(s, ·).

Both read the features of the reference forward pass that every rollout already makes
(the reward head those of any one layer, `reward.layer`), so neither costs a pass through the
trunk of its own, unless the reward model is given a LoRA adapter of its own (`reward.lora`).
docs/reward-model.md measures the reward head's forms against the sentiment oracle.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rlhf_bilevel.config import ConfigError, positive
from rlhf_bilevel.lm.judge import Judge, JudgeConfig
from rlhf_bilevel.lm.policy import LMPolicy
from rlhf_bilevel.types import Rollout


REWARD_ADAPTER = "reward"
"""The LoRA adapter of the reward model, when it has one (`reward.lora`)."""


@dataclass(frozen=True)
class RewardConfig:
    hidden: int = field(default=0, metadata={"help": "width of the head's hidden layer; 0: a linear head (logistic per token)"})
    # it costs a forward and backward pass of the trunk per evaluation
    lora: bool = field(
        default=False, metadata={"help": "φ also trains a LoRA adapter of its own on the trunk (the `adapters` settings), to see what the frozen features miss"}
    )
    # sigmoid(z) ∈ [0, 1] would make the 1/2 of each token a length bonus before any label
    # (docs/algorithm.md, "A reward that starts neutral")
    center: bool = field(
        default=True, metadata={"help": "r_φ = sigmoid(z) − 1/2, so a zero-initialised head gives reward 0; false: sigmoid(z) ∈ [0, 1]"}
    )
    pool: Literal["sum", "mean"] = field(
        default="sum",
        metadata={"help": "sum: R_φ(τ) = Σ_h r_φ(s_h, a_h); mean: each token's reward is divided by the response's length"},
    )
    layer: int | None = field(
        default=None,
        metadata={"help": "the base's hidden layer the head reads: 0 the embeddings, k the output of decoder layer k; "
                          "null (or the number of layers) the last hidden state, after the final norm"},
    )
    heads: int = field(
        default=1, metadata={"help": "an ensemble of E heads from different random starts (> 0): r_φ is their mean, their spread the model's uncertainty"}
    )
    judge: JudgeConfig = field(
        default_factory=JudgeConfig,
        metadata={"help": "with a question, the frozen base is asked it about each response, and the log-odds of its answer, weighted, add to R_φ: a prior before any label (lm/judge.py)"},
    )

    def __post_init__(self) -> None:
        positive(self, "heads")  # `layer` depends on the model: TokenReward.on checks it


MEMBER_SCALE = 0.1
"""The standard deviation of each ensemble member's logit z at initialisation, on standardised
features: members disagree from the start, and r_φ changes by at most ~MEMBER_SCALE/4 a token."""


class TokenReward(nn.Module):
    """r_φ(s_h, a_h) = sigmoid(head(features of s_{h+1})) − 1/2 ∈ [−1/2, 1/2] (∈ [0, 1] without
    `center`), divided by the response's length with `pool: mean`: s_{h+1} = s_h ⊕ a_h is the state
    the action leads to, so its hidden state has read both. With `heads` E > 1, r_φ is the mean of
    E such heads. With a `judge`, R_φ(τ) also gets w·j(τ), the judge's log-odds j of the response
    times a weight w that starts at `judge.scale`, as the reward of its last token. φ is the heads'
    weights, w, and `trunk`, the weights of a LoRA adapter the features depend on, if any."""

    def __init__(
        self, features: Callable[[Rollout], Tensor], dim: int, cfg: RewardConfig, trunk: Sequence[Tensor] = (),
        judged: Callable[[Rollout], Tensor] | None = None,
    ):
        super().__init__()
        self.features, self.cfg, self.judged = features, cfg, judged
        if (judged is not None) != cfg.judge.asks:
            raise ValueError("a judge's log-odds come with reward.judge.question, and only with it")
        self.judge_weight = nn.Parameter(torch.tensor(cfg.judge.scale)) if cfg.judge.asks else None
        self.trunk = list(trunk)  # a plain list: the adapter lives (and is saved) in the peft model
        if cfg.hidden:
            layers = [nn.Linear(dim, cfg.heads * cfg.hidden), nn.Tanh(), MemberOutputs(cfg.heads, cfg.hidden)]
        else:
            layers = [nn.Linear(dim, cfg.heads)]
        self.net = nn.Sequential(normalised(dim), *layers)
        # the mean of the members starts where one zero-initialised head does, everywhere (0, or 1/2
        # without `center`): a random reward would send the policy somewhere random before the first
        # preference has been seen
        output = layers[-1]
        nn.init.zeros_(output.bias)
        if cfg.heads == 1:
            nn.init.zeros_(output.weight)
        else:
            mirrored_members(output.weight, layers[0] if cfg.hidden else None)

    @classmethod
    def on(cls, policy: LMPolicy, cfg: RewardConfig) -> TokenReward:
        """The reward model of a run on `policy`: on the reference pass's features (of `cfg.layer`,
        which every rollout `policy` samples from now on keeps), or with `cfg.lora` on those of the
        policy model's adapter `reward` (which `with_adapters` must have made)."""
        last = policy.trunk.num_layers
        if cfg.layer is not None and not 0 <= cfg.layer <= last:
            raise ConfigError(f"reward.layer: the model has hidden states 0 (the embeddings) to {last} (the last, as is null); got {cfg.layer}")
        layer = None if cfg.layer == last else cfg.layer
        judged = None
        if cfg.judge.asks:
            policy.judge = Judge(policy.trunk, policy.tokenizer, policy.chat_template, cfg.judge)
            judged = policy.judged
        if not cfg.lora:
            policy.reward_layer = layer
            return cls(policy.reward_features, policy.feature_dim, cfg, judged=judged)
        features = functools.partial(policy.adapter_features, adapter=REWARD_ADAPTER, layer=layer)
        return cls(features, policy.feature_dim, cfg, trunk=policy.parameters_of(REWARD_ADAPTER, below_layer=layer), judged=judged)

    def parameters(self, recurse: bool = True) -> list[Tensor]:  # the protocol wants a list
        return list(super().parameters(recurse)) + self.trunk

    def token_rewards(self, rollout: Rollout) -> Tensor:
        """[N, H] r_φ(s_h, a_h), the members' mean; 0 after EOS."""
        return self.member_rewards(rollout).mean(0)

    def member_rewards(self, rollout: Rollout) -> Tensor:
        """[E, N, H] each member's r_φ(s_h, a_h); 0 after EOS."""
        per_token = rollout.mask / rollout.mask.sum(-1, keepdim=True) if self.cfg.pool == "mean" else rollout.mask
        rewards = self.state_rewards(self.features(rollout)[:, 1:]) * per_token
        if self.judged is None:
            return rewards
        # the mask is 1 up to the last token taken (EOS, or the horizon's), then 0
        lengths = rollout.mask.sum(-1).long()
        last = F.one_hot((lengths - 1).clamp(min=0), rollout.horizon) * (lengths > 0).unsqueeze(-1)
        return rewards + self.judge_weight * self.judged(rollout).unsqueeze(-1) * last

    def state_rewards(self, states: Tensor) -> Tensor:
        """[E, ...] each member's reward for reaching the states whose features are `states` [..., d],
        before masking and pooling."""
        z = self.net(states).movedim(-1, 0)
        # sigmoid(z) − 1/2 = tanh(z/2)/2, exactly odd in z as computed: mirrored members cancel exactly
        return 0.5 * torch.tanh(z / 2) if self.cfg.center else torch.sigmoid(z)


class MemberOutputs(nn.Module):
    """The output layers of E heads with hidden layers, side by side: member e maps its own slice
    of the hidden units [..., E·width] to its logit [..., E]. With E = 1 it is nn.Linear(width, 1),
    weights included."""

    def __init__(self, heads: int, width: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(heads, width))
        self.bias = nn.Parameter(torch.empty(heads))

    def forward(self, hidden: Tensor) -> Tensor:
        return (hidden.unflatten(-1, self.weight.shape) * self.weight).sum(-1) + self.bias


@torch.no_grad()
def mirrored_members(output: Tensor, hidden: nn.Linear | None) -> None:
    """Random output weights [E, fan_in] for E members in mirrored pairs: member 2e + 1 has member 2e's
    hidden layer and the opposite output weights; when E is odd, the last member is zero. Centred
    rewards are odd in z, so each pair sums to exactly 0 and the members' mean starts at exactly 0
    (at 1/2 up to rounding without centring), while each member starts at a reward of its own."""
    pairs = output.shape[0] // 2 * 2
    output.zero_()
    output[:pairs:2].normal_(0.0, MEMBER_SCALE / output.shape[1] ** 0.5)  # z = w·x, x of unit scale per unit: std ≈ MEMBER_SCALE
    output[1:pairs:2] = -output[:pairs:2]
    if hidden is not None:
        for tensor in (hidden.weight, hidden.bias):
            members = tensor.unflatten(0, (output.shape[0], -1))
            members[1:pairs:2] = members[:pairs:2]


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

    def summarise(self, probs: Tensor) -> Tensor:
        """Σ_a probs(a) e_a [.., d]: all that `expectation` needs of a distribution over the vocabulary,
        so a replay keeps d numbers per state rather than V."""
        return (probs.to(self.embedding.dtype) @ self.embedding).float()

    def expectation(self, features: Tensor, mean_embedding: Tensor) -> Tensor:
        """Σ_a probs(a) Q(s, a) = v(s) + ⟨Σ_a probs(a) e_a, U h(s)⟩ (probabilities sum to one), from
        `summarise(probs)`: the mean embedding stands in for the [.., V] scores, which are never made."""
        features = self.norm(features)
        return self.value(features).squeeze(-1) + (self.mix(features) * mean_embedding).sum(-1)


def normalised(dim: int) -> nn.Module:
    """Hidden states of LMs have norms in the tens and differ from model to model; standardised
    features let one learning rate serve every base model."""
    return nn.LayerNorm(dim, elementwise_affine=False)
