"""What a run reports as it goes: `metrics.jsonl`, TensorBoard scalars and its progress (a bar, or lines in a log file).

`metrics.jsonl` is the record a user (or a plot script) reads: one JSON object per call to
`Tracker.log`, written and flushed at once so that a killed run keeps every step it
finished. TensorBoard is a view of the same numbers.

One x-axis for every phase: `step` is a single global counter (the train command passes
the outer iteration t), so a TensorBoard chart of `upper/loss` and one of `lower/J` line up
step for step. Tags are the metric names as given, without a phase prefix: names are
already namespaced (`upper/`, `lower/`, `eval/`, `oracle/`), so phases do not collide, and
the phase is kept in `metrics.jsonl` for filtering.
"""

from __future__ import annotations

import json
import math
import os
import sys
from datetime import timedelta
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import TextIO

from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

SHOWN = {
    "upper/loss": ("loss", ".4g"),
    "lower/J": ("J", ".4g"),
    "lower/kl": ("kl", ".3g"),
    "gold/score": ("gold", ".4g"),
    "oracle/pairs": ("pairs", ".0f"),
}
"""The metrics the progress bar shows, as (short name, format): enough to see a run is healthy."""


class Tracker:
    """Writes metrics to `run_dir`; with `enabled=False` (a non-main process) it writes nothing at all."""

    def __init__(self, run_dir: Path, enabled: bool = True, tensorboard: bool = True):
        self.run_dir = run_dir
        self.enabled = enabled
        self.tensorboard = tensorboard
        self.path = run_dir / "metrics.jsonl"
        self.writer: SummaryWriter | None = None
        self.bar: tqdm | None = None
        self.lines = False
        if enabled:
            run_dir.mkdir(parents=True, exist_ok=True)

    def log(self, metrics: Mapping[str, float], step: int, phase: str) -> None:
        """Appends `{"phase", "step", **metrics}` to metrics.jsonl; NaN and ±inf become null."""
        if not self.enabled:
            return
        if reserved := {"phase", "step"} & metrics.keys():
            raise ValueError(f"metric names {sorted(reserved)} are reserved for the record itself")
        values = {name: float(value) for name, value in metrics.items()}
        record = {"phase": phase, "step": step, **{k: v if math.isfinite(v) else None for k, v in values.items()}}
        with self.path.open("a", encoding="utf-8") as file:
            file.write(json.dumps(record, allow_nan=False) + "\n")
        if self.tensorboard:
            writer = self.writer or self.open_writer(purge_step=None)
            for name, value in values.items():
                writer.add_scalar(name, value, global_step=step)

    def truncate_after(self, step: int) -> None:
        """On resume from the checkpoint of `step`: forgets every record of a later step.

        The killed run may have logged steps past its last checkpoint; the resumed run logs
        them again, so they are dropped here (metrics.jsonl rewritten atomically) and
        hidden from TensorBoard by a purge marker, leaving exactly one record per step.
        """
        if not self.enabled:
            return
        if self.path.exists():
            lines = self.path.read_text(encoding="utf-8").splitlines(keepends=True)
            # a line without its newline was cut by the kill: it was never a complete record
            kept = [line for line in lines if line.endswith("\n") and json.loads(line)["step"] <= step]
            rewritten = self.path.with_name(self.path.name + ".tmp")
            rewritten.write_text("".join(kept), encoding="utf-8")
            os.replace(rewritten, self.path)
        if self.tensorboard:
            if self.writer is not None:
                self.writer.close()
            self.open_writer(purge_step=step + 1)

    def open_writer(self, purge_step: int | None) -> SummaryWriter:
        """Opened on first use, so that a disabled tracker or one without scalars leaves no event file."""
        self.writer = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"), purge_step=purge_step)
        return self.writer

    def progress(self, total: int, initial: int = 0, stream: TextIO | None = None) -> tqdm:
        """A bar over the outer steps on a terminal. Where `stream` (stderr) is not one (a log file
        under nohup, SLURM or a redirect), a bar would print nothing until the end: `show` writes a
        line per step there instead. A non-main process shows neither."""
        self.stream = stream or sys.stderr
        self.lines = self.enabled and not self.stream.isatty()
        self.total = total
        self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=self.stream, disable=not self.enabled or self.lines)
        return self.bar

    def show(self, metrics: Mapping[str, float]) -> None:
        """Puts the key metrics of the last step after the bar, or writes them as a line (needs `progress` first)."""
        if self.bar is None:
            raise RuntimeError("Tracker.show: call progress() first")
        shown = {short: format(float(metrics[name]), spec) for name, (short, spec) in SHOWN.items() if name in metrics}
        self.bar.set_postfix(shown, refresh=False)
        if self.lines:
            print(progress_line(metrics, self.total), file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None) -> None:
        self.close()


def progress_line(metrics: Mapping[str, float], total: int) -> str:
    """One outer step for a log file: `step 2/3, labels 24, gold 0.375, agreement 50%, elapsed 0:00:05, remaining 0:00:03`.

    Gold and agreement appear after the steps that evaluated; the time left assumes the
    remaining steps take as long as the run's steps so far did on average."""
    parts = []
    step = metrics.get("outer_step")
    if step is not None:
        parts.append(f"step {step:.0f}/{total}")
    if "oracle/pairs" in metrics:
        parts.append(f"labels {metrics['oracle/pairs']:.0f}")
    if "gold/score" in metrics:
        parts.append(f"gold {metrics['gold/score']:.4g}")
    if "eval/agreement" in metrics:
        parts.append(f"agreement {metrics['eval/agreement']:.0%}")
    elapsed = metrics.get("time/elapsed_s")
    if elapsed is not None:
        parts.append(f"elapsed {clock(elapsed)}")
        if step:
            parts.append(f"remaining {clock(elapsed / step * (total - step))}")
    return ", ".join(parts)


def clock(seconds: float) -> str:
    """h:mm:ss"""
    return str(timedelta(seconds=round(seconds)))
