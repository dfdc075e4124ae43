#!/bin/bash
# Features -> linear probe as one chain of Slurm jobs, submitted from the repository root:
#
#   CHECKPOINT=runs/igpt-s/export DATA=cifar-10-batches-py NAME=cifar10 bash slurm/features_chain.sh
#
# submits five jobs, each starting only when the ones it needs succeeded (--dependency=afterok;
# --kill-on-invalid-dep=yes cancels the rest if one fails instead of leaving them pending):
#   extract train, extract test   slurm/extract_features.sbatch, one slice per GPU:
#                                 FEATURES/NAME-train.partIIIII-of-NNNNN.npz (one GPU: the file itself)
#   merge train, merge test       python tools/extract_features.py merge FEATURES/NAME-<split>.npz (CPU)
#   probe                         slurm/linear_probe.sbatch on the two merged files -> PROBE
#
# Variables: CHECKPOINT, DATA (image source or shard directory, as extract_features.sbatch reads it),
# TEST_DATA (default DATA; e.g. a second shard directory), TRAIN_SPLIT (train), TEST_SPLIT (test),
# NAME (default: DATA's base name), FEATURES (features), PROBE (probes/NAME.json), LAYERS (auto),
# MERGE_TIME (02:00:00), PYTHON (python), EXTRACT_SBATCH_ARGS / PROBE_SBATCH_ARGS (sbatch options
# for those jobs only, e.g. EXTRACT_SBATCH_ARGS='--nodes=2'), EXTRACT_ARGS / PROBE_ARGS (extra
# arguments of tools/extract_features.py / tools/linear_probe.py, e.g. PROBE_ARGS='--concat 5').
# Arguments are sbatch options for every job (e.g. --account=X --partition=Y).
# DRY_RUN=1 prints the sbatch commands and submits nothing.
# Re-running the chain after a failure is cheap: finished slices are kept (extract_features.py).
set -euo pipefail

# shellcheck source=slurm/common.sh
source "${IGPT_ROOT:-$PWD}/slurm/common.sh"
cd "$IGPT_ROOT" || igpt_die "cannot cd to IGPT_ROOT=$IGPT_ROOT: run from the repository root or set IGPT_ROOT"
: "${CHECKPOINT:?CHECKPOINT unset: a consolidated checkpoint directory (e.g. runs/igpt-s/export)}"
: "${DATA:?DATA unset: the image source or shard directory to extract (e.g. cifar-10-batches-py)}"
TEST_DATA="${TEST_DATA:-$DATA}"
TRAIN_SPLIT="${TRAIN_SPLIT:-train}"
TEST_SPLIT="${TEST_SPLIT:-test}"
NAME="${NAME:-$(basename "$DATA")}"
NAME="${NAME%.npz}"
FEATURES="${FEATURES:-features}"
PROBE="${PROBE:-probes/$NAME.json}"
PYTHON="${PYTHON:-python}"
read -ra extract_opts <<<"${EXTRACT_SBATCH_ARGS:-}"
read -ra probe_opts <<<"${PROBE_SBATCH_ARGS:-}"
read -ra extract_args <<<"${EXTRACT_ARGS:-}"
read -ra probe_args <<<"${PROBE_ARGS:-}"
common=("$@")
if igpt_dry; then
  echo "dry run: nothing is submitted; <...> stand for job ids"
else
  command -v sbatch >/dev/null || igpt_die "sbatch not found: run this on a Slurm login node (or preview with DRY_RUN=1)"
  mkdir -p logs "$FEATURES" "$(dirname "$PROBE")"
fi

# submit LABEL VAR=VALUE... -- SBATCH-ARGS...: print the command, submit it, and set JOB to its id.
submit() {
  local label="$1" assigns=()
  shift
  while [[ "$1" != -- ]]; do assigns+=("$1"); shift; done
  shift
  local cmd=(sbatch --parsable "${common[@]}" "$@")
  igpt_show "${assigns[@]}" "${cmd[@]}"
  if igpt_dry; then
    JOB="<$label>"
    return
  fi
  local out
  out="$(env "${assigns[@]}" "${cmd[@]}")" || igpt_die "sbatch for the $label job failed (above); jobs submitted so far: ${submitted[*]:-none}"
  JOB="${out%%;*}"  # --parsable prints "id" or "id;cluster"
  submitted+=("$JOB")
  echo "  -> $label: job $JOB"
}

submitted=()
merges=()
for which in train test; do
  out="$FEATURES/$NAME-$which.npz"
  if [[ "$which" == train ]]; then
    src="$DATA" split="$TRAIN_SPLIT" train_features="$out"
  else
    src="$TEST_DATA" split="$TEST_SPLIT" test_features="$out"
  fi
  # SHARDS is cleared so that a value exported in this shell does not override DATA.
  submit "extract-$which" CHECKPOINT="$CHECKPOINT" DATA="$src" SHARDS= SPLIT="$split" OUT="$out" \
    LAYERS="${LAYERS:-auto}" -- --job-name="igpt-features-$which" "${extract_opts[@]}" slurm/extract_features.sbatch \
    "${extract_args[@]}"
  submit "merge-$which" -- --dependency="afterok:$JOB" --kill-on-invalid-dep=yes --job-name="igpt-merge-$which" \
    --nodes=1 --ntasks=1 --cpus-per-task=2 --time="${MERGE_TIME:-02:00:00}" --chdir="$IGPT_ROOT" \
    --output=logs/%x-%j.out --wrap="$(printf '%q ' "$PYTHON" -u tools/extract_features.py merge "$out")"
  merges+=("$JOB")
done
submit probe TRAIN="$train_features" TEST="$test_features" OUT="$PROBE" -- \
  --dependency="afterok:${merges[0]}:${merges[1]}" --kill-on-invalid-dep=yes "${probe_opts[@]}" slurm/linear_probe.sbatch \
    "${probe_args[@]}"
echo "features: $train_features $test_features; probe: $PROBE (and ${PROBE%.json}.png)"
if ! igpt_dry; then
  echo "follow: squeue -j $(IFS=,; echo "${submitted[*]}"); cancel the chain: scancel ${submitted[*]}"
fi
