#!/bin/bash
# One run of `rlhf-bilevel train` over several SLURM nodes: one `accelerate launch` per node,
# each starting PROCS_PER_NODE processes; together they run the recipe's GLOBAL batch sizes,
# split evenly (docs/cluster.md). Resubmitting the same command continues the run from its
# newest checkpoint.
#
#   sbatch --nodes=2 scripts/slurm-multinode.sh recipes/qwen2.5-0.5b-cluster.yaml /scratch/runs/qwen [--set key=value ...]
#
# Submit it from the repository root with the project's environment active (the job inherits
# both). RUN_DIR must be on a file system every node sees: the main process writes it, and every
# process reads the checkpoint when a run resumes.
#SBATCH --job-name=rlhf-bilevel
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:8
#SBATCH --cpus-per-task=16
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --output=%x-%j.out
set -euo pipefail

RECIPE=${1:?usage: sbatch scripts/slurm-multinode.sh RECIPE RUN_DIR [--set key=value ...]}
RUN_DIR=${2:?usage: sbatch scripts/slurm-multinode.sh RECIPE RUN_DIR [--set key=value ...]}
shift 2
PROCS_PER_NODE=${PROCS_PER_NODE:-8}  # one per GPU (--gres=gpu:8)
MAIN_PORT=${MAIN_PORT:-29500}
MAIN_HOST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
# the processes of a node share its cores; the tiny per-process batches gain nothing from more
export OMP_NUM_THREADS=$(( SLURM_CPUS_PER_TASK / PROCS_PER_NODE > 0 ? SLURM_CPUS_PER_TASK / PROCS_PER_NODE : 1 ))

if [[ -f "$RUN_DIR/recipe.yaml" ]]; then
    TRAIN=(train --resume "$RUN_DIR" "$@")  # a requeued or resubmitted job goes on where it stopped
else
    TRAIN=(train --recipe "$RECIPE" --output-dir "$RUN_DIR" "$@")
fi

export MAIN_HOST MAIN_PORT PROCS_PER_NODE
export ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-$SLURM_SUBMIT_DIR/scripts/accelerate-multinode.yaml}
# SLURM_NODEID differs from node to node: the inner shell reads it there; a failed node ends the job
srun --kill-on-bad-exit=1 bash -c 'exec accelerate launch --config_file "$ACCELERATE_CONFIG" \
    --num_machines "$SLURM_NNODES" --num_processes $(( SLURM_NNODES * PROCS_PER_NODE )) \
    --machine_rank "$SLURM_NODEID" --main_process_ip "$MAIN_HOST" --main_process_port "$MAIN_PORT" \
    -m rlhf_bilevel_cli.app "$@"' launcher "${TRAIN[@]}"
