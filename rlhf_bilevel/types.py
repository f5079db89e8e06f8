"""The typed batches that pass between the parts, and the small protocols the algorithm needs.

Everything in `bilevel.py` and `estimators.py` is written against these names only, so the
same code runs on the enumerable token MDP (`exact/`) and on a Hugging Face model (`lm/`).
"""

from __future__ import annotations

import dataclasses
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator, Protocol, Sequence

import torch
from torch import Tensor

LAMBDA = "lambda"
"""Adapter that ascends J alone: plays λ* (docs/algorithm.md, penalty reformulation)."""
LAMBDA_PRIME = "lambda_prime"
"""Adapter that ascends J − σ f: plays λ_σ."""
ADAPTERS = (LAMBDA, LAMBDA_PRIME)


@dataclass
class Rollout:
    """N trajectories of the token MDP, padded to the horizon H.

    `weight` says how much each trajectory counts in an expectation: 1/N for samples, the
    exact probability ν(x)·π(τ|x) when every trajectory was enumerated. Every estimator
    is a weighted sum, which is what lets the exact and the sampled path share one code.
    """

    prompts: list[Any]
    responses: list[Any]
    tokens: Tensor  # [N, H] long; after EOS: padding
    mask: Tensor  # [N, H] float; 1 up to and including EOS, then 0 (absorbing)
    logp: Tensor  # [N, H] log π(a_h|s_h) under the policy that produced it, detached
    ref_logp: Tensor  # [N, H] log π_ref(a_h|s_h), detached
    weight: Tensor  # [N]
    context: Any = None  # what the producing model needs to score it again
    adapter: str = LAMBDA

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def horizon(self) -> int:
        return self.tokens.shape[1]

    def rows(self, index: slice) -> Rollout:
        """The trajectories `index` selects, with their context (a tensor, or an object with `rows`).
        Weights are kept as they are: a piece's weighted sum is its share of the whole batch's."""
        context = self.context[index] if isinstance(self.context, Tensor) else self.context.rows(index)
        tensors = {name: getattr(self, name)[index] for name in ROLLOUT_TENSORS}
        return replace(self, prompts=self.prompts[index], responses=self.responses[index], context=context, **tensors)

    def state_dict(self) -> dict:
        """The rollout as plain values and tensors (a checkpoint's tree): a tensor context as it is,
        any other as its registered name (`rollout_context`) and the dict of its dataclass fields."""
        context = self.context
        if not isinstance(context, Tensor):
            fields = {f.name: getattr(context, f.name) for f in dataclasses.fields(context)}
            context = {"type": type(context).__name__, "fields": fields}
        tensors = {name: getattr(self, name) for name in ROLLOUT_TENSORS}
        return {**tensors, "prompts": list(self.prompts), "responses": list(self.responses), "adapter": self.adapter, "context": context}

    @classmethod
    def from_state(cls, state: dict, device: torch.device | str) -> Rollout:
        """The rollout `state_dict` saved, on `device`."""
        context = state["context"]
        if isinstance(context, Tensor):
            context = context.to(device)
        else:
            fields = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in context["fields"].items()}
            context = CONTEXTS[context["type"]](**fields)
        tensors = {name: state[name].to(device) for name in ROLLOUT_TENSORS}
        return cls(prompts=state["prompts"], responses=state["responses"], adapter=state["adapter"], context=context, **tensors)


ROLLOUT_TENSORS = ("tokens", "mask", "logp", "ref_logp", "weight")
CONTEXTS: dict[str, type] = {}
"""The dataclasses a rollout's context may be, by name: what a checkpoint names to rebuild one."""


def rollout_context(cls: type) -> type:
    """Registers a dataclass as a rollout context that checkpoints can save and restore."""
    CONTEXTS[cls.__name__] = cls
    return cls


@dataclass
class PreferencePairs:
    """Prompt-matched pairs of responses, indices into one rollout, with the oracle's verdict.

    `prob` is the oracle's P(first ≻ second); `label` is what the loss sees: a Bernoulli
    draw of `prob` (y = 1 means the FIRST response is preferred), or `prob` itself when
    the expectation over labels is taken exactly.
    """

    rollout: Rollout
    first: Tensor  # [B] long
    second: Tensor  # [B] long
    weight: Tensor  # [B]
    prob: Tensor | None = None
    label: Tensor | None = None

    def __len__(self) -> int:
        return self.first.shape[0]


@dataclass
class Transitions:
    """(s, a, r, s', a', done) tuples for the critic (Algorithm 2); states as feature vectors."""

    state: Tensor  # [M, d]
    action: Tensor  # [M]
    reward: Tensor  # [M]
    next_state: Tensor  # [M, d]
    next_action: Tensor  # [M] a' ~ π(·|s'), the token the policy sampled next
    next_policy: Tensor  # [M, k] π(·|s') as the Q head summarises it (`summarise`), for the expected-SARSA target
    done: Tensor  # [M] 1 when s' is terminal (EOS taken or horizon reached)

    def __len__(self) -> int:
        return self.action.shape[0]

    def concat(self, other: Transitions) -> Transitions:
        return Transitions(**{k: torch.cat([getattr(self, k), getattr(other, k)]) for k in TRANSITION_FIELDS})

    def slice(self, index: Tensor | slice) -> Transitions:
        return Transitions(**{k: getattr(self, k)[index] for k in TRANSITION_FIELDS})


TRANSITION_FIELDS = ("state", "action", "reward", "next_state", "next_action", "next_policy", "done")


class Policy(Protocol):
    """Two adapters (λ, λ′) on one frozen base; the base alone is the reference π_ref."""

    def adapter(self, name: str) -> AbstractContextManager[None]:
        """Make `name` the active adapter inside the block, and always switch back."""

    def parameters_of(self, name: str) -> list[Tensor]:
        """The trainable tensors of one adapter."""

    def sample(self, prompts: Sequence[Any], generator: torch.Generator) -> Rollout:
        """One trajectory per prompt from the active adapter, with `logp` and `ref_logp` filled."""

    def log_probs(self, rollout: Rollout) -> Tensor:
        """[N, H, V] log π(·|s_h) under the active adapter, differentiable in its parameters."""

    def state_features(self, rollout: Rollout) -> Tensor:
        """[N, H + 1, d] features of s_0 … s_H (detached) for the critic; s_{h+1} = s_h ⊕ a_h."""


class AdapterSwitch:
    """The `adapter(name)` block of the `Policy` protocol: sets `active`, and restores it on exit."""

    active: str | None = LAMBDA

    @contextmanager
    def adapter(self, name: str | None) -> Iterator[None]:
        """`None` disables the adapters: the reference policy."""
        previous, self.active = self.active, name
        try:
            yield
        finally:
            self.active = previous


class RewardModel(Protocol):
    def parameters(self) -> list[Tensor]: ...

    def token_rewards(self, rollout: Rollout) -> Tensor:
        """[N, H] r_φ(s_h, a_h), differentiable in φ, zero after EOS."""

    def member_rewards(self, rollout: Rollout) -> Tensor:
        """[E, N, H] the rewards of each member of an ensemble (E = 1 without one); `token_rewards` is their mean."""


class Critic(Protocol):
    def fit(self, rollout: Rollout, shaped: Tensor, log_probs: Tensor) -> dict[str, float]:
        """Learns from a fresh rollout, its shaped rewards and the policy's log π(·|s_h) [N, H, V]
        (Algorithm 2); returns diagnostics."""

    def relabel(self, shaped_of: Callable[[Rollout], Tensor]) -> None:
        """r_φ has just changed: what the critic replays gets the shaped rewards `shaped_of(rollout)` of now."""

    def advantages(self, rollout: Rollout, shaped: Tensor, log_probs: Tensor) -> Tensor:
        """[N, H] A(s_h, a_h) of the taken tokens under the policy of `log_probs`, detached."""


class RolloutSource(Protocol):
    """Where the loop gets trajectories and pairs: by sampling, or by exact enumeration."""

    def rollouts(self, adapter: str, n: int) -> Rollout: ...

    def pairs(self, adapter: str, n: int) -> PreferencePairs: ...

    def groups(self, adapter: str, n: int, size: int) -> Rollout:
        """n prompts, `size` responses to each, consecutive rows (what `query.select: uncertain` draws from)."""

    def coupled(self, adapters: Sequence[str], n: int) -> list[Rollout]:
        """n trajectories of each adapter on the same prompts and random numbers (common random numbers)."""
