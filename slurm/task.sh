#!/bin/bash
# One Slurm task = one rank. Run by srun on every task (and by the dry run, with fake SLURM_*):
# sets the torch/DeepSpeed launcher variables from Slurm's, then execs the command.
# "{rank}" and "{world}" inside arguments become this task's global rank and the world size
# (feature extraction uses them for --shard-index/--num-shards and per-shard output names).
set -euo pipefail

export RANK="${SLURM_PROCID:?task.sh runs under srun (SLURM_PROCID unset)}"
export LOCAL_RANK="${SLURM_LOCALID:?SLURM_LOCALID unset}"
export WORLD_SIZE="${SLURM_NTASKS:?SLURM_NTASKS unset}"
export LOCAL_WORLD_SIZE="${IGPT_GPUS_PER_NODE:-${SLURM_NTASKS_PER_NODE:-1}}"
if [[ "${IGPT_ONE_GPU_PER_TASK:-0}" == 1 ]]; then
  export CUDA_VISIBLE_DEVICES="$LOCAL_RANK"  # independent processes: each sees only its GPU
fi

args=()
for a in "$@"; do
  a="${a//\{rank\}/$RANK}"
  args+=("${a//\{world\}/$WORLD_SIZE}")
done

if [[ -n "${IGPT_TASK_PRINT:-}" ]]; then
  # dry run: the exact command this rank would exec, with the variables it would see
  printf 'RANK=%s LOCAL_RANK=%s WORLD_SIZE=%s MASTER_ADDR=%s MASTER_PORT=%s' \
    "$RANK" "$LOCAL_RANK" "$WORLD_SIZE" "${MASTER_ADDR:-}" "${MASTER_PORT:-}"
  if [[ "${IGPT_ONE_GPU_PER_TASK:-0}" == 1 ]]; then printf ' CUDA_VISIBLE_DEVICES=%s' "$CUDA_VISIBLE_DEVICES"; fi
  printf ' %q' "${args[@]}"
  printf '\n'
  exit 0
fi
exec "${args[@]}"
