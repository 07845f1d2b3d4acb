#!/bin/bash
# Grounded text corpus (DIME-FM Algorithm 1): teacher embeddings of images and sentences, then matching;
# optionally the sentence pool curated first (MetaCLIP balancing), or the grounded corpus after.
#
#   sbatch slurm/match_corpus.sh data.images=/data/img/{00000..03999}.tar data.corpus=/data/corpus
#   STAGES="curate embed match" sbatch slurm/match_corpus.sh data.images=... data.corpus=/data/pool \
#       curate.metadata=/data/metadata.json curate.t=20000     # embed and match then read the curated pool
#   STAGES="embed match curate" sbatch slurm/match_corpus.sh ...  # or balance the grounded corpus after match
#       (curate.input=grounded; distill then trains on it: data.texts=<curate.out_dir>/corpus)
#
# Edit here or override on the command line (command-line flags win over #SBATCH lines):
#   sbatch --nodes=2 --ntasks-per-node=8 --gpus-per-node=8 --partition=gpu slurm/match_corpus.sh [overrides...]
# CPU-only cluster: sbatch --gpus-per-node=0 ...
# Environment (exported before sbatch; jobs inherit it):
#   PYTHON      interpreter with dime_ds installed (default: python on PATH)
#   EXPERIMENT  config in configs/experiment/ (default: vitb32_from_vitl14, whose teacher embeds)
#   STAGES      stages to run, in order (default: "embed match"; "match" alone reuses embeddings;
#               "curate embed match" curates first, "embed match curate" curates the grounded corpus):
#               python -m dime_ds.pipeline stages=... checks the order and tells each stage what it needs
#   SRUN_ARGS   extra srun arguments
# Every stage runs on every task, in one process group: curate (CPU matching, one shard at a time per
# task), embed (a share of the shards per GPU), match (each task searches a share of the sentences,
# rank 0 runs Algorithm 1's rounds and writes the corpus).
# The #SBATCH request below is what this submitit launch asks for (tests/slurm/test_launch_dry_run.py):
# launch-equivalent: python -m dime_ds.launch --nodes 1 --time 1440 stage=embed experiment=vitb32_from_vitl14
#SBATCH --job-name=dime_match_corpus
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=10
#SBATCH --mem=0
#SBATCH --time=1-00:00:00
#SBATCH --signal=USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
##SBATCH --partition=gpu
##SBATCH --account=my_account

PYTHON=${PYTHON:-python}
EXPERIMENT=${EXPERIMENT:-vitb32_from_vitl14}

echo "job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST}: $(date)"
# shellcheck disable=SC2086
exec srun ${SRUN_ARGS:-} "$PYTHON" -m dime_ds.pipeline stages="${STAGES:-embed match}" experiment="$EXPERIMENT" "$@"
