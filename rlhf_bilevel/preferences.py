"""Every pair the oracle labelled, kept on disk as it arrives: `preferences.jsonl`.

Oracle labels are the expensive resource of online RLHF (the budget the methods are
compared at), so each batch is fsync'd before the run goes on: a killed run loses
nothing already paid for. A record is TRL's standard preference format with an explicit
prompt (`prompt`, `chosen`, `rejected`: strings, the responses without the prompt), so
the file loads with `datasets.load_dataset("json", ...)` and feeds a DPO or reward
trainer as is; the rest of the record (`first`, `second`, `label`, `prob` and where the
pair came from) keeps what the oracle said, which `chosen`/`rejected` alone cannot.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rlhf_bilevel.checkpoint import CheckpointError
from rlhf_bilevel.types import PreferencePairs

PAIR_FIELDS = frozenset({"prompt", "chosen", "rejected", "first", "second", "label", "prob"})


class PreferenceLog:
    """An append-only JSON-lines file of labelled pairs; with `enabled=False` it writes nothing and stays empty."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path = path
        self.enabled = enabled
        self.count = 0
        if enabled and path.exists():
            self.count = self.drop_partial_line()

    def append(self, records: Sequence[Mapping[str, Any]]) -> None:
        """Writes the records and fsyncs them before returning."""
        if not self.enabled or not records:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as file:
            file.write("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))
            file.flush()
            os.fsync(file.fileno())
        self.count += len(records)

    def __len__(self) -> int:
        return self.count

    def truncate(self, n: int) -> None:
        """Keeps the first `n` records: on resume, the pairs the checkpoint had seen, so none is logged twice."""
        if not self.enabled or n == self.count:
            return
        if n > self.count:
            raise CheckpointError(
                f"{self.path}: holds {self.count} labelled pairs, the checkpoint counted {n}: the file was cut or "
                "replaced since; put the whole file back, or start a new run"
            )
        with self.path.open("rb") as file:
            kept = b"".join(file.readline() for _ in range(n))
        rewritten = self.path.with_name(self.path.name + ".tmp")
        with rewritten.open("wb") as file:
            file.write(kept)
            file.flush()
            os.fsync(file.fileno())
        os.replace(rewritten, self.path)
        self.count = n

    def drop_partial_line(self) -> int:
        """Cuts a last line that a kill left without its newline, and returns the number of whole records.

        That record was never complete on disk, so it was never counted by a checkpoint;
        left in place, the next append would glue onto it and corrupt two records.
        """
        data = self.path.read_bytes()
        whole = data[: data.rfind(b"\n") + 1]
        if len(whole) < len(data):
            with self.path.open("r+b") as file:
                file.truncate(len(whole))
                os.fsync(file.fileno())
        return whole.count(b"\n")


def pair_records(pairs: PreferencePairs, meta: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One record per labelled pair (label 1 = FIRST preferred), with `meta` (policy, outer_step, inner_step) added.

    `chosen` is the first response when label ≥ 0.5, else the second; a soft label of
    exactly 0.5 thus keeps the oracle's order. Prompts and responses are written with
    `str()` when they are not strings already (the exact testbed's int prompts and token
    tuples), so that every record has the same column types and the file stays one dataset.
    """
    if pairs.label is None or pairs.prob is None:
        raise ValueError("pair_records: the pairs have not been labelled by the oracle yet")
    if clash := PAIR_FIELDS & meta.keys():
        raise ValueError(f"pair_records: meta keys {sorted(clash)} would overwrite the pair's own fields")
    rollout = pairs.rollout
    records = []
    for i, j, label, prob in zip(pairs.first.tolist(), pairs.second.tolist(), pairs.label.tolist(), pairs.prob.tolist()):
        first, second = str(rollout.responses[i]), str(rollout.responses[j])
        chosen, rejected = (first, second) if label >= 0.5 else (second, first)
        record = {"prompt": str(rollout.prompts[i]), "chosen": chosen, "rejected": rejected, "first": first, "second": second}
        records.append({**record, "label": float(label), "prob": float(prob), **meta})
    return records
