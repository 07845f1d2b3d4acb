#!/bin/bash
# DIME-FM distillation, ViT-L/14 -> ViT-B/32, the paper's setting: 8 nodes x 8 GPUs, one task per GPU.
#
#   sbatch slurm/distill_vitb32.sh data.images=/data/img/{00000..03999}.tar data.texts=/data/grounded
#
# Edit here or override on the command line (command-line flags win over #SBATCH lines):
#   sbatch --nodes=2 --ntasks-per-node=4 --gpus-per-node=4 --partition=gpu --account=me --time=1-00:00:00 \
#          slurm/distill_vitb32.sh [hydra overrides...]
# CPU-only cluster: sbatch --gpus-per-node=0 ... (no GPU request; the trainer picks gloo on CPU).
# Environment (exported before sbatch; jobs inherit it):
#   PYTHON      interpreter with dime_ds installed (default: python on PATH; e.g. /path/to/.venv/bin/python)
#   EXPERIMENT  config in configs/experiment/ (default: vitb32_from_vitl14)
#   SRUN_ARGS   extra srun arguments
#   TORCH_EXTENSIONS_DIR  shared cache for DeepSpeed's JIT-compiled ops (set it on a shared file system)
# Preemption / time limit: SLURM sends SIGUSR1 120 s before the limit (SIGTERM on preemption); the
# trainer checkpoints at the next step, rank 0 requeues the job (dime_ds/jobs.py) and the requeued
# job resumes from the checkpoint (ckpt.resume=latest). Logs are appended across requeues.
# The #SBATCH request below is what this submitit launch asks for (tests/slurm/test_launch_dry_run.py):
# launch-equivalent: python -m dime_ds.launch stage=distill experiment=vitb32_from_vitl14
#SBATCH --job-name=dime_distill_vitb32
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=10
#SBATCH --mem=0
#SBATCH --time=3-00:00:00
#SBATCH --signal=USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
# Uncomment and edit for your site:
##SBATCH --partition=gpu
##SBATCH --account=my_account
##SBATCH --qos=normal
##SBATCH --constraint=a100

PYTHON=${PYTHON:-python}
EXPERIMENT=${EXPERIMENT:-vitb32_from_vitl14}

echo "job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST}: $(date)"
# exec: srun stays the batch step until every task has checkpointed and exited
# shellcheck disable=SC2086
exec srun --kill-on-bad-exit=1 ${SRUN_ARGS:-} "$PYTHON" -m dime_ds.distill experiment="$EXPERIMENT" ckpt.resume=latest "$@"
