"""Two processes equal one: a run split over processes is the run of one process with the same global batch.

The end-to-end test launches the tiny recipe with `accelerate launch` (two CPU processes over
gloo) and with one plain process, and compares everything a user reads. The pieces under it
are checked on their own: a shard of a sampled batch, and the collectives, the critics and
the leave-one-out baseline in a two-process gloo group spawned by the test; and that every
tensor of a run is made on the run's device.

Tolerances: the two runs differ only in how float32 sums are split (per-shard estimates
averaged instead of one sum over the batch), about 1e-7 relative per operation; a few Adam
steps amplify that, so metrics are compared to 1e-3 relative (1e-5 absolute) and adapter
weights tensor by tensor, to 1e-3 relative. Everything discrete (sampled tokens, oracle labels, replay
indices) must be equal exactly, and so must the preference log.
"""

import json
import math
import os
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.overrides import TorchFunctionMode
from safetensors.torch import load_file

from rlhf_bilevel import estimators as est
from rlhf_bilevel.collectives import World
from rlhf_bilevel.config import ConfigError
from rlhf_bilevel.critic import CriticConfig, MCCritic, QHead, TDCritic
from rlhf_bilevel.distributed import ProcessGroup, resolve_device
from rlhf_bilevel.types import ADAPTERS, Rollout

# the model and recipe modules (transformers, peft) are imported inside the tests that use them:
# the processes spawned by the last test import this module, and need none of them

ROOT = Path(__file__).parents[1]
TINY = ROOT / "recipes" / "tiny-debug.yaml"
SETTINGS = ["bilevel.outer_steps=2", "train.save_every=2", "train.tensorboard=false"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(out: Path, processes: int) -> subprocess.Popen:
    args = ["train", "--recipe", str(TINY), "--output-dir", str(out)]
    for setting in SETTINGS:
        args += ["--set", setting]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if processes == 1:
        command = [sys.executable, "-m", "rlhf_bilevel_cli.app", *args]
    else:
        # `--cpu --num_processes 2` starts ONE process in accelerate 1.15; this starts two on the CPU
        env["ACCELERATE_USE_CPU"] = "true"
        command = [
            sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
            "-m", "rlhf_bilevel_cli.app", *args,
        ]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=out.parent)


def records(run_dir: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (run_dir / name).read_text().splitlines()]


def test_two_processes_equal_one_process_with_the_same_global_batch(tmp_path):
    """The tiny recipe under `accelerate launch` with 2 processes logs the same metrics, labels the same
    pairs once each, and ends with the same adapters as one process; only the main process writes."""
    runs = {n: tmp_path / f"world-{n}" for n in (1, 2)}
    started = {n: launch(out, n) for n, out in runs.items()}  # side by side: the machine has two cores
    results = {n: process.communicate(timeout=300) for n, process in started.items()}
    for n, (stdout, stderr) in results.items():
        assert started[n].returncode == 0, stderr[-3000:]
        assert stdout.count("gold score on held-out prompts") == 1, stdout  # one summary, from the main process
    one, two = runs[1], runs[2]
    run = json.loads((two / "run.json").read_text())
    assert run["world_size"] == 2 and run["per_process"] == {"trajectories_per_step": 2, "pairs_per_step": 2, "eval_pairs": 2}
    assert json.loads((one / "run.json").read_text())["world_size"] == 1

    metrics_one, metrics_two = records(one, "metrics.jsonl"), records(two, "metrics.jsonl")
    assert [(r["phase"], r["step"]) for r in metrics_two] == [(r["phase"], r["step"]) for r in metrics_one]
    outer = [r for r in metrics_two if r["phase"] == "outer" and r["step"] > 0]
    assert outer and all(r["dist/world_size"] == 2 for r in outer)
    for a, b in zip(metrics_one, metrics_two):
        assert a.keys() == b.keys()
        for key, value in a.items():
            if key.startswith("time/") or key == "dist/world_size" or not isinstance(value, float):
                continue
            assert math.isclose(value, b[key], rel_tol=1e-3, abs_tol=1e-5), (a["phase"], a["step"], key, value, b[key])
    # the global counters: every pair once, every token once
    assert records(two, "preferences.jsonl") == records(one, "preferences.jsonl")
    summary_one, summary_two = (json.loads((run / "summary.json").read_text()) for run in (one, two))
    for key in ("oracle_pairs", "tokens_generated", "gold_reference", "gold_final", "agreement", "examples"):
        assert summary_two[key] == summary_one[key], key

    final = "checkpoint-000002"
    for adapter in ADAPTERS:
        weights_one = load_file(one / final / "adapters" / adapter / "adapter_model.safetensors")
        weights_two = load_file(two / final / "adapters" / adapter / "adapter_model.safetensors")
        assert weights_one.keys() == weights_two.keys()
        moved = max(w.abs().max().item() for k, w in weights_one.items() if "lora_B" in k)
        assert moved > 1e-2, "training left the adapter where it started: nothing was compared"
        for key, w in weights_one.items():
            # float rounding, through Adam: where a gradient is near zero (lora_A while lora_B ≈ 0) Adam's g/√v
            # turns rounding into steps, so single elements differ up to ~2e-4; tensor by tensor the relative
            # difference stays below 2e-4 (measured), while a batch summed or sharded wrongly moves it by ≥ 1e-2
            gap = (weights_two[key] - w).norm() / w.norm()
            assert gap < 1e-3, (adapter, key, gap.item())


# -- a shard of a sampled batch ----------------------------------------------------------------------
PROMPTS = ["the dog is", "a good day for a walk in the park", "tell me", "my neighbour said the weather was"]


def test_a_shard_samples_exactly_its_rows_of_the_whole_batch():
    """Rows sampled as two shards (each padded as the whole batch is, each with its own random numbers)
    equal the rows of the whole batch: tokens exactly, log-probabilities to float error."""
    from rlhf_bilevel.lm.model import AdapterConfig, ModelConfig, load_base, with_adapters
    from rlhf_bilevel.lm.policy import LMPolicy, RolloutConfig

    model, tokenizer = load_base(ModelConfig(name="tiny"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        peft_model = with_adapters(model, AdapterConfig(r=4, alpha=8))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:  # away from π_ref, so that the adapter takes part in the sampling
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
    policy = LMPolicy(peft_model, tokenizer, RolloutConfig(max_new_tokens=6), chat_template=False)
    prompts = PROMPTS * 2
    whole_generator = torch.Generator().manual_seed(3)
    whole = policy.sample(prompts, whole_generator)
    for rows in (slice(0, 4), slice(4, 8), slice(2, 3)):
        generator = torch.Generator().manual_seed(3)
        shard = policy.sample(prompts, generator, rows=rows)
        assert torch.equal(generator.get_state(), whole_generator.get_state())  # the generators stay in step
        assert torch.equal(shard.tokens, whole.tokens[rows]) and shard.responses == whole.responses[rows]
        assert shard.prompts == prompts[rows] and torch.equal(shard.mask, whole.mask[rows])
        torch.testing.assert_close(shard.logp, whole.logp[rows], atol=1e-5, rtol=0)
        torch.testing.assert_close(shard.context.features, whole.context.features[rows], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(shard.weight, torch.full((len(shard),), 1 / len(shard)))
    assert len({tuple(t) for t in whole.tokens.tolist()}) > 4, "the rows should differ"


def test_the_device_is_the_process_gpu_only_where_there_is_one_and_the_launcher_allows(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    assert resolve_device("auto") == torch.device("cuda", 3)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cuda") == torch.device("cuda", 3)
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("ACCELERATE_USE_CPU")
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ConfigError, match="train.device: cuda, but torch sees no CUDA device"):
        resolve_device("cuda")


FACTORIES = {torch.zeros, torch.ones, torch.full, torch.empty, torch.tensor, torch.as_tensor, torch.arange,
             torch.rand, torch.randn, torch.randint, torch.randperm, torch.eye, torch.linspace}


class UnplacedOnMeta(TorchFunctionMode):
    """Puts every tensor that rlhf_bilevel's own code makes without naming a device (or a generator,
    whose device it takes) on the meta device, where any operation that meets a tensor of the
    model's device fails. This CPU has no second device, so a tensor left on the default device
    would otherwise pass unseen, and fail on the first GPU it meets."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES and kwargs.get("device") is None and "generator" not in kwargs and made_by_library():
            kwargs = {**kwargs, "device": "meta"}
        return func(*args, **kwargs)


def made_by_library() -> bool:
    """Whether the factory was called by rlhf_bilevel itself (modules it builds make their
    parameters on the CPU, and are moved whole)."""
    return sys._getframe(2).f_globals.get("__name__", "").startswith("rlhf_bilevel")


def test_the_check_of_placement_fails_a_library_tensor_made_without_a_device():
    probe = {"__name__": "rlhf_bilevel.probe", "torch": torch}
    exec("def unplaced(like):\n    return like * torch.arange(3)\n"
         "def placed(like):\n    return like * torch.arange(3, device=like.device)\n", probe)
    like = torch.ones(3)
    with UnplacedOnMeta():
        assert torch.arange(3).device.type == "cpu"  # made by the test, not by the library
        assert probe["placed"](like).device.type == "cpu"
        with pytest.raises(RuntimeError, match="meta"):
            probe["unplaced"](like)


@pytest.mark.parametrize("extra", [["bilevel.critic.kind=td", "reward.lora=true"], ["bilevel.critic.kind=mc", "bilevel.micro_batch=2"]])
def test_every_tensor_of_a_run_is_made_on_the_device_of_the_run(tmp_path, extra):
    from rlhf_bilevel.commands.eval import EvalConfig, eval_run
    from rlhf_bilevel.commands.train import resume, train
    from rlhf_bilevel.recipe import load_recipe

    recipe = load_recipe(TINY, [*SETTINGS, "bilevel.outer_steps=1", "train.save_every=1", *extra])
    with UnplacedOnMeta():
        train(recipe, tmp_path, TINY.parent)
        resume(tmp_path, ["bilevel.outer_steps=2"])
        report = eval_run(tmp_path, EvalConfig(prompts=2, resamples=10))
    assert json.loads((tmp_path / "summary.json").read_text())["outer_steps"] == 2
    assert 0 <= report["win_rate"].mean <= 1


def test_the_trainer_loads_the_base_and_moves_every_head_to_the_device_of_its_world(monkeypatch, tmp_path):
    """The meta device stands for a GPU: a head built on the CPU and not moved would stay there. (The
    base itself stays on the CPU here: peft cannot put LoRA weights on meta; where it is loaded is what
    is checked.)"""
    import rlhf_bilevel.commands.train as train
    from rlhf_bilevel.recipe import load_recipe

    loaded, load = [], train.load_base
    monkeypatch.setattr(train, "load_base", lambda cfg, device: loaded.append(device) or load(cfg))
    trainer = train.build(load_recipe(TINY, ["bilevel.critic.kind=td"]), tmp_path, TINY.parent, World("meta"))
    assert loaded == [torch.device("meta")]
    critics = list(trainer.bilevel.critics.values())
    assert len(critics) == 2
    for module in (trainer.reward, *(critic.q for critic in critics)):
        placed = {name: p.device.type for name, p in module.named_parameters()}
        assert placed and set(placed.values()) == {"meta"}, placed
    assert {p.device.type for critic in critics for p in critic.centre} == {"meta"}  # the projection's centre


def test_batches_that_do_not_split_evenly_are_refused_naming_the_field():
    from rlhf_bilevel.commands.train import check_shards
    from rlhf_bilevel.recipe import load_recipe

    recipe = load_recipe(TINY)
    check_shards(recipe, ProcessGroup(0, 2))
    with pytest.raises(ConfigError, match=r"^bilevel\.trajectories_per_step: 4 does not split evenly over 3 processes"):
        check_shards(recipe, ProcessGroup(0, 3))
    with pytest.raises(ConfigError, match=r"^bilevel\.critic\.batch_size: 9 "):
        check_shards(load_recipe(TINY, ["bilevel.critic.batch_size=9"]), ProcessGroup(0, 2))
    grouped = load_recipe(TINY, ["bilevel.critic.kind=rloo", "bilevel.responses_per_prompt=4"])
    check_shards(grouped, ProcessGroup(0, 1))
    with pytest.raises(ConfigError, match=r"^bilevel\.trajectories_per_step: 4 over 2 processes splits a prompt's 4 responses; use a multiple of 8$"):
        check_shards(grouped, ProcessGroup(0, 2))


# -- the collectives and the critics in a two-process gloo group -----------------------------------------
def random_rollout(n: int, horizon: int, dim: int, seed: int) -> Rollout:
    """Trajectories with EOS at random steps, and random state features for a critic to read."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, horizon + 1, (n,), generator=generator)
    mask = (torch.arange(horizon) < lengths[:, None]).float()
    tokens = torch.randint(8, (n, horizon), generator=generator)
    features = torch.randn(n, horizon + 1, dim, generator=generator)
    zeros = torch.zeros(n, horizon)
    return Rollout([None] * n, [None] * n, tokens, mask, zeros, zeros, torch.full((n,), 1 / n), features)


def rows_of(rollout: Rollout, rows: slice) -> Rollout:
    n = len(rollout.tokens[rows])
    return replace(
        rollout, prompts=rollout.prompts[rows], responses=rollout.responses[rows], tokens=rollout.tokens[rows],
        mask=rollout.mask[rows], logp=rollout.logp[rows], ref_logp=rollout.ref_logp[rows],
        weight=torch.full((n,), 1 / n), context=rollout.context[rows],
    )


def td_critic(world: World) -> TDCritic:
    head = QHead(4, 8, 6, torch.Generator().manual_seed(0))
    cfg = CriticConfig(hidden=6, blocks=2, target_every=5, batch_size=8, radius=1.0)
    return TDCritic(lambda rollout: rollout.context, head, 0.9, cfg, torch.Generator().manual_seed(2), world)


def two_process_checks(rank: int, store: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    world, alone = ProcessGroup(rank, 2), World()
    try:
        # the collectives: rank order, ragged concatenation, the main process's value
        assert world.gather(f"r{rank}") == ["r0", "r1"]
        assert world.broadcast(rank + 5) == 5
        assert world.cat(torch.full((rank + 1, 2), float(rank))).tolist() == [[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]
        (mean,) = world.mean([torch.tensor([1.0, 2.0]) * (rank + 1)])
        assert mean.tolist() == [1.5, 3.0]
        assert world.mean_metrics({"a": float(rank), "b": 4.0}) == {"a": 0.5, "b": 4.0}
        assert world.shard(6) == slice(3 * rank, 3 * rank + 3)

        whole = random_rollout(8, 5, 4, seed=1)
        rows = world.shard(len(whole))
        shard = rows_of(whole, rows)
        shaped = torch.randn(8, 5, generator=torch.Generator().manual_seed(7)) * whole.mask
        log_probs = torch.log_softmax(torch.randn(8, 5, 8, generator=torch.Generator().manual_seed(9)), -1)

        # the Monte-Carlo baseline averages the other trajectories of the WHOLE batch
        expected = MCCritic(0.9, alone).advantages(whole, shaped, None)
        torch.testing.assert_close(MCCritic(0.9, world).advantages(shard, shaped[rows], None), expected[rows])

        # the leave-one-out baseline of ∇_λ f, from the whole batch's sum of losses
        losses = torch.rand(8, generator=torch.Generator().manual_seed(8))
        weight = torch.full((4,), 1 / 4)
        (total,) = world.sum([losses[rows].sum()])
        baseline = est.leave_one_out_baseline(losses[rows], weight, total, 8)
        torch.testing.assert_close(baseline, est.leave_one_out_baseline(losses, torch.full((8,), 1 / 8))[rows])

        # TD: the replay holds the whole batch, and the steps follow the whole minibatch's gradient
        split, single = td_critic(world), td_critic(alone)
        for _ in range(2):  # twice: the second fit replays the first batch too
            diagnostics = split.fit(shard, shaped[rows], log_probs[rows])
            single.fit(whole, shaped, log_probs)
        assert diagnostics["critic/replay"] == float(len(single.replay))
        for p, q in zip(split.q.parameters(), single.q.parameters()):
            torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4)
        assert any((p - c).abs().max() > 1e-2 for p, c in zip(single.q.parameters(), single.centre)), "TD did not move"
    finally:
        dist.destroy_process_group()


def test_collectives_critics_and_baseline_over_two_processes_equal_one(tmp_path):
    """In a two-process gloo group: gather/broadcast/cat/mean, the MC critic's and ∇_λ f's leave-one-out
    baselines, and the TD critic fitted on shards equal their one-process values on the whole batch."""
    mp.spawn(two_process_checks, args=(str(tmp_path / "store"),), nprocs=2, join=True)
