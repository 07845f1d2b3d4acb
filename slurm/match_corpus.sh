#!/bin/bash
# Grounded text corpus (DIME-FM Algorithm 1): teacher embeddings of images and sentences, then matching;
# optionally the sentence pool curated first (MetaCLIP balancing, dime_ds.curate).
#
#   sbatch slurm/match_corpus.sh data.images=/data/img/{00000..03999}.tar data.corpus=/data/corpus
#   STAGES="curate embed match" sbatch slurm/match_corpus.sh data.images=... data.corpus=/data/pool \
#       curate.metadata=/data/metadata.json curate.t=20000     # embed and match then read the curated pool
#   STAGES="embed match curate" sbatch slurm/match_corpus.sh ...  # or balance the grounded corpus after match
#       (curate.input=grounded; distill then trains on it: data.texts=<curate.out_dir>/corpus)
#
# Edit here or override on the command line (command-line flags win over #SBATCH lines):
#   sbatch --nodes=1 --ntasks-per-node=8 --gpus-per-node=8 --partition=gpu slurm/match_corpus.sh [overrides...]
# CPU-only cluster: sbatch --gpus-per-node=0 ...
# Environment (exported before sbatch; jobs inherit it):
#   PYTHON      interpreter with dime_ds installed (default: python on PATH)
#   EXPERIMENT  config in configs/experiment/ (default: vitb32_from_vitl14, whose teacher embeds)
#   STAGES      stages to run, in order (default: "embed match"; "match" alone reuses embeddings;
#               "curate embed match" curates first and passes curate.enabled=true to every stage;
#               "embed match curate" curates the grounded corpus, passing curate.input=grounded)
#   SRUN_ARGS   extra srun arguments for the embed stage (all tasks)
# The curate and embed stages run on every task (curate: CPU matching, one shard at a time per task);
# match (faiss) runs as a single task on the first node.
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

set -e
PYTHON=${PYTHON:-python}
EXPERIMENT=${EXPERIMENT:-vitb32_from_vitl14}
STAGES=${STAGES:-embed match}
CURATED=()       # what every stage gets when curate runs first (the user's overrides still win)
CURATE_INPUT=()  # what the curate stage gets when it runs after match
case " $STAGES " in
    *" curate "*) case " ${STAGES%%curate*} " in  # the stages before curate
                      *" match "*) CURATE_INPUT=(curate.input=grounded) ;;
                      *) CURATED=(curate.enabled=true) ;;
                  esac ;;
esac

echo "job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST}: $(date)"
for stage in $STAGES; do
    case "$stage" in
        curate) # shellcheck disable=SC2086
                srun ${SRUN_ARGS:-} "$PYTHON" -m dime_ds.curate stage=metaclip experiment="$EXPERIMENT" \
                    "${CURATED[@]}" "${CURATE_INPUT[@]}" "$@" ;;
        embed) # shellcheck disable=SC2086
               srun ${SRUN_ARGS:-} "$PYTHON" -m dime_ds.match stage=embed experiment="$EXPERIMENT" "${CURATED[@]}" "$@" ;;
        match) srun --nodes=1 --ntasks=1 "$PYTHON" -m dime_ds.match stage=match experiment="$EXPERIMENT" \
                   "${CURATED[@]}" "$@" ;;
        *) echo "unknown stage $stage (curate|embed|match)" >&2; exit 2 ;;
    esac
done
