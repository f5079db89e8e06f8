"""What `rlhf-bilevel eval` leaves behind: `eval.json`, a short `report.md`, and `training.png`.

`training.png` plots a run's own evaluations from its `metrics.jsonl` against the oracle pairs
it had used by then: the x-axis that says how much feedback a method needs.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

EVAL_FILE = "eval.json"
REPORT_FILE = "report.md"
PLOT_FILE = "training.png"


def plain(node: Any) -> Any:
    """`node` with every dataclass (an evaluation's estimates) as a dict, ready for JSON."""
    if dataclasses.is_dataclass(node):
        return dataclasses.asdict(node)
    if isinstance(node, dict):
        return {k: plain(v) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [plain(v) for v in node]
    return node


def curves(metrics_file: Path) -> dict[str, list[tuple[float, float]]]:
    """(oracle pairs used, value) of each evaluated metric over a run's outer records."""
    series: dict[str, list[tuple[float, float]]] = {}
    for line in metrics_file.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if record.get("phase") != "outer":
            continue
        pairs = record.get("oracle/pairs", 0.0)  # the evaluation before any step has none yet
        for key in ("gold/score", "gold/reference", "eval/agreement"):
            if key in record:
                series.setdefault(key, []).append((pairs, record[key]))
    return series


def plot_curves(runs: dict[str, dict[str, list[tuple[float, float]]]], path: Path) -> None:
    """Gold score and reward-model agreement against oracle pairs used, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("gold/score", "gold score (held-out)"), ("eval/agreement", "reward model ↔ oracle agreement")]
    fig, axes = plt.subplots(1, len(panels), figsize=(11, 4))
    for ax, (key, title) in zip(axes, panels):
        for name, series in runs.items():
            if key in series:
                x, y = zip(*series[key])
                ax.plot(x, y, marker="o", label=name)
        if key == "gold/score":
            references = [series["gold/reference"][0][1] for series in runs.values() if "gold/reference" in series]
            if references:
                ax.axhline(references[0], color="grey", linestyle="--", label="reference policy")
        ax.set(title=title, xlabel="oracle pairs used")
        if ax.lines:
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(result: dict, title: str) -> str:
    """A short human summary of one `evaluate` result."""
    level = f"{result['confidence']:.0%}"
    lines = [
        f"# {title}",
        "",
        f"{result['prompts']} held-out prompts, {2 * result['samples']} responses each from the policy and from the reference (seed {result['seed']}); "
        f"{result['oracle_pairs']} oracle pairs. Intervals: {level} percentile bootstrap over prompts.",
        "",
        "| measure | policy | reference |",
        "|---|---|---|",
        f"| win rate vs reference (both orders, ties ½) | {result['win_rate']} | 0.5 |",
    ]
    if "gold" in result:
        lines.append(f"| gold score | {result['gold']['policy']} | {result['gold']['reference']} |")
    if "agreement" in result:
        policy, reference = result["agreement"]["policy"], result["agreement"]["reference"]
        lines.append(f"| reward model ↔ oracle agreement (pairs the oracle decides) | {policy} n={policy.n} | {reference} n={reference.n} |")
    lines.append(f"| response tokens | {result['length']['policy']:.1f} | {result['length']['reference']:.1f} |")
    lines.append(f"| KL to reference | {result['kl']:.3f} | 0 |")
    if "agreement_shift" in result:
        lines += [
            "",
            f"Distribution shift: the reward model agrees with the oracle {result['agreement_shift']:+.3f} more often on the "
            "policy's own responses than on the reference's (negative: it is less accurate where the policy went).",
        ]
    lines += ["", "## Examples", ""]
    for example in result["examples"]:
        lines += [f"- **prompt:** {example['prompt']}", f"  - reference: {example['reference']}", f"  - policy: {example['policy']}"]
    return "\n".join(lines) + "\n"


def write_eval(result: dict, out: Path, name: str, metrics_file: Path | None = None) -> list[Path]:
    """eval.json and report.md in `out`, and training.png when the run's metrics are at hand; `name` names what was evaluated."""
    out.mkdir(parents=True, exist_ok=True)
    written = [out / EVAL_FILE, out / REPORT_FILE]
    written[0].write_text(json.dumps(plain(result), indent=1, ensure_ascii=False), encoding="utf-8")
    text = markdown(result, f"Evaluation of {name}")
    if metrics_file is not None and metrics_file.is_file():
        plot_curves({name: curves(metrics_file)}, out / PLOT_FILE)
        written.append(out / PLOT_FILE)
        text += f"\n## Training\n\n![training curves]({PLOT_FILE})\n"
    written[1].write_text(text, encoding="utf-8")
    return written
