"""The tracker: strict JSON lines, TensorBoard scalars, resume without duplicates, silence when disabled."""

import io
import json
import math

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from rlhf_bilevel.tracking import Tracker


def strict_lines(path):
    """Parses like any JSON reader outside Python would: NaN and Infinity are errors."""

    def reject(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    return [json.loads(line, parse_constant=reject) for line in path.read_text().splitlines()]


def scalars(run_dir, tag):
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return [(event.step, event.value) for event in events.Scalars(tag)]


def test_lines_parse_and_non_finite_becomes_null(tmp_path):
    with Tracker(tmp_path) as tracker:
        tracker.log({"upper/loss": 0.5, "lower/J": math.nan, "lower/kl": math.inf}, step=1, phase="outer")
        tracker.log({"eval/win_rate": 0.75}, step=1, phase="eval")
    assert strict_lines(tmp_path / "metrics.jsonl") == [
        {"phase": "outer", "step": 1, "upper/loss": 0.5, "lower/J": None, "lower/kl": None},
        {"phase": "eval", "step": 1, "eval/win_rate": 0.75},
    ]


def test_each_line_is_on_disk_before_close(tmp_path):
    tracker = Tracker(tmp_path, tensorboard=False)
    tracker.log({"upper/loss": 1.0}, step=1, phase="outer")
    assert strict_lines(tmp_path / "metrics.jsonl") == [{"phase": "outer", "step": 1, "upper/loss": 1.0}]
    tracker.close()


def test_tensorboard_scalars_under_the_metric_name(tmp_path):
    with Tracker(tmp_path) as tracker:
        for step in (1, 2):
            tracker.log({"upper/loss": 1.0 / step}, step=step, phase="outer")
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert scalars(tmp_path, "upper/loss") == [(1, 1.0), (2, 0.5)]


def test_resume_keeps_one_record_per_step(tmp_path):
    with Tracker(tmp_path) as killed:
        for step in (1, 2, 3):
            killed.log({"upper/loss": float(step)}, step=step, phase="outer")
        killed.log({"eval/win_rate": 0.5}, step=3, phase="eval")
    with (tmp_path / "metrics.jsonl").open("a") as file:
        file.write('{"phase": "outer", "st')  # the kill landed mid-line

    with Tracker(tmp_path) as resumed:  # from the checkpoint of step 2
        resumed.truncate_after(2)
        resumed.log({"upper/loss": 30.0}, step=3, phase="outer")

    records = strict_lines(tmp_path / "metrics.jsonl")
    assert [(r["phase"], r["step"], r["upper/loss"]) for r in records] == [("outer", 1, 1.0), ("outer", 2, 2.0), ("outer", 3, 30.0)]
    assert scalars(tmp_path, "upper/loss") == [(1, 1.0), (2, 2.0), (3, 30.0)]


def test_disabled_tracker_writes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    tracker = Tracker(run_dir, enabled=False)
    bar = tracker.progress(total=3)
    tracker.log({"upper/loss": 1.0}, step=1, phase="outer")
    tracker.show({"upper/loss": 1.0})
    bar.update()
    tracker.truncate_after(0)
    tracker.close()
    assert not run_dir.exists()


def test_progress_shows_the_key_metrics(tmp_path):
    with Tracker(tmp_path) as tracker:
        bar = tracker.progress(total=10, initial=4)
        tracker.show({"upper/loss": 0.123456, "lower/J": 1.5, "oracle/pairs": 1200.0, "time/outer_s": 3.0})
        assert bar.n == 4
        assert bar.postfix == "loss=0.1235, J=1.5, pairs=1200"


def test_reserved_names_and_show_before_progress_fail(tmp_path):
    tracker = Tracker(tmp_path)
    with pytest.raises(ValueError, match="reserved"):
        tracker.log({"step": 1.0}, step=1, phase="outer")
    with pytest.raises(RuntimeError, match="progress"):
        tracker.show({"upper/loss": 1.0})


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_file_gets_a_line_per_step_and_a_terminal_the_bar(tmp_path):
    metrics = {"outer_step": 2.0, "oracle/pairs": 24.0, "gold/score": 0.375, "eval/agreement": 0.5, "time/elapsed_s": 50.0}
    log = io.StringIO()
    with Tracker(tmp_path, tensorboard=False) as tracker:
        bar = tracker.progress(total=10, stream=log)
        tracker.show(metrics)
        tracker.show({"outer_step": 3.0, "oracle/pairs": 36.0, "time/elapsed_s": 75.0})
        assert bar.disable
    assert log.getvalue().splitlines() == [
        "step 2/10, labels 24, gold 0.375, agreement 50%, elapsed 0:00:50, remaining 0:03:20",
        "step 3/10, labels 36, elapsed 0:01:15, remaining 0:02:55",
    ]
    terminal = Terminal()
    with Tracker(tmp_path / "tty", tensorboard=False) as tracker:
        bar = tracker.progress(total=10, stream=terminal)
        tracker.show(metrics)
        assert not bar.disable and "gold=0.375" in bar.postfix
    assert "step 2/10" not in terminal.getvalue()
    quiet = io.StringIO()
    with Tracker(tmp_path / "other", enabled=False) as tracker:  # a non-main process
        tracker.progress(total=10, stream=quiet)
        tracker.show(metrics)
    assert quiet.getvalue() == ""
