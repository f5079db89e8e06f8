"""The preference log: records in TRL's explicit-prompt format, durable appends, exact truncation."""

import json

import pytest
import torch
from datasets import Value, load_dataset
from trl.data_utils import is_conversational, maybe_extract_prompt

from rlhf_bilevel.checkpoint import CheckpointError
from rlhf_bilevel.preferences import PreferenceLog, pair_records
from rlhf_bilevel.types import PreferencePairs, Rollout


def labelled_pairs(prompts, responses, first, second, label, prob) -> PreferencePairs:
    n = len(responses)
    rollout = Rollout(
        prompts=prompts,
        responses=responses,
        tokens=torch.zeros(n, 2, dtype=torch.long),
        mask=torch.ones(n, 2),
        logp=torch.zeros(n, 2),
        ref_logp=torch.zeros(n, 2),
        weight=torch.full((n,), 1 / n),
        adapter="lambda_prime",
    )
    return PreferencePairs(
        rollout, torch.tensor(first), torch.tensor(second), torch.ones(len(first)), torch.tensor(prob), torch.tensor(label)
    )


def text_pairs() -> PreferencePairs:
    prompts = ["The movie was", "The movie was", "I think", "I think"]
    responses = [" great.", " awful.", " so.", " not."]
    return labelled_pairs(prompts, responses, first=[0, 2, 1], second=[1, 3, 0], label=[1.0, 0.0, 0.5], prob=[0.9, 0.2, 0.5])


def test_chosen_follows_the_label():
    meta = {"policy": "lambda_prime", "outer_step": 3, "inner_step": 1}
    records = pair_records(text_pairs(), meta)
    assert records[0] == {
        "prompt": "The movie was",
        "chosen": " great.",
        "rejected": " awful.",
        "first": " great.",
        "second": " awful.",
        "label": 1.0,
        "prob": pytest.approx(0.9),
        **meta,
    }
    assert (records[1]["chosen"], records[1]["rejected"]) == (" not.", " so.")  # label 0: the second won
    assert (records[2]["chosen"], records[2]["rejected"]) == (" awful.", " great.")  # a tie keeps the oracle's order


def test_exact_testbed_values_become_strings():
    pairs = labelled_pairs([0, 0], [(1, 2), (3, 0)], first=[0], second=[1], label=[0.0], prob=[0.3])
    (record,) = pair_records(pairs, {})
    assert (record["prompt"], record["chosen"], record["rejected"]) == ("0", "(3, 0)", "(1, 2)")


def test_unlabelled_pairs_and_clashing_meta_fail():
    pairs = text_pairs()
    with pytest.raises(ValueError, match="chosen"):
        pair_records(pairs, {"chosen": "x"})
    pairs.label = None
    with pytest.raises(ValueError, match="labelled"):
        pair_records(pairs, {})


def test_append_len_truncate_and_reopen(tmp_path):
    path = tmp_path / "preferences.jsonl"
    log = PreferenceLog(path)
    assert len(log) == 0
    log.append([{"i": i} for i in range(3)])
    log.append([{"i": 3}, {"i": 4}])
    assert len(log) == 5
    assert len(PreferenceLog(path)) == 5

    log.truncate(3)  # resume: the checkpoint had seen 3 pairs
    log.append([{"i": 30}])
    assert [json.loads(line)["i"] for line in path.read_text().splitlines()] == [0, 1, 2, 30]
    assert len(log) == 4
    with pytest.raises(CheckpointError, match="the checkpoint counted 9"):
        log.truncate(9)


def test_a_line_cut_by_a_kill_is_dropped_on_open(tmp_path):
    path = tmp_path / "preferences.jsonl"
    PreferenceLog(path).append([{"i": 0}, {"i": 1}])
    with path.open("a") as file:
        file.write('{"i": 2, "pro')
    log = PreferenceLog(path)
    assert len(log) == 2
    log.append([{"i": 2}])
    assert [json.loads(line)["i"] for line in path.read_text().splitlines()] == [0, 1, 2]


def test_disabled_log_writes_nothing(tmp_path):
    path = tmp_path / "preferences.jsonl"
    log = PreferenceLog(path, enabled=False)
    log.append(pair_records(text_pairs(), {}))
    log.truncate(0)
    assert len(log) == 0 and not path.exists()


def test_file_loads_as_a_trl_preference_dataset(tmp_path):
    path = tmp_path / "preferences.jsonl"
    log = PreferenceLog(path)
    for outer_step in range(2):
        log.append(pair_records(text_pairs(), {"policy": "lambda_prime", "outer_step": outer_step, "inner_step": 0}))
    dataset = load_dataset("json", data_files=str(path), split="train", cache_dir=str(tmp_path / "cache"))
    assert len(dataset) == 6
    for column in ("prompt", "chosen", "rejected", "first", "second", "policy"):
        assert dataset.features[column] == Value("string")
    assert dataset.features["label"] == Value("float64")
    # TRL's standard (not conversational) preference type with an explicit prompt: kept as it is
    row = dataset[1]
    assert not is_conversational(row)
    assert maybe_extract_prompt(row) is row
    assert (row["prompt"], row["chosen"], row["rejected"]) == ("I think", " not.", " so.")
