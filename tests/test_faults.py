"""Faults: a run SIGKILLed anywhere and resumed ends exactly where an uninterrupted run ends; a corrupt
checkpoint is skipped, and said so; non-finite updates are skipped, and too many in a row stop the run."""

import copy
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from rlhf_bilevel.checkpoint import load_checkpoint
from rlhf_bilevel.commands.train import build, resume, train
from rlhf_bilevel.lm.heads import TokenReward
from rlhf_bilevel.nonfinite import NonFiniteError, tensors_in
from rlhf_bilevel.recipe import load_recipe
from rlhf_bilevel.trainer import Trainer
from rlhf_bilevel.types import LAMBDA
from rlhf_bilevel_cli.app import app

RECIPES = Path(__file__).parents[1] / "recipes"
TINY = RECIPES / "tiny-debug.yaml"
SETTINGS = ["bilevel.outer_steps=4", "train.save_every=2", "train.keep=null", "train.tensorboard=false"]
RECORDS = 4 * (2 + 1) + 1  # metrics.jsonl of the whole run: K=2 inner and 1 outer record per outer step, and step 0
SEED = 20240611
# one thread, no hub: the killed, resumed and uninterrupted runs must compute bit for bit alike
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
SLOW_SAVE = """
import os, time
import rlhf_bilevel.checkpoint as checkpoint
write_manifest = checkpoint.write_manifest
def hung_at_step_4(folder, step):
    if step == 4:  # the state and the adapters are on disk, the manifest is not: the middle of a save
        open(os.environ["SAVING"], "w").close()
        time.sleep(120)
    write_manifest(folder, step)
checkpoint.write_manifest = hung_at_step_4
from rlhf_bilevel_cli.app import main
main()
"""


def command(*args: str, hook: str | None = None) -> list[str]:
    """`rlhf-bilevel ARGS` in a fresh interpreter; with `hook`, that code runs the command instead."""
    return [sys.executable, *(["-c", hook] if hook else ["-m", "rlhf_bilevel_cli.app"]), *args]


def start(args: list[str], **env: str) -> subprocess.Popen:
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**ENV, **env})


def finish(process: subprocess.Popen) -> str:
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    return stderr


def fresh_run(run_dir: Path) -> list[str]:
    return command("train", "--recipe", str(TINY), "--output-dir", str(run_dir), *[a for s in SETTINGS for a in ("--set", s)])


def lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def kill_when(process: subprocess.Popen, ready, jitter: float) -> None:
    """SIGKILL once `ready()` holds, `jitter` seconds later; the run must not have ended by itself."""
    deadline = time.monotonic() + 300
    while not ready():
        assert process.poll() is None, f"the run ended before the kill point: {process.communicate()[1]}"
        assert time.monotonic() < deadline, "the kill point never came"
        time.sleep(0.002)
    time.sleep(jitter)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def comparable(run_dir: Path) -> dict:
    """What two runs of one seed must share: every metric but wall-clock times, every labelled pair, the summary."""
    metrics = [{k: v for k, v in r.items() if not k.startswith("time/")} for r in records(run_dir / "metrics.jsonl")]
    summary = json.loads((run_dir / "summary.json").read_text())
    summary.pop("seconds")
    return {"metrics": metrics, "preferences": records(run_dir / "preferences.jsonl"), "summary": summary}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, one_thread):
    run_dir = tmp_path_factory.mktemp("reference")
    train(load_recipe(TINY, SETTINGS), run_dir, RECIPES)
    return run_dir


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """Runs of the `rlhf-bilevel` command SIGKILLed at points drawn from a fixed seed, then resumed by it.

    The two run side by side, and their resumes too: each is mostly interpreter start-up.
    """
    root = tmp_path_factory.mktemp("killed")
    rng = random.Random(SEED)
    # anywhere in the run: a number of metric records (each flushed as its step ends), then a random delay
    at, jitter = rng.randint(1, RECORDS - 1), rng.uniform(0, 0.05)
    anywhere = root / f"after-{at}-records"
    saving = root / "saving"
    during_save = root / "during-checkpoint-write"
    runs = {
        anywhere: (start(fresh_run(anywhere)), lambda: lines(anywhere / "metrics.jsonl") >= at, jitter),
        during_save: (start(command(*fresh_run(during_save)[3:], hook=SLOW_SAVE), SAVING=str(saving)), saving.exists, rng.uniform(0, 0.05)),
    }
    for process, ready, delay in runs.values():
        kill_when(process, ready, delay)
    assert (during_save / "checkpoint-000004.tmp").is_dir() and not (during_save / "checkpoint-000004").exists()
    resumed = {run_dir: start(command("train", "--resume", str(run_dir))) for run_dir in runs}
    return {run_dir.name: (run_dir, finish(process)) for run_dir, process in resumed.items()}


def test_killed_runs_resume_to_the_uninterrupted_result(killed, reference):
    expected = comparable(reference)
    assert len(expected["metrics"]) == RECORDS
    for name, (run_dir, _) in killed.items():
        resumed = comparable(run_dir)
        assert resumed["metrics"] == expected["metrics"], name
        # no labelled pair lost or logged twice: the same pairs, in the same order
        assert resumed["preferences"] == expected["preferences"], name
        assert resumed["summary"] == expected["summary"], name
        assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == ["checkpoint-000002", "checkpoint-000004"], name


def test_resume_says_where_it_starts(killed):
    _, stderr = killed["during-checkpoint-write"]
    assert "from checkpoint-000002 (outer step 2 of 4)" in stderr and "Traceback" not in stderr


def corrupt(checkpoint: Path) -> None:
    blob = bytearray((checkpoint / "state.safetensors").read_bytes())
    blob[-3] ^= 0xFF  # a byte of tensor data: only the manifest's sha256 can tell
    (checkpoint / "state.safetensors").write_bytes(bytes(blob))


@pytest.mark.parametrize("corrupted, starts", [
    (["checkpoint-000004"], "resuming {run} from checkpoint-000002 (outer step 2 of 4)"),
    (["checkpoint-000004", "checkpoint-000002"], "{run} has no checkpoint to resume from: starting the run over"),
])
def test_resume_falls_back_past_corrupt_checkpoints_and_says_so(tmp_path, reference, one_thread, corrupted, starts):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    for name in corrupted:
        corrupt(run_dir / name)
    (run_dir / "summary.json").unlink()
    said = []
    resume(run_dir, log=said.append)
    assert said == [*(f"warning: skipping a checkpoint that does not verify: {run_dir / name / 'state.safetensors'}: "
                      "sha256 differs from the manifest (the file is corrupt)" for name in corrupted),
                    starts.format(run=run_dir)]
    assert comparable(run_dir) == comparable(reference)


# -- non-finite updates ------------------------------------------------------------------------------


def tiny_recipe(*overrides):
    return load_recipe(TINY, ["bilevel.outer_steps=4", "train.save_every=2", "train.tensorboard=false", *overrides])


def poison_rewards(monkeypatch, when) -> None:
    """r_φ is NaN on every call for which `when(call number)` holds: what a diverging head produces
    (`token_rewards` is the members' mean, so both go through `member_rewards`)."""
    member_rewards = TokenReward.member_rewards
    calls = [0]

    def poisoned(self, rollout):
        calls[0] += 1
        rewards = member_rewards(self, rollout)
        return rewards * math.nan if when(calls[0]) else rewards

    monkeypatch.setattr(TokenReward, "member_rewards", poisoned)


def test_a_nan_reward_is_skipped_and_the_run_goes_on(tmp_path, monkeypatch):
    poison_rewards(monkeypatch, lambda call: call in (13, 14, 15))  # the first fit of φ: its f̂ is NaN
    summary = train(tiny_recipe(), tmp_path, RECIPES)
    assert summary.outer_steps == 4
    metrics = records(tmp_path / "metrics.jsonl")
    skipped = metrics[-1]["faults/nonfinite_steps"]
    assert skipped >= 1
    # a skipped update is logged as such: its step norm is null (NaN) and the counter moves at that step
    counts = [r["faults/nonfinite_steps"] for r in metrics if "faults/nonfinite_steps" in r]
    assert counts == sorted(counts) and counts[0] == 0
    assert any(None in (r.get("lower/d_prime_norm", 0), r.get("upper/d_norm", 0)) for r in metrics)
    state = load_checkpoint(tmp_path / "checkpoint-000004")
    assert all(torch.isfinite(t).all() for t in tensors_in(state))
    assert state["bilevel"]["nonfinite_steps"] == skipped


def test_non_finite_steps_in_a_row_stop_the_run_naming_the_last_good_checkpoint(tmp_path, monkeypatch):
    saved = []
    save = Trainer.save
    monkeypatch.setattr(Trainer, "save", lambda self: saved.append(save(self)) or saved[-1])
    poison_rewards(monkeypatch, lambda call: bool(saved))  # from the first checkpoint on, every reward is NaN
    out = tmp_path / "run"
    args = ["train", "--recipe", str(TINY), "--output-dir", str(out)]
    for setting in ["bilevel.outer_steps=4", "train.save_every=2", "train.tensorboard=false", "train.max_bad_steps=3"]:
        args += ["--set", setting]
    result = CliRunner().invoke(app, args)
    assert isinstance(result.exception, SystemExit) and result.exit_code == 2, result.exception
    (error,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert "train.max_bad_steps=3" in error and "were skipped" in error
    assert f"the newest good checkpoint is {out / 'checkpoint-000002'}" in error and f"--resume {out}" in error
    # nothing already collected is lost: every pair the oracle labelled is on disk, and the steps logged
    metrics = records(out / "metrics.jsonl")
    labelled = max(r.get("oracle/pairs", 0) for r in metrics)
    assert labelled > 0 and len(records(out / "preferences.jsonl")) >= labelled
    assert metrics[-1]["faults/nonfinite_steps"] >= 1


def test_a_critic_fit_that_goes_non_finite_is_undone(tmp_path):
    trainer = build(tiny_recipe(), tmp_path, RECIPES)
    bilevel = trainer.bilevel
    rollout = bilevel.source.rollouts(LAMBDA, 4)
    critic = bilevel.critics[LAMBDA]
    before = copy.deepcopy(critic.state_dict())
    log_probs = torch.log_softmax(torch.zeros(4, rollout.horizon, trainer.policy.vocab_size), -1)
    bilevel.ascent.fit_critic(LAMBDA, rollout, torch.full((4, rollout.horizon), math.nan), log_probs)
    after = critic.state_dict()
    assert all(torch.equal(a, b) for a, b in zip(tensors_in(before), tensors_in(after), strict=True))
    assert bilevel.guard.bad_in_a_row == {"critic/lambda": 1} and bilevel.guard.nonfinite_steps == 1
    bilevel.ascent.fit_critic(LAMBDA, rollout, torch.zeros(4, rollout.horizon), log_probs)
    assert bilevel.guard.bad_in_a_row == {"critic/lambda": 0} and bilevel.guard.nonfinite_steps == 1
    assert not all(torch.equal(a, b) for a, b in zip(tensors_in(before), tensors_in(critic.state_dict())))


def test_the_stop_is_raised_by_the_algorithm_after_max_bad_steps(tmp_path):
    trainer = build(tiny_recipe("train.max_bad_steps=2"), tmp_path, RECIPES)
    bilevel = trainer.bilevel
    nan_direction = [torch.full_like(p, math.nan) for p in bilevel.reward_fit.reward_step.params]
    phi = [p.detach().clone() for p in bilevel.reward_fit.reward_step.params]
    assert math.isnan(bilevel.guard.step("phi", bilevel.reward_fit.reward_step, nan_direction))
    assert all(torch.equal(p, q) for p, q in zip(phi, bilevel.reward_fit.reward_step.params))
    with pytest.raises(NonFiniteError, match="the last 2 updates of φ were skipped, its gradient was not finite"):
        bilevel.guard.step("phi", bilevel.reward_fit.reward_step, nan_direction)


def test_a_stop_before_the_first_checkpoint_says_there_is_none(tmp_path, monkeypatch):
    poison_rewards(monkeypatch, lambda call: True)
    with pytest.raises(NonFiniteError, match="no checkpoint was saved yet"):
        train(tiny_recipe("train.max_bad_steps=1"), tmp_path, RECIPES)
