"""What a run asks of the machine, checked before a model is loaded or a file is written.

Each refusal is one ConfigError line that names the field and the fix:

- the run folder can be made and written (`--output-dir`, `--resume`);
- a prompt and its response fit the model's context: rollout.max_prompt_tokens +
  rollout.max_new_tokens ≤ the positions in the model's config (config.json or GGUF metadata;
  no weights are read);
- the run's memory, estimated from the recipe and the model's shape, fits what the device has free.

The memory estimate, in bytes, with d, L, V, W the model's width, layers, vocabulary and MLP width,
P its parameters, w the bytes of a base weight (2 in bf16, else 4), H = max_new_tokens,
T = max_prompt_tokens + H, n = trajectories_per_step, B = pairs_per_step, c the responses drawn
per prompt (query.candidates with select: uncertain, else 2), K = inner_steps, E = eval_pairs,
R = max(n, B·c, 2E) the largest batch sampled at once, m = min(micro_batch, max(n, B·c)) the rows
of one backward pass, and 4-byte floats elsewhere:

    base model          P·w
    adapters            3 adapters × r·L·(11d + 3W) × 4 bytes × 4 (weights, gradients, Adam's two moments)
    sampling            R·T·2·L·d·w (keys and values) + R·V·4 (a step's logits) + R·(H+1)·2d·4 (features kept)
    log π, backward     m·T·L·(6d + 2W)·4 (activations; d instead of 6d + 2W with gradient_checkpointing)
                        + m·H·V·4·2 (logits and their log-softmax)
    outer step          (K+1)·max(n, B·c)·(H+1)·2d·4: the trajectories the penalty reads
    preference store    outer_steps·(K+1)·B·2·(H+1)·2d·4 with reward_fit.replay (else one outer step's)
    critic replay       replay_capacity·2d·4
    critic batch        batch_size·V·4·3 (π, Q and their product over the vocabulary)
    reward heads        heads·max(hidden, 1)·(d + R·(H+1))·4
    judge's words       P·4 with reward.judge.words and a base that is not float32: the float32 copy
                        that reads words (lm/judge.py)
    oracle model        P_o·w_o, for the llm-judge and reward-model oracles, whose shape is read as the base's is
    oracle batch        batch_size·2T·(L_o·d_o·w_o + V_o·4): a batch of prompts with both responses

It is a rough guide, not a bound: keys and values are counted at the full width d (most models
keep fewer heads for them), while what the libraries keep besides is left out. It is there to
refuse, in a second, a run that is orders of magnitude too big, before it takes the machine down.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhf_bilevel.config import ConfigError, shown
from rlhf_bilevel.lm.model import EMBEDDED, ModelConfig, Shape, model_shape, resolve_dtype
from rlhf_bilevel.oracles.base import as_oracle_model
from rlhf_bilevel.recipe import Recipe

FLOAT = 4
GIB = 2**30
MODEL_ORACLES = ("llm-judge", "reward-model")
"""The oracle kinds that load a model named by `oracle.model`."""


@dataclass(frozen=True)
class Term:
    """One line of the memory estimate: what it holds, its bytes, and the recipe fields that are its
    factors; the largest factor is the one to lower."""

    what: str
    bytes: int
    factors: dict[str, int]

    @property
    def field(self) -> str:
        return max(self.factors, key=self.factors.get)


@dataclass(frozen=True)
class MemoryEstimate:
    terms: list[Term]
    available: int | None  # bytes free on the device; None where it cannot be read
    device: str

    @property
    def total(self) -> int:
        return sum(term.bytes for term in self.terms)

    def describe(self) -> str:
        parts = ", ".join(f"{term.what} {size(term.bytes)}" for term in self.terms)
        free = f"{size(self.available)} free on {self.device}" if self.available is not None else f"free memory of {self.device} unknown"
        return f"estimated memory {size(self.total)} ({parts}); {free}"


def size(n: int) -> str:
    return f"{n / GIB:.3g} GiB"


def one_line(path: Path) -> str:
    """A path as the user typed it, with any line break in a name escaped: an error stays one line."""
    return str(path).replace("\n", "\\n").replace("\r", "\\r")


def check_output_dir(run_dir: Path, option: str) -> None:
    """`run_dir` is a folder this process can write in, or one it can make: tried with a probe
    folder made and removed at once in the nearest folder that exists, since permissions alone do
    not tell (root, read-only mounts, /proc)."""
    existing = run_dir
    try:
        existing = Path(os.path.abspath(run_dir))
        while not existing.exists() and not existing.is_symlink():
            existing = existing.parent
        if not existing.is_dir():
            raise ConfigError(f"{option}: {one_line(existing)} is a file, not a folder; pick a folder path")
        os.rmdir(tempfile.mkdtemp(prefix=".rlhf-bilevel-probe-", dir=existing))
    except ConfigError:
        raise
    except OSError as error:
        raise ConfigError(f"{option}: cannot write in {one_line(existing)} ({error.strerror or error}); pick a folder you can write to") from None
    except ValueError as error:  # a NUL byte, or an encoding the file system refuses
        raise ConfigError(f"{option}: {shown(str(run_dir))} is not a valid path ({error})") from None


def check_context(recipe: Recipe, shape: Shape) -> None:
    rollout = recipe.rollout
    if shape.context is None or rollout.max_prompt_tokens + rollout.max_new_tokens <= shape.context:
        return
    room = shape.context - rollout.max_prompt_tokens
    too_long = f"{rollout.max_prompt_tokens} prompt tokens and {rollout.max_new_tokens} new ones exceed the {shape.context} positions of {recipe.model.name}"
    if room > 0:
        raise ConfigError(f"rollout.max_new_tokens: {too_long}; set rollout.max_new_tokens ≤ {room} (or lower rollout.max_prompt_tokens)")
    raise ConfigError(f"rollout.max_prompt_tokens: {too_long}; set rollout.max_prompt_tokens < {shape.context}")


def check_reward_layer(recipe: Recipe, shape: Shape) -> None:
    layer = recipe.reward.layer
    if layer is not None and layer > shape.layers:
        raise ConfigError(f"reward.layer: {recipe.model.name} has layers 0 (the embeddings) to {shape.layers}; got {layer}")


def estimate(recipe: Recipe, shape: Shape, device: torch.device) -> list[Term]:
    """The terms of the module's formula."""
    b, r, ro = recipe.bilevel, recipe.rollout, recipe.reward
    d, layers, vocab, width = shape.hidden, shape.layers, shape.vocab, shape.intermediate
    w = torch.finfo(resolve_dtype(recipe.model.dtype, device)).bits // 8
    h, t = r.max_new_tokens, r.max_prompt_tokens + r.max_new_tokens
    per_prompt = b.query.candidates if b.query.select == "uncertain" else 2
    batches = {
        "bilevel.trajectories_per_step": b.trajectories_per_step,
        "bilevel.pairs_per_step": b.pairs_per_step * per_prompt,
        "train.eval_pairs": 2 * recipe.train.eval_pairs,
    }
    rows_field = max(batches, key=batches.get)
    rows = batches[rows_field]
    train_field = max(list(batches)[:2], key=batches.get)  # the batches a backward pass runs on
    train_rows = batches[train_field]
    grad_rows = min(b.micro_batch or train_rows, train_rows)
    grad_field = "bilevel.micro_batch" if grad_rows < train_rows else train_field
    per_token = d if r.gradient_checkpointing else 6 * d + 2 * width
    state = (h + 1) * 2 * d * FLOAT  # the features kept of one response
    stored_steps = b.outer_steps if b.reward_fit.replay else 1
    return [
        Term("base model", shape.parameters * w, {"model.name": 1}),
        Term("adapters", 3 * recipe.adapters.r * layers * (11 * d + 3 * width) * FLOAT * 4, {"adapters.r": recipe.adapters.r}),
        Term("sampling", rows * (t * 2 * layers * d * w + vocab * FLOAT + state), {rows_field: rows}),
        Term("log π backward", grad_rows * (t * layers * per_token * FLOAT + h * vocab * FLOAT * 2), {grad_field: grad_rows}),
        Term("outer step", (b.inner_steps + 1) * train_rows * state, {"bilevel.inner_steps": b.inner_steps, train_field: train_rows}),
        Term(
            "preference store", stored_steps * (b.inner_steps + 1) * b.pairs_per_step * 2 * state,
            {"bilevel.outer_steps": stored_steps, "bilevel.inner_steps": b.inner_steps, "bilevel.pairs_per_step": b.pairs_per_step},
        ),
        Term("critic replay", b.critic.replay_capacity * 2 * d * FLOAT, {"bilevel.critic.replay_capacity": b.critic.replay_capacity}),
        Term("critic batch", b.critic.batch_size * vocab * FLOAT * 3, {"bilevel.critic.batch_size": b.critic.batch_size}),
        Term("reward heads", ro.heads * max(ro.hidden, 1) * (d + rows * (h + 1)) * FLOAT, {"reward.heads": ro.heads, "reward.hidden": ro.hidden}),
        *judge_terms(recipe, shape, w),
    ]


def judge_terms(recipe: Recipe, shape: Shape, w: int) -> list[Term]:
    """The float32 copy of the base that reads the judge's words, where the base is not float32 already."""
    judge = recipe.reward.judge
    if not (judge.asks and judge.words) or w == FLOAT:
        return []
    return [Term("judge's words", shape.parameters * FLOAT, {"reward.judge.words": 1})]


def oracle_terms(recipe: Recipe, device: torch.device) -> list[Term]:
    """The judging model's weights and one batch through it, for an oracle that loads a model."""
    oracle = recipe.oracle
    if oracle.kind not in MODEL_ORACLES or (oracle.model is None and oracle.kind == "reward-model"):
        return []  # a reward-model oracle without a model is refused as it is made, with its own message
    with as_oracle_model():
        shape = model_shape(ModelConfig(name=oracle.model or EMBEDDED, dtype=oracle.dtype))
    if shape is None:
        return []
    w = torch.finfo(resolve_dtype(oracle.dtype, device)).bits // 8
    tokens = 2 * (recipe.rollout.max_prompt_tokens + recipe.rollout.max_new_tokens)
    return [
        Term("oracle model", shape.parameters * w, {"oracle.model": 1}),
        Term(
            "oracle batch", oracle.batch_size * tokens * (shape.layers * shape.hidden * w + shape.vocab * FLOAT),
            {"oracle.batch_size": oracle.batch_size},
        ),
    ]


def available_memory(device: torch.device) -> int | None:
    """Bytes free for this process: the GPU's free memory on CUDA, else the kernel's MemAvailable."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


def preflight(recipe: Recipe, device: torch.device) -> MemoryEstimate | None:
    """Refuses a run that overflows its model's context or would not fit in memory; returns the
    memory estimate (None where the model's shape is unknown)."""
    shape = model_shape(recipe.model)
    if shape is None:
        return None
    check_context(recipe, shape)
    check_reward_layer(recipe, shape)
    result = MemoryEstimate(estimate(recipe, shape, device) + oracle_terms(recipe, device), available_memory(device), str(device))
    if result.available is not None and result.total > result.available:
        worst = max(result.terms, key=lambda term: term.bytes)
        raise ConfigError(
            f"{worst.field}: the run needs about {size(result.total)} ({worst.what} {size(worst.bytes)} of it), more than "
            f"the {size(result.available)} free on {device}; lower {worst.field} (the estimate: README, \"Hostile input\")"
        )
    return result
