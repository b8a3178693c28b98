#!/usr/bin/env bash
# Two machines x 8 GPUs under SLURM: `sbatch scripts/slurm_multinode.sh recipes/medical.yaml`.
# One task per node; each task runs finetune, which starts one process per GPU through torchrun and meets the
# other node at node 0's address. Rank 0 (on node 0) prepares the data, writes the run directory and publishes,
# so RUN must be on a filesystem both nodes see. SIGTERM from SLURM (preemption, --signal, time limit) makes every
# rank finish its step; one checkpoint is written and the job exits 143; resubmitting the same job resumes it.
#SBATCH --job-name=finetune
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --signal=B:TERM@300          # SIGTERM 5 minutes before the time limit: time for one step and a checkpoint
#SBATCH --requeue                    # preempted jobs come back and resume
#SBATCH --output=logs/%x-%j.out
set -euo pipefail
RECIPE=${1:?usage: sbatch scripts/slurm_multinode.sh RECIPE [RUN_DIR]}
RUN_DIR=${2:-runs/$(basename "$RECIPE" .yaml)}
MAIN=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
# HF_TOKEN / WANDB_API_KEY: export them in the environment the job inherits, never in the recipe.
srun --kill-on-bad-exit=1 bash -c "finetune run '$RECIPE' --run-dir '$RUN_DIR' \
    --gpus $SLURM_GPUS_ON_NODE --nodes $SLURM_NNODES --node-rank \$SLURM_NODEID --main-address $MAIN"
