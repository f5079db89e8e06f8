"""The benchmark of issue 7: what one labelled pair costs us, TRL's Online DPO, and the hardware floor.

On one model, prompt set, batch size and horizon it measures, each configuration in a
fresh process of its own (so that peak resident memory is that configuration's alone):

    generate      a plain Hugging Face `generate` of 2B prompts × H tokens on the bare base
                  model: the floor of sampling, and the memory of the base running inference
    lora_step     one LoRA forward+backward over those same tokens: the floor of learning
    bilevel       one outer iteration of Algorithm 1, broken down by phase
    alternating   one outer iteration of the alternating baseline (standard online RLHF)
    online_dpo    TRL's Online DPO for the same number of labelled pairs, B(K+1)

The floor of a configuration is its generated tokens × (generate + lora_step seconds per
token): every sampled token has to be generated once and, on-policy, learnt from once.
Phases are exclusive wall time: the rollout phase excludes the reference pass it makes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from transformers import GenerationConfig

from rlhf_bilevel.allocator import heap_reuse, return_freed_memory
from rlhf_bilevel.config import ConfigError
from rlhf_bilevel.distributed import resolve_device
from rlhf_bilevel.lm.model import load_base, native_bf16, resolve, resolve_dtype
from rlhf_bilevel.online_dpo import rendered, single_adapter, train_online_dpo
from rlhf_bilevel.prompts import load_prompts
from rlhf_bilevel.recipe import Recipe, load_recipe
from rlhf_bilevel.train import Trainer

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
DEFAULT_RECIPE = RECIPES / "smollm2-sentiment.yaml"
QUICK_RECIPE = RECIPES / "tiny-debug.yaml"
SETTINGS = ["rollout.max_new_tokens=32", "adapters.r=16", "adapters.alpha=32", "adapters.target_modules=[all-linear]"]
"""The issue's settings: 32 new tokens, LoRA r16 on all linear layers (B = 4 pairs per step in both recipes)."""
WORKERS = ("floors", "bilevel", "alternating", "online_dpo")
CONFIGS = WORKERS[1:]
"""What `--only` may pick; the floors are always measured, every ratio is to them."""
BILEVEL_PHASES = ("rollouts", "reference", "oracle", "critic", "reward", "lambda_step", "lambda_prime_step", "phi_step")


class PhaseTimer:
    """Exclusive wall time per phase. `mark(name)` sets the phase the loop is in; `phase(name)`
    blocks nest inside it and pause it, so every second is charged to exactly one phase."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self.seconds: dict[str, float] = defaultdict(float)
        self.stack: list[str] = []
        self.base: str | None = None
        self.last = clock()

    def charge(self) -> None:
        now = self.clock()
        current = self.stack[-1] if self.stack else self.base
        if current is not None:
            self.seconds[current] += now - self.last
        self.last = now

    def mark(self, name: str | None) -> None:
        self.charge()
        self.base = name

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self.charge()
        self.stack.append(name)
        try:
            yield
        finally:
            self.charge()
            self.stack.pop()

    def instrument(self, obj: Any, method: str, phase: str | Callable[[], str | None]) -> None:
        """Replaces `obj.method` on the instance by a timed call; `phase` may decide per call (None: not timed)."""
        inner = getattr(obj, method)

        def timed(*args: Any, **kwargs: Any) -> Any:
            name = phase() if callable(phase) else phase
            if name is None:
                return inner(*args, **kwargs)
            with self.phase(name):
                return inner(*args, **kwargs)

        setattr(obj, method, timed)


def peak_rss_mb() -> float:
    """This process's peak resident set size (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def floor_batch(recipe: Recipe, base_dir: Path) -> list[str]:
    """2B train prompts, two completions each: the batch of one labelling step."""
    prompts, _ = load_prompts(recipe.prompts, base_dir)
    b = recipe.bilevel.pairs_per_step
    return [prompts[i % len(prompts)] for i in range(b) for _ in range(2)]


def encoded(recipe: Recipe, tokenizer, prompts: list[str]) -> dict[str, torch.Tensor]:
    texts = rendered(prompts, tokenizer, recipe.model.chat_template)
    return tokenizer(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)


def sampled(model, tokenizer, batch: dict[str, torch.Tensor], horizon: int) -> torch.Tensor:
    """Exactly `horizon` tokens per row at temperature 1 (EOS cannot stop a row early, so the count is exact)."""
    config = GenerationConfig(
        do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=horizon, min_new_tokens=horizon,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return model.generate(**batch, generation_config=config)


def timed(fn: Callable[[], Any], repeats: int) -> float:
    """The fastest of `repeats` timed calls, after one untimed warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def measure_floors(recipe: Recipe, base_dir: Path, repeats: int) -> dict[str, dict]:
    """The generate floor on the bare base first, so that the peak memory then is the base's inference
    alone; then the LoRA step floor on the tokens it generated."""
    base, tokenizer = load_base(recipe.model, resolve_device(recipe.train.device))
    batch = encoded(recipe, tokenizer, floor_batch(recipe, base_dir)).to(base.device)
    horizon = recipe.rollout.max_new_tokens
    tokens = batch["input_ids"].shape[0] * horizon
    with torch.no_grad(), heap_reuse():  # the allocator setting our sampling runs with
        seconds = timed(lambda: sampled(base, tokenizer, batch, horizon), repeats)
        generate = {"seconds": seconds, "tokens": tokens, "peak_rss_mb": peak_rss_mb()}
        sequences = sampled(base, tokenizer, batch, horizon)
    model = single_adapter(base, recipe.adapters)
    mask = torch.cat([batch["attention_mask"], torch.ones_like(sequences[:, -horizon:])], 1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)

    def step() -> None:
        logits = model(input_ids=sequences[:, :-1], attention_mask=mask[:, :-1], position_ids=positions[:, :-1],
                       logits_to_keep=horizon, use_cache=False).logits
        log_probs = torch.log_softmax(logits.float(), -1).gather(-1, sequences[:, -horizon:, None])
        log_probs.sum().backward()

    lora_step = {"seconds": timed(step, repeats), "tokens": tokens, "peak_rss_mb": peak_rss_mb()}
    return {"generate": generate, "lora_step": lora_step}


def instrument(trainer: Trainer, timer: PhaseTimer) -> None:
    """Times the parts the trainer hands Algorithm 1, and its phase marks, into `timer` (BILEVEL_PHASES)."""
    policy, bilevel = trainer.policy, trainer.bilevel
    timer.instrument(policy, "sample", "rollouts")
    timer.instrument(policy, "reference", "reference")
    timer.instrument(trainer.labeller, "ask", "oracle")
    timer.instrument(trainer.reward, "token_rewards", "reward")
    for critic in bilevel.critics.values():
        timer.instrument(critic, "fit", "critic")
        timer.instrument(critic, "advantages", "critic")
    bilevel.on_phase = timer.mark


def measure_outer_step(recipe: Recipe, base_dir: Path, warmup: int) -> dict:
    """One outer iteration (after `warmup` untimed ones), with its phases."""
    with tempfile.TemporaryDirectory(prefix="rlhf-bench-") as run_dir:
        trainer = Trainer(recipe, Path(run_dir), base_dir)
        for _ in range(warmup):
            trainer.bilevel.outer_step()
        timer = PhaseTimer()
        instrument(trainer, timer)
        policy, bilevel = trainer.policy, trainer.bilevel
        tokens, pairs = policy.tokens_generated, bilevel.oracle_pairs
        start = time.perf_counter()
        timer.mark(None)
        bilevel.outer_step()
        timer.mark(None)
        seconds = time.perf_counter() - start
        return {
            "seconds": seconds,
            "pairs": bilevel.oracle_pairs - pairs,
            "tokens": policy.tokens_generated - tokens,
            "phases": {name: timer.seconds.get(name, 0.0) for name in BILEVEL_PHASES},
        }


def measure_online_dpo(recipe: Recipe, base_dir: Path) -> dict:
    with tempfile.TemporaryDirectory(prefix="rlhf-bench-") as out:
        result = train_online_dpo(recipe, Path(out) / "run", base_dir, pairs=recipe.bilevel.pairs_per_outer_step)
    return {"seconds": result.seconds, "pairs": result.oracle_pairs, "tokens": result.tokens_generated}


def worker(config: str, recipe_path: Path, overrides: list[str], repeats: int, warmup: int, threads: int | None = None) -> dict[str, dict]:
    """Measures one worker's configurations in this process, with the process's peak RSS."""
    if threads:
        torch.set_num_threads(threads)
    recipe = load_recipe(recipe_path, overrides)
    if recipe.train.return_freed_memory:  # every configuration, the floors too, on the same allocator
        return_freed_memory()
    base_dir = recipe_path.resolve().parent
    if config == "floors":
        return measure_floors(recipe, base_dir, repeats)
    if config == "online_dpo":
        result = measure_online_dpo(recipe, base_dir)
    else:
        result = measure_outer_step(load_recipe(recipe_path, [*overrides, f"bilevel.method={config}"]), base_dir, warmup)
    return {config: {**result, "peak_rss_mb": peak_rss_mb()}}


def run_worker(config: str, recipe_path: Path, overrides: list[str], repeats: int, warmup: int, threads: int | None = None) -> dict[str, dict]:
    """`worker` in a fresh interpreter, so that its peak memory is its own."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        command = [sys.executable, "-m", "rlhf_bilevel.bench", "--worker", config, "--recipe", str(recipe_path),
                   "--repeats", str(repeats), "--warmup", str(warmup), "--result", out.name]
        command += ["--threads", str(threads)] if threads else []
        command += [arg for override in overrides for arg in ("--set", override)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            tail = "\n".join(done.stderr.strip().splitlines()[-15:])
            raise RuntimeError(f"bench worker {config!r} failed (exit {done.returncode}):\n{tail}")
        return json.loads(Path(out.name).read_text(encoding="utf-8"))


def summarise(results: dict[str, dict]) -> dict[str, dict]:
    """Seconds per labelled pair, tokens per second, ratio to the floor and to the base's memory, per configuration."""
    floor_per_token = sum(results[k]["seconds"] / results[k]["tokens"] for k in ("generate", "lora_step"))
    base_rss = results["generate"]["peak_rss_mb"]
    rows = {}
    for name, r in results.items():
        row = {"tokens_per_s": r["tokens"] / r["seconds"], "peak_rss_mb": r["peak_rss_mb"], "rss_to_base": r["peak_rss_mb"] / base_rss}
        if "pairs" in r:
            row["s_per_pair"] = r["seconds"] / r["pairs"]
            row["floor_s"] = r["tokens"] * floor_per_token
            row["to_floor"] = r["seconds"] / row["floor_s"]
        rows[name] = row
    return rows


def table(rows: dict[str, dict]) -> str:
    def cell(row: dict, key: str, fmt: str) -> str:
        return format(row[key], fmt) if key in row else "–"

    lines = ["| configuration | s / labelled pair | generated tokens / s | × floor | peak RSS (MB) | × base inference RSS |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, row in rows.items():
        lines.append(f"| {name} | {cell(row, 's_per_pair', '.2f')} | {row['tokens_per_s']:.1f} | {cell(row, 'to_floor', '.2f')} "
                     f"| {row['peak_rss_mb']:.0f} | {row['rss_to_base']:.2f} |")
    return "\n".join(lines)


def phase_table(phases: dict[str, dict[str, float]]) -> str:
    lines = ["| phase | " + " | ".join(phases) + " |", "|---|" + "---:|" * len(phases)]
    for phase in BILEVEL_PHASES:
        lines.append(f"| {phase} | " + " | ".join(f"{p[phase]:.2f}" for p in phases.values()) + " |")
    lines.append("| total of phases | " + " | ".join(f"{sum(p.values()):.2f}" for p in phases.values()) + " |")
    return "\n".join(lines)


def machine(threads: int | None) -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": threads or torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu_native_bf16": native_bf16(torch.device("cpu")),  # what model.dtype=auto decides by
        "load_average": os.getloadavg(),
    }


def run_benchmark(recipe_path: Path, overrides: list[str], out: Path, repeats: int = 2, warmup: int = 0,
                  log: Callable[[str], None] = print, threads: int | None = None, configs: tuple[str, ...] = CONFIGS) -> dict:
    """The floors, then each of `configs` in turn, each in its own process (with `threads` torch
    threads, default torch's own); writes `out` (bench.json) and returns its content."""
    recipe = load_recipe(recipe_path, overrides)  # a bad recipe or override fails here, before any worker starts
    resolve(recipe.model.name)  # a GGUF model is converted now: converting in a worker would count in its peak memory
    started = os.getloadavg()
    results = {}
    for config in ("floors", *configs):
        log(f"measuring {config} ...")
        results.update(run_worker(config, recipe_path, overrides, repeats, warmup, threads))
    rows = summarise(results)
    dtype = resolve_dtype(recipe.model.dtype, resolve_device(recipe.train.device))  # what `auto` took here
    phases = {k: results[k]["phases"] for k in ("bilevel", "alternating") if k in results}
    report = {
        "recipe": str(recipe_path),
        "overrides": overrides,
        "settings": {"model": recipe.model.name, "dtype": str(dtype).removeprefix("torch."), "max_new_tokens": recipe.rollout.max_new_tokens,
                     "pairs_per_step": recipe.bilevel.pairs_per_step, "inner_steps": recipe.bilevel.inner_steps,
                     "trajectories_per_step": recipe.bilevel.trajectories_per_step,
                     "pairs_per_outer_step": recipe.bilevel.pairs_per_outer_step, "lora_r": recipe.adapters.r},
        "machine": {**machine(threads), "load_average_at_start": started},
        "results": results,
        "summary": rows,
        "table": table(rows),
        "phase_table": phase_table(phases),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1), encoding="utf-8")
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="scripts/bench.py", description=__doc__.split("\n")[0])
    parser.add_argument("--recipe", type=Path, default=None, help=f"recipe to measure (default {DEFAULT_RECIPE.name}; --quick: {QUICK_RECIPE.name})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="recipe override a.b=value (repeatable), after the issue's settings")
    parser.add_argument("--quick", action="store_true", help="the tiny model: the whole benchmark in under a minute")
    parser.add_argument("--out", type=Path, default=Path("bench.json"), help="where to write the results")
    parser.add_argument("--repeats", type=int, default=2, help="timed repeats of each floor (the fastest counts)")
    parser.add_argument("--warmup", type=int, default=0, help="untimed outer iterations before the timed one")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of every worker (default torch's own); 1 on a machine shared with other jobs, "
                             "where threads waiting on each other at every small kernel slow decoding several-fold")
    parser.add_argument("--only", nargs="+", choices=CONFIGS, default=list(CONFIGS),
                        help="the configurations to measure besides the floors (default all)")
    parser.add_argument("--worker", choices=WORKERS, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    recipe = args.recipe or (QUICK_RECIPE if args.quick else DEFAULT_RECIPE)
    try:
        if args.worker:
            result = worker(args.worker, recipe, args.overrides, args.repeats, args.warmup, args.threads)
            args.result.write_text(json.dumps(result), encoding="utf-8")
            return
        report = run_benchmark(recipe, [*SETTINGS, *args.overrides], args.out, args.repeats, args.warmup, threads=args.threads,
                               configs=tuple(args.only))
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    print(f"\n{report['settings']}\n\n{report['table']}\n\nphases of one outer iteration (s):\n{report['phase_table']}\n\nwrote {args.out}")


if __name__ == "__main__":
    main()
