# shellcheck shell=bash
# Shared logic of the sbatch scripts in slurm/: sourced, never run.
#
#   igpt_init            node list, MASTER_ADDR/PORT, world size, NCCL environment (from Slurm)
#   igpt_launch CMD...   one process per GPU on every node (srun + slurm/task.sh, or the deepspeed
#                        launcher with a generated hostfile: LAUNCHER=deepspeed)
#   igpt_pretrain ARGS   igpt_ds/pretrain.py with the job's variables, resuming from $SAVE/latest
#
# DRY_RUN=1 prints what every node and rank would run instead of running it; it needs no Slurm:
#   DRY_RUN=1 SLURM_JOB_NODELIST='node[01-02]' SLURM_NNODES=2 SLURM_GPUS_PER_NODE=8 \
#     TP=2 PP=2 bash slurm/pretrain_m.sbatch
#
# Preemption and time limits: the scripts ask Slurm for SIGUSR1 300 s before the end
# (#SBATCH --signal=B:USR1@300). The trap forwards it to the trainer (which saves a checkpoint
# and exits), waits for it, then requeues the job; the requeued job resumes with --load $SAVE.

IGPT_ROOT="${IGPT_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}"
IGPT_CHILD=""
IGPT_SIGNALLED=""

igpt_die() {
  echo "error: $*" >&2
  exit 1
}

igpt_dry() { [[ -n "${DRY_RUN:-}" && "${DRY_RUN}" != 0 ]]; }

# Print a command as a shell would re-read it.
igpt_show() {
  printf '+'
  printf ' %q' "$@"
  printf '\n'
}

igpt_hostnames() {
  if command -v scontrol >/dev/null 2>&1; then
    scontrol show hostnames "$SLURM_JOB_NODELIST"
  else
    python3 "$IGPT_ROOT/slurm/hostlist.py" "$SLURM_JOB_NODELIST"
  fi
}

# NCCL/torch settings a multi-node job needs. Every one is a default: export it before sbatch
# (or in the script) to override. NCCL_SOCKET_IFNAME / NCCL_IB_HCA are cluster-specific and only
# passed through when set.
igpt_nccl_env() {
  export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"  # a failed collective kills the job instead of hanging it
  export NCCL_ASYNC_ERROR_HANDLING="${NCCL_ASYNC_ERROR_HANDLING:-1}"              # the same, torch < 2.2 name
  export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
  export NCCL_IB_DISABLE="${NCCL_IB_DISABLE:-0}"          # use InfiniBand/RoCE when present
  export NCCL_IB_TIMEOUT="${NCCL_IB_TIMEOUT:-22}"         # 4.096 us * 2^22 ~ 17 s before an IB retry
  export NCCL_IB_RETRY_CNT="${NCCL_IB_RETRY_CNT:-7}"
  export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"  # megatron-core TP: keep comm/compute order
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-4}}"
  export PYTHONUNBUFFERED=1
  local v
  for v in NCCL_SOCKET_IFNAME NCCL_IB_HCA NCCL_NET_GDR_LEVEL; do
    if [[ -n "${!v:-}" ]]; then export "${v?}"; fi
  done
}

# Node list, rendezvous and world size from Slurm's variables.
igpt_init() {
  : "${SLURM_JOB_NODELIST:?not inside a Slurm job: submit with sbatch, or preview with DRY_RUN=1 SLURM_JOB_NODELIST='node[01-02]' SLURM_NNODES=2 SLURM_GPUS_PER_NODE=8}"
  mapfile -t IGPT_NODES < <(igpt_hostnames)
  ((${#IGPT_NODES[@]} > 0)) || igpt_die "empty node list from SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST"
  NNODES="${SLURM_NNODES:-${#IGPT_NODES[@]}}"
  ((NNODES == ${#IGPT_NODES[@]})) || igpt_die "SLURM_NNODES=$NNODES but the node list has ${#IGPT_NODES[@]} nodes"
  GPUS_PER_NODE="${GPUS_PER_NODE:-${SLURM_GPUS_PER_NODE:-${SLURM_NTASKS_PER_NODE:-8}}}"
  GPUS_PER_NODE="${GPUS_PER_NODE##*:}"  # Slurm may say "h100:8"
  export IGPT_GPUS_PER_NODE="$GPUS_PER_NODE"
  WORLD="$((NNODES * GPUS_PER_NODE))"
  export MASTER_ADDR="${MASTER_ADDR:-${IGPT_NODES[0]}}"
  # a port per job, so two jobs sharing a first node do not collide
  export MASTER_PORT="${MASTER_PORT:-$((29500 + ${SLURM_JOB_ID:-0} % 10000))}"
  igpt_nccl_env
  echo "nodes: ${IGPT_NODES[*]} (${NNODES} x ${GPUS_PER_NODE} GPUs, world size ${WORLD})"
  echo "master: ${MASTER_ADDR}:${MASTER_PORT}"
}

# Refuse a layout the trainer would refuse, before any node starts (same rules and wording as
# igpt_ds.parallel.ParallelLayout.validate; the trainer checks again).
igpt_check_layout() {
  local tp="$1" pp="$2" zero="$3"
  ((WORLD % (tp * pp) == 0)) ||
    igpt_die "world size $WORLD is not divisible by TP x PP = $tp x $pp = $((tp * pp)): change NODES, TP or PP"
  ((tp <= GPUS_PER_NODE)) ||
    igpt_die "TP=$tp is larger than a node ($GPUS_PER_NODE GPUs): tensor parallelism needs NVLink; use TP <= $GPUS_PER_NODE and add PP or ZeRO-3"
  if ((pp > 1 && zero >= 2)); then
    igpt_die "ZeRO stage $zero cannot be combined with pipeline parallelism (PP=$pp): use DS_CONFIG=ds_configs/zero1_pipe_bf16.json, or PP=1"
  fi
}

igpt_zero_stage() {  # ZeRO stage of a DeepSpeed JSON config (0 if the file is missing)
  [[ -f "$1" ]] || { echo 0; return; }
  python3 -c 'import json, sys; print(json.load(open(sys.argv[1])).get("zero_optimization", {}).get("stage", 0))' "$1"
}

# (dp, tp, pp) of a global rank: TP fastest, then DP, then PP (igpt_ds.parallel.ParallelLayout.coords).
igpt_coords() {
  local rank="$1" tp="$2" pp="$3" dp="$((WORLD / ($2 * $3)))"
  echo "dp=$(((rank / tp) % dp)) tp=$((rank % tp)) pp=$((rank / (tp * dp)))"
}

# Run CMD on every GPU of every node: one task per GPU (srun), or LAUNCHER=deepspeed.
# Env: IGPT_TP/IGPT_PP for the dry run's coordinates (default 1).
igpt_launch() {
  local tp="${IGPT_TP:-1}" pp="${IGPT_PP:-1}" launch
  if [[ "${LAUNCHER:-srun}" == deepspeed ]]; then
    local hostfile="${HOSTFILE:-${SAVE:-$IGPT_ROOT}/hostfile.${SLURM_JOB_ID:-dry}}"
    local n
    if [[ "$1" == python* ]]; then shift; fi  # the deepspeed launcher starts python itself
    if [[ "$1" == -u ]]; then shift; fi
    launch=(deepspeed --hostfile "$hostfile" --num_nodes "$NNODES" --num_gpus "$GPUS_PER_NODE"
      --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" "$@")
    if igpt_dry; then
      echo "hostfile $hostfile:"
      for n in "${IGPT_NODES[@]}"; do echo "  $n slots=$GPUS_PER_NODE"; done
      echo "on ${IGPT_NODES[0]} (the launcher starts every rank over ssh/pdsh):"
      igpt_show "${launch[@]}"
      return 0
    fi
    for n in "${IGPT_NODES[@]}"; do echo "$n slots=$GPUS_PER_NODE"; done >"$hostfile"
  else
    launch=(srun --nodes="$NNODES" --ntasks="$WORLD" --ntasks-per-node="$GPUS_PER_NODE"
      --kill-on-bad-exit=1 "$IGPT_ROOT/slurm/task.sh" "$@")
    if igpt_dry; then
      igpt_show "${launch[@]}"
      local node l rank i=0
      for node in "${IGPT_NODES[@]}"; do
        for ((l = 0; l < GPUS_PER_NODE; l++)); do
          rank=$((i * GPUS_PER_NODE + l))
          printf 'node %s rank %d local_rank %d %s: ' "$node" "$rank" "$l" "$(igpt_coords "$rank" "$tp" "$pp")"
          SLURM_PROCID="$rank" SLURM_LOCALID="$l" SLURM_NTASKS="$WORLD" IGPT_TASK_PRINT=1 \
            "$IGPT_ROOT/slurm/task.sh" "$@"
        done
        i=$((i + 1))
      done
      return 0
    fi
  fi
  "${launch[@]}" &
  IGPT_CHILD=$!
  igpt_wait
}

# Forward a signal to the job's steps (the trainer checkpoints on SIGUSR1/SIGTERM and exits).
igpt_on_signal() {
  IGPT_SIGNALLED="$1"
  echo "$(date -Is) caught SIG$1: asking the trainer to save a checkpoint and exit"
  if [[ -n "$IGPT_CHILD" ]]; then
    # scancel without --batch signals every job step but not this shell
    scancel --signal=USR1 "$SLURM_JOB_ID" 2>/dev/null || kill -USR1 "$IGPT_CHILD" 2>/dev/null || true
  fi
}

igpt_trap_signals() {
  trap 'igpt_on_signal USR1' USR1
  trap 'igpt_on_signal TERM' TERM
  if igpt_dry; then
    echo "on SIGUSR1 (${IGPT_SIGNAL_LEAD:-300} s before the time limit) or SIGTERM (preemption):"
    echo "  + scancel --signal=USR1 ${SLURM_JOB_ID:-JOBID}   (trainer saves to ${SAVE:-SAVE} and exits)"
    echo "  + scontrol requeue ${SLURM_JOB_ID:-JOBID}   (the requeued job resumes with --load ${SAVE:-SAVE})"
  fi
}

# Wait for the launched step; a trap interrupts `wait`, so wait again until it has really exited.
# After a signal, requeue the job (REQUEUE=0 turns that off).
igpt_wait() {
  local rc=0
  while true; do
    rc=0
    wait "$IGPT_CHILD" || rc=$?
    kill -0 "$IGPT_CHILD" 2>/dev/null || break
  done
  IGPT_CHILD=""
  if [[ -n "$IGPT_SIGNALLED" && "${REQUEUE:-1}" == 1 ]]; then
    echo "$(date -Is) trainer exited with $rc after SIG$IGPT_SIGNALLED: requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
    return 0
  fi
  return "$rc"
}

# Default DeepSpeed config: the preset's, or the pipeline one when PP > 1 (ZeRO-0/1 only there).
igpt_default_ds_config() {
  local preset="$1" pp="$2"
  if ((pp > 1)); then
    echo "ds_configs/zero1_pipe_${PRECISION:-bf16}.json"
  else
    echo "ds_configs/${preset}.json"
  fi
}

# Pretraining with the job's variables (set by the preset scripts, all overridable):
#   MODEL TP PP DS_CONFIG SAVE TRAIN_DATA VAL_DATA LR TRAIN_STEPS WARMUP_STEPS SAVE_INTERVAL
#   EVAL_INTERVAL SEED OBJECTIVE RESOLUTION ACTIVATION_CHECKPOINTING; extra arguments are appended.
igpt_pretrain() {
  igpt_init
  cd "$IGPT_ROOT" || igpt_die "cannot cd to $IGPT_ROOT"
  : "${MODEL:?MODEL unset}" "${SAVE:?SAVE unset: the checkpoint directory}"
  local tp="${TP:-1}" pp="${PP:-1}"
  local config="${DS_CONFIG:-$(igpt_default_ds_config "$MODEL" "$pp")}"
  [[ -f "$config" ]] || echo "warning: DeepSpeed config $config not found (relative to $IGPT_ROOT)" >&2
  igpt_check_layout "$tp" "$pp" "$(igpt_zero_stage "$config")"
  echo "layout: DP=$((WORLD / (tp * pp))) TP=$tp PP=$pp, DeepSpeed config $config"

  local args=(python -u igpt_ds/pretrain.py --model "$MODEL" --objective "${OBJECTIVE:-ar}"
    --deepspeed_config "$config" --tensor-parallel "$tp" --pipeline-parallel "$pp"
    --save "$SAVE" --save-interval "${SAVE_INTERVAL:-1000}" --eval-interval "${EVAL_INTERVAL:-1000}"
    --seed "${SEED:-0}")
  local data
  read -ra data <<<"${TRAIN_DATA:?TRAIN_DATA unset: training shards, e.g. 'data/imagenet32/train-{000000..000255}.tar'}"
  args+=(--train-data "${data[@]}")
  if [[ -n "${VAL_DATA:-}" ]]; then
    read -ra data <<<"$VAL_DATA"
    args+=(--val-data "${data[@]}")
  fi
  if [[ -n "${LR:-}" ]]; then args+=(--lr "$LR"); fi
  if [[ -n "${RESOLUTION:-}" ]]; then args+=(--resolution "$RESOLUTION"); fi
  if [[ -n "${TRAIN_STEPS:-}" ]]; then args+=(--train-steps "$TRAIN_STEPS"); fi
  if [[ -n "${WARMUP_STEPS:-}" ]]; then args+=(--warmup-steps "$WARMUP_STEPS"); fi
  if [[ "${ACTIVATION_CHECKPOINTING:-0}" == 1 ]]; then args+=(--activation-checkpointing); fi
  # resume: DeepSpeed writes SAVE/latest naming the newest checkpoint tag
  if [[ -f "$SAVE/latest" ]]; then
    echo "resuming from $SAVE (latest: $(cat "$SAVE/latest"))"
    args+=(--load "$SAVE")
  fi
  args+=("$@")
  if ! igpt_dry; then mkdir -p "$SAVE"; fi
  igpt_trap_signals
  IGPT_TP="$tp" IGPT_PP="$pp" igpt_launch "${args[@]}"
}
