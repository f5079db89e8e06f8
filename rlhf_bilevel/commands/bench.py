"""The benchmark: what one labelled pair costs us, TRL's Online DPO, and the hardware floor.

On one model, prompt set, batch size and horizon it measures, in float32 and in bf16, each
configuration in a fresh process of its own (so that peak resident memory is that
configuration's alone):

    generate      a plain Hugging Face `generate` of 2B prompts × H tokens on the bare base
                  model: the floor of sampling, and the memory of the base running inference
    lora_step     one LoRA forward+backward over those same tokens: the floor of learning
    bilevel       one outer iteration of Algorithm 1, broken down by phase
    alternating   one outer iteration of the alternating baseline (standard online RLHF)
    online_dpo    TRL's Online DPO for the same number of labelled pairs, B(K+1)

The floor of a configuration is its generated tokens × (generate + lora_step seconds per
token): every sampled token has to be generated once and, on-policy, learnt from once.
Phases are exclusive wall time: the rollout phase excludes the reference pass it makes.

A method's bf16 path is every method's natural one: the base's weights in bf16 and every
forward under bf16 autocast (`model.dtype=bfloat16`, `rollout.autocast=auto`, which TRL
follows with `bf16=True`); its float32 path has neither. Which is faster depends on the
hardware (a CPU without avx512_bf16 emulates bf16), so each method is measured in both and
compared at its best: the headline ratio is our seconds per labelled pair at our best dtype
over TRL's at TRL's best, from the same run. Every configuration reports the settings it
actually ran with, read from the objects that ran (generation length, labelled batch, LoRA,
dtype path, device), and the benchmark refuses to report a comparison whose settings differ.
On a GPU every clock reading waits for the device's queued kernels first.
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
from rlhf_bilevel.collectives import World
from rlhf_bilevel.commands.train import build
from rlhf_bilevel.distributed import resolve_device
from rlhf_bilevel.environment import quiet_libraries
from rlhf_bilevel.lm.model import DTYPES, adapter_settings, load_base, native_bf16, resolve, resolve_dtype
from rlhf_bilevel.online_dpo import rendered, single_adapter, train_online_dpo
from rlhf_bilevel.prompts import load_prompts
from rlhf_bilevel.recipe import Recipe, load_recipe
from rlhf_bilevel.trainer import Trainer

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
DEFAULT_RECIPE = RECIPES / "smollm2-sentiment.yaml"
QUICK_RECIPE = RECIPES / "tiny-debug.yaml"
SETTINGS = ["rollout.max_new_tokens=32", "adapters.r=16", "adapters.alpha=32", "adapters.target_modules=[all-linear]"]
"""The issue's settings: 32 new tokens, LoRA r16 on all linear layers (B = 4 pairs per step in both recipes)."""
WORKERS = ("floors", "bilevel", "alternating", "online_dpo")
CONFIGS = WORKERS[1:]
"""The methods; the floors are always measured, every ratio is to them."""
OURS = ("bilevel", "alternating")
PEER = "online_dpo"
SHARED_SETTINGS = ("max_new_tokens", "pairs_per_step", "labelled_pairs", "lora_r", "lora_alpha", "lora_targets", "device")
"""What every method must run with for a comparison to count, whatever its dtype."""
DTYPE_SETTINGS = ("base_dtype", "autocast")
"""What every method must run with in the same dtype."""
BILEVEL_PHASES = (
    "rollouts", "judge", "judge_words", "reference", "oracle", "critic", "reward", "lambda_step", "lambda_prime_step", "phi_step",
)


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


def dtype_overrides(dtype: str) -> list[str]:
    """A method's path in `dtype`: the base's weights in it, and bf16 autocast exactly when they are bf16."""
    return [f"model.dtype={dtype}", "rollout.autocast=auto"]


def clock_on(device: torch.device) -> Callable[[], float]:
    """`time.perf_counter`, read once the device has run what was queued on it: CUDA kernels run
    asynchronously, and their time would be charged to whatever next waits for them."""
    if device.type != "cuda":
        return time.perf_counter

    def clock() -> float:
        torch.cuda.synchronize(device)
        return time.perf_counter()

    return clock


def device_memory(device: torch.device) -> dict[str, float]:
    """The peak memory allocated on a GPU so far (nothing on a CPU, where the RSS says it)."""
    return {"peak_gpu_mb": torch.cuda.max_memory_allocated(device) / 2**20} if device.type == "cuda" else {}


def timed(fn: Callable[[], Any], repeats: int, clock: Callable[[], float] = time.perf_counter) -> float:
    """The fastest of `repeats` timed calls, after one untimed warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = clock()
        fn()
        best = min(best, clock() - start)
    return best


def measure_floors(recipe: Recipe, base_dir: Path, repeats: int) -> dict[str, dict]:
    """The generate floor on the bare base first, so that the peak memory then is the base's inference
    alone; then the LoRA step floor on the tokens it generated."""
    device = resolve_device(recipe.train.device)
    clock = clock_on(device)
    base, tokenizer = load_base(recipe.model, device)
    batch = encoded(recipe, tokenizer, floor_batch(recipe, base_dir)).to(device)
    horizon = recipe.rollout.max_new_tokens
    tokens = batch["input_ids"].shape[0] * horizon
    with torch.no_grad(), heap_reuse():  # the allocator setting our sampling runs with
        seconds = timed(lambda: sampled(base, tokenizer, batch, horizon), repeats, clock)
        generate = {"seconds": seconds, "tokens": tokens, "peak_rss_mb": peak_rss_mb(), **device_memory(device)}
        sequences = sampled(base, tokenizer, batch, horizon)
    model = single_adapter(base, recipe.adapters)
    mask = torch.cat([batch["attention_mask"], torch.ones_like(sequences[:, -horizon:])], 1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)

    def step() -> None:
        logits = model(input_ids=sequences[:, :-1], attention_mask=mask[:, :-1], position_ids=positions[:, :-1],
                       logits_to_keep=horizon, use_cache=False).logits
        log_probs = torch.log_softmax(logits.float(), -1).gather(-1, sequences[:, -horizon:, None])
        log_probs.sum().backward()

    lora_step = {"seconds": timed(step, repeats, clock), "tokens": tokens, "peak_rss_mb": peak_rss_mb(), **device_memory(device)}
    return {"generate": generate, "lora_step": lora_step}


def instrument(trainer: Trainer, timer: PhaseTimer) -> None:
    """Times the parts the trainer hands Algorithm 1, and its phase marks, into `timer` (BILEVEL_PHASES)."""
    policy, bilevel = trainer.policy, trainer.bilevel
    timer.instrument(policy, "sample", "rollouts")
    if policy.judge is not None:  # asked as rollouts are sampled; its words read in float32 (lm/judge.py)
        timer.instrument(policy.judge, "ask", "judge")
        timer.instrument(policy.judge, "read_words", "judge_words")
    timer.instrument(policy, "reference", "reference")
    timer.instrument(trainer.labeller, "ask", "oracle")
    timer.instrument(trainer.reward, "token_rewards", "reward")
    for critic in bilevel.critics.values():
        timer.instrument(critic, "fit", "critic")
        timer.instrument(critic, "advantages", "critic")
    bilevel.on_phase = timer.mark


def trainer_settings(trainer: Trainer) -> dict:
    """What one of our methods ran with, read from the objects that ran it."""
    policy, recipe = trainer.policy, trainer.recipe
    return {
        "max_new_tokens": policy.cfg.max_new_tokens, "pairs_per_step": recipe.bilevel.pairs_per_step,
        "trajectories_per_step": recipe.bilevel.trajectories_per_step, **adapter_settings(trainer.model),
        "base_dtype": str(policy.head.weight.dtype).removeprefix("torch."), "autocast": policy.autocasting,
        "device": str(policy.device),
    }


def measure_outer_step(recipe: Recipe, base_dir: Path, warmup: int) -> dict:
    """One outer iteration (after `warmup` untimed ones), with its phases, on the recipe's device."""
    device = resolve_device(recipe.train.device)
    with tempfile.TemporaryDirectory(prefix="rlhf-bench-") as run_dir:
        trainer = build(recipe, Path(run_dir), base_dir, World(device))
        for _ in range(warmup):
            trainer.bilevel.outer_step()
        clock = clock_on(device)
        timer = PhaseTimer(clock)
        instrument(trainer, timer)
        policy, bilevel = trainer.policy, trainer.bilevel
        tokens, pairs = policy.tokens_generated, bilevel.oracle_pairs
        start = clock()
        timer.mark(None)
        bilevel.outer_step()
        timer.mark(None)
        seconds = clock() - start
        pairs = bilevel.oracle_pairs - pairs
        return {
            "seconds": seconds,
            "pairs": pairs,
            "tokens": policy.tokens_generated - tokens,
            "phases": {name: timer.seconds.get(name, 0.0) for name in BILEVEL_PHASES},
            "settings": {**trainer_settings(trainer), "labelled_pairs": pairs},
            **device_memory(device),
        }


def measure_online_dpo(recipe: Recipe, base_dir: Path) -> dict:
    with tempfile.TemporaryDirectory(prefix="rlhf-bench-") as out:
        result = train_online_dpo(recipe, Path(out) / "run", base_dir, pairs=recipe.bilevel.pairs_per_outer_step)
    device = torch.device(result.settings["device"])
    return {"seconds": result.seconds, "pairs": result.oracle_pairs, "tokens": result.tokens_generated,
            "settings": {**result.settings, "labelled_pairs": result.oracle_pairs}, **device_memory(device)}


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
    if config == PEER:
        result = measure_online_dpo(recipe, base_dir)
    else:
        result = measure_outer_step(load_recipe(recipe_path, [*overrides, f"bilevel.method={config}"]), base_dir, warmup)
    return {config: {**result, "peak_rss_mb": peak_rss_mb()}}


Runner = Callable[..., dict[str, dict]]  # `worker`'s arguments


def run_worker(config: str, recipe_path: Path, overrides: list[str], repeats: int, warmup: int, threads: int | None = None) -> dict[str, dict]:
    """`worker` in a fresh interpreter, so that its peak memory is its own."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        command = [sys.executable, "-m", "rlhf_bilevel.commands.bench", "--worker", config, "--recipe", str(recipe_path),
                   "--repeats", str(repeats), "--warmup", str(warmup), "--result", out.name]
        command += ["--threads", str(threads)] if threads else []
        command += [arg for override in overrides for arg in ("--set", override)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            tail = "\n".join(done.stderr.strip().splitlines()[-15:])
            raise RuntimeError(f"bench worker {config!r} failed (exit {done.returncode}):\n{tail}")
        return json.loads(Path(out.name).read_text(encoding="utf-8"))


def floor_per_token(results: dict[str, dict]) -> float:
    """Seconds per generated token of the floor: one plain generation and one plain LoRA step over it."""
    return sum(results[k]["seconds"] / results[k]["tokens"] for k in ("generate", "lora_step"))


def summarise(results: dict[str, dict]) -> dict[str, dict]:
    """Seconds per labelled pair, tokens per second, ratio to the floor and to the base's memory, per
    configuration of one dtype (its floor and its base's memory are that dtype's)."""
    floor = floor_per_token(results)
    base_rss = results["generate"]["peak_rss_mb"]
    rows = {}
    for name, r in results.items():
        row = {"tokens_per_s": r["tokens"] / r["seconds"], "peak_rss_mb": r["peak_rss_mb"], "rss_to_base": r["peak_rss_mb"] / base_rss}
        if "peak_gpu_mb" in r:
            row["peak_gpu_mb"] = r["peak_gpu_mb"]
        if "pairs" in r:
            row["s_per_pair"] = r["seconds"] / r["pairs"]
            row["tokens_per_pair"] = r["tokens"] / r["pairs"]
            row["floor_s"] = r["tokens"] * floor
            row["to_floor"] = r["seconds"] / row["floor_s"]
        rows[name] = row
    return rows


def best_of(results: dict[str, dict[str, dict]]) -> dict[str, dict]:
    """Each method at its fastest dtype (fewest seconds per labelled pair), from {dtype: {configuration: result}};
    `to_fastest_floor` is to the floor of the fastest dtype, the hardware's best."""
    floor = min(floor_per_token(by_config) for by_config in results.values())
    best = {}
    for method in CONFIGS:
        measured = {dtype: by_config[method] for dtype, by_config in results.items() if method in by_config}
        if not measured:
            continue
        dtype = min(measured, key=lambda d: measured[d]["seconds"] / measured[d]["pairs"])
        r = measured[dtype]
        best[method] = {"dtype": dtype, "s_per_pair": r["seconds"] / r["pairs"],
                        "to_fastest_floor": r["seconds"] / (r["tokens"] * floor)}
    return best


def headline(best: dict[str, dict]) -> dict[str, float]:
    """Each of our methods at its best against the peer at its best: seconds per labelled pair, ours over theirs."""
    if PEER not in best:
        return {}
    return {f"{method}_to_{PEER}": best[method]["s_per_pair"] / best[PEER]["s_per_pair"] for method in OURS if method in best}


def check_settings(results: dict[str, dict[str, dict]]) -> None:
    """Refuses a comparison whose methods did not run with the same settings (SHARED_SETTINGS across
    every run, DTYPE_SETTINGS within each dtype)."""
    runs = {(dtype, name): r["settings"] for dtype, by_config in results.items() for name, r in by_config.items() if "settings" in r}
    groups = [(SHARED_SETTINGS, list(runs))]
    groups += [(DTYPE_SETTINGS, [run for run in runs if run[0] == dtype]) for dtype in results]
    for keys, members in groups:
        for key in keys:
            values = {f"{name} ({dtype})": runs[(dtype, name)][key] for dtype, name in members}
            if len({json.dumps(v) for v in values.values()}) > 1:
                raise RuntimeError(f"the methods ran with different {key}: {values}; the comparison would not be fair")


def settings_table(results: dict[str, dict[str, dict]]) -> str:
    runs = {f"{name} ({dtype})": r["settings"] for dtype, by_config in results.items() for name, r in by_config.items() if "settings" in r}
    keys = [*SHARED_SETTINGS, *DTYPE_SETTINGS, "trajectories_per_step"]

    def cell(settings: dict, key: str) -> str:
        value = settings.get(key, "–")
        if isinstance(value, list):  # peft's expanded target modules: how many, and of which kinds
            return f"{len(value)}: " + " ".join(sorted({name.rsplit('.', 1)[-1] for name in value}))
        return str(value)

    lines = ["| setting | " + " | ".join(runs) + " |", "|---|" + "---|" * len(runs)]
    lines += [f"| {key} | " + " | ".join(cell(settings, key) for settings in runs.values()) + " |" for key in keys]
    return "\n".join(lines)


def table(rows: dict[str, dict]) -> str:
    def cell(row: dict, key: str, fmt: str) -> str:
        return format(row[key], fmt) if key in row else "–"

    gpu = any("peak_gpu_mb" in row for row in rows.values())
    lines = ["| configuration | s / labelled pair | generated tokens / pair | generated tokens / s | × floor | peak RSS (MB) | × base inference RSS |"
             + (" peak GPU memory (MB) |" if gpu else ""),
             "|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if gpu else "")]
    for name, row in rows.items():
        lines.append(f"| {name} | {cell(row, 's_per_pair', '.2f')} | {cell(row, 'tokens_per_pair', '.1f')} | {row['tokens_per_s']:.1f} "
                     f"| {cell(row, 'to_floor', '.2f')} | {row['peak_rss_mb']:.0f} | {row['rss_to_base']:.2f} |"
                     + (f" {cell(row, 'peak_gpu_mb', '.0f')} |" if gpu else ""))
    return "\n".join(lines)


def best_table(summaries: dict[str, dict[str, dict]], best: dict[str, dict]) -> str:
    dtypes = list(summaries)
    peer = best.get(PEER)
    lines = ["| method | " + " | ".join(f"s / pair, {d}" for d in dtypes) + " | best | × TRL at its best | × fastest floor |",
             "|---|" + "---:|" * len(dtypes) + "---|---:|---:|"]
    for method, b in best.items():
        cells = [format(summaries[d][method]["s_per_pair"], ".2f") if method in summaries[d] else "–" for d in dtypes]
        ratio = format(b["s_per_pair"] / peer["s_per_pair"], ".2f") if peer else "–"
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {b['dtype']} | {ratio} | {b['to_fastest_floor']:.2f} |")
    return "\n".join(lines)


def phase_table(phases: dict[str, dict[str, float]]) -> str:
    lines = ["| phase | " + " | ".join(phases) + " |", "|---|" + "---:|" * len(phases)]
    for phase in BILEVEL_PHASES:
        lines.append(f"| {phase} | " + " | ".join(f"{p[phase]:.2f}" for p in phases.values()) + " |")
    lines.append("| total of phases | " + " | ".join(f"{sum(p.values()):.2f}" for p in phases.values()) + " |")
    return "\n".join(lines)


def machine(threads: int | None, device: torch.device) -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": threads or torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu_native_bf16": native_bf16(torch.device("cpu")),
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "load_average": os.getloadavg(),
    }


def markdown(report: dict) -> str:
    """The report as the tables a reader looks at, in the order they answer: the headline, then why."""
    tables = report["tables"]
    parts = [f"settings: {report['settings']}"]
    if report["best"]:  # any method measured besides the floors
        parts += ["each method at its best dtype:", tables["best"]]
        parts += [f"{name}: {ratio:.3f}" for name, ratio in report["headline"].items()]
        parts += ["what each method ran with (read from the objects that ran):", tables["settings"]]
    for dtype in report["settings"]["dtypes"]:
        parts += [f"{dtype}:", tables[dtype]]
    if tables["phases"]:
        parts += ["phases of one outer iteration (s):", tables["phases"]]
    return "\n\n".join(parts) + "\n"


def run_benchmark(recipe_path: Path, overrides: list[str], out: Path, repeats: int = 2, warmup: int = 0,
                  log: Callable[[str], None] = print, threads: int | None = None, configs: tuple[str, ...] = CONFIGS,
                  dtypes: tuple[str, ...] = tuple(DTYPES), runner: Runner = run_worker) -> dict:
    """The floors, then each of `configs` in turn, in each of `dtypes`, each by `runner` (its own process,
    with `threads` torch threads, default torch's own); writes `out` (bench.json) and the same tables as
    markdown next to it (bench.md), and returns the report."""
    recipe = load_recipe(recipe_path, overrides)  # a bad recipe or override fails here, before any worker starts
    for dtype in dtypes:
        load_recipe(recipe_path, [*overrides, *dtype_overrides(dtype)])
    device = resolve_device(recipe.train.device)
    resolve(recipe.model.name)  # a GGUF model is converted now: converting in a worker would count in its peak memory
    started = os.getloadavg()
    results: dict[str, dict[str, dict]] = {}
    for dtype in dtypes:
        results[dtype] = {}
        for config in ("floors", *configs):
            log(f"measuring {config} in {dtype} ...")
            results[dtype].update(runner(config, recipe_path, [*overrides, *dtype_overrides(dtype)], repeats, warmup, threads))
    check_settings(results)
    summaries = {dtype: summarise(by_config) for dtype, by_config in results.items()}
    best = best_of(results)
    phases = {f"{k} ({dtype})": results[dtype][k]["phases"] for dtype in dtypes for k in OURS if k in results[dtype]}
    report = {
        "recipe": str(recipe_path),
        "overrides": overrides,
        "settings": {"model": recipe.model.name, "dtypes": list(dtypes), "max_new_tokens": recipe.rollout.max_new_tokens,
                     "pairs_per_step": recipe.bilevel.pairs_per_step, "inner_steps": recipe.bilevel.inner_steps,
                     "trajectories_per_step": recipe.bilevel.trajectories_per_step,
                     "pairs_per_outer_step": recipe.bilevel.pairs_per_outer_step, "lora_r": recipe.adapters.r},
        "machine": {**machine(threads, device), "load_average_at_start": started},
        "results": results,
        "summary": summaries,
        "best": best,
        "headline": headline(best),
        "tables": {"best": best_table(summaries, best), "settings": settings_table(results),
                   **{dtype: table(rows) for dtype, rows in summaries.items()}, "phases": phase_table(phases) if phases else ""},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1), encoding="utf-8")
    out.with_suffix(".md").write_text(markdown(report), encoding="utf-8")
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
    parser.add_argument("--only", nargs="+", choices=WORKERS, default=list(CONFIGS),
                        help="the methods to measure besides the floors (default all; `floors`: the floors alone)")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES),
                        help="the dtype paths to measure every method in (default both; each method is compared at its best)")
    parser.add_argument("--worker", choices=WORKERS, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    quiet_libraries()
    recipe = args.recipe or (QUICK_RECIPE if args.quick else DEFAULT_RECIPE)
    try:
        if args.worker:
            result = worker(args.worker, recipe, args.overrides, args.repeats, args.warmup, args.threads)
            args.result.write_text(json.dumps(result), encoding="utf-8")
            return
        report = run_benchmark(recipe, [*SETTINGS, *args.overrides], args.out, args.repeats, args.warmup, threads=args.threads,
                               configs=tuple(c for c in CONFIGS if c in args.only), dtypes=tuple(args.dtypes))
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    print(f"\n{markdown(report)}\nwrote {args.out} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
