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
# Signals: what the batch shell does with each (the rule, and why, is in slurm/README.md,
# "Time limit, preemption and cancel"):
#   SIGUSR1  "save and come back": the script's own #SBATCH --signal=B:USR1@300 before the time
#            limit, `scancel --signal=USR1 --batch JOB`, or a preemption on a cluster with
#            PreemptParameters=send_user_signal. Forwarded to the trainer; requeued if it exited 0.
#   SIGUSR2  "save and stop": `scancel --signal=USR2 --batch JOB`. Forwarded; never requeued.
#   SIGTERM  Slurm is ending the job: `scancel JOB`, `scontrol requeue JOB`, a preemption, the end
#            of the time limit. The trainer saves; the script requeues only a preemption
#            (PreemptTime set): after scontrol requeue Slurm requeues the job itself, and a
#            user's scancel must stay cancelled.
# Never in a loop: a trainer that exits non-zero is not requeued, and after REQUEUE_MAX_NO_PROGRESS
# requeues in a row without a new checkpoint ($SAVE/latest unchanged) the job stops with the reason.

IGPT_ROOT="${IGPT_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}"
IGPT_CHILD=""
IGPT_SIGNALLED=""       # the first job signal (USR1|USR2|TERM): it decides requeue or stop
IGPT_CAUSE=""           # what sent it, for the log
IGPT_TIMER=""           # pid of a deferred time-limit warning (short --time), see igpt_on_signal
IGPT_LATEST0=""         # $SAVE/latest when the job started: progress = it changed

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
  # scontrol needs a cluster configuration; a dry run on a machine with the Slurm clients but no
  # cluster falls back to our own expansion
  if command -v scontrol >/dev/null 2>&1 && scontrol show hostnames "$SLURM_JOB_NODELIST" 2>/dev/null; then
    return 0
  fi
  python3 "$IGPT_ROOT/slurm/hostlist.py" "$SLURM_JOB_NODELIST"
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
  local from="GPUS_PER_NODE"
  if [[ -z "${GPUS_PER_NODE:-}" ]]; then
    if [[ -n "${SLURM_GPUS_PER_NODE:-}" ]]; then
      from="SLURM_GPUS_PER_NODE (sbatch --gpus-per-node)"
      GPUS_PER_NODE="$SLURM_GPUS_PER_NODE"
    else
      from="SLURM_NTASKS_PER_NODE (sbatch --ntasks-per-node)"
      GPUS_PER_NODE="${SLURM_NTASKS_PER_NODE:-8}"
    fi
  fi
  GPUS_PER_NODE="${GPUS_PER_NODE##*:}"  # Slurm may say "h100:8"
  GPUS_PER_NODE="${GPUS_PER_NODE%%(*}"  # or "8(IDX:0-7)"
  # one rank per GPU: 0 GPUs would mean world size 0 and every later message would mislead
  if [[ ! "$GPUS_PER_NODE" =~ ^[0-9]+$ ]] || ((GPUS_PER_NODE < 1)); then
    igpt_die "$from gives $GPUS_PER_NODE GPUs per node, so no rank could start: set GPUS_PER_NODE=<ranks per node> (e.g. GPUS_PER_NODE=2 for a CPU run with DS_ACCELERATOR=cpu), or submit with --gpus-per-node=8"
  fi
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
  # TP first: a TP larger than a node usually also breaks divisibility, and that message would
  # send the user to the node count instead of TP
  ((tp <= GPUS_PER_NODE)) ||
    igpt_die "TP=$tp is larger than a node (GPUS_PER_NODE=$GPUS_PER_NODE): tensor parallelism needs NVLink inside a node; set TP <= $GPUS_PER_NODE and add PP or ZeRO-3"
  ((WORLD % (tp * pp) == 0)) ||
    igpt_die "world size $WORLD is not divisible by TP x PP = $tp x $pp = $((tp * pp)): change NODES, TP or PP"
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

# A field of `scontrol show job` for this job ("" when unknown: no Slurm, or not in a job).
igpt_job_field() {
  local info
  # bounded: a busy slurmctld must not hold up a signal handler until SIGKILL
  info="$(timeout 20 scontrol show job -o "${SLURM_JOB_ID:-}" 2>/dev/null)" || return 0
  if [[ " $info" =~ [[:space:]]$1=([^[:space:]]*) ]]; then echo "${BASH_REMATCH[1]}"; fi
}

# Seconds of a Slurm time limit ([days-]hours:minutes:seconds); "" for UNLIMITED or unknown.
igpt_seconds() {
  local t="$1" d=0 hms
  [[ "$t" =~ ^[0-9] ]] || return 0
  if [[ "$t" == *-* ]]; then d="${t%%-*}" t="${t#*-}"; fi
  IFS=: read -ra hms <<<"$t"
  case "${#hms[@]}" in
    3) echo $(((10#$d * 24 + 10#${hms[0]}) * 3600 + 10#${hms[1]} * 60 + 10#${hms[2]})) ;;
    2) echo $((10#$d * 86400 + 10#${hms[0]} * 60 + 10#${hms[1]})) ;;
    *) echo $((10#$d * 86400 + 10#${hms[0]} * 60)) ;;
  esac
}

# The time-limit warning comes SIGNAL_LEAD s (300, what #SBATCH --signal=B:USR1@300 asks) before
# the end, but at most a fifth of the limit: with --time=5 a 300 s lead arrives during start-up,
# the trainer stops before step 1, and every requeued job would do the same.
igpt_signal_lead() {
  local lead="${SIGNAL_LEAD:-300}" limit="$1"
  if [[ -n "$limit" ]] && ((limit / 5 < lead)); then lead=$((limit / 5)); fi
  echo "$lead"
}

# Forward to the job's steps (the trainer checkpoints on SIGUSR1/SIGTERM and exits 0).
igpt_forward() {
  if [[ -n "$IGPT_CHILD" ]]; then
    # scancel without --batch signals every job step but not this shell
    scancel --signal=USR1 "$SLURM_JOB_ID" 2>/dev/null || kill -USR1 "$IGPT_CHILD" 2>/dev/null || true
  fi
}

igpt_on_signal() {
  local sig="$1" cause preempt delay
  case "$sig" in
    USR1)
      # Before the adapted lead, this is Slurm's fixed 300 s warning on a short --time: hold it
      # until the lead, so that the job trains before it saves (see igpt_signal_lead).
      if [[ -n "$IGPT_LIMIT" ]] && ((IGPT_LEAD < ${SIGNAL_LEAD:-300} && SECONDS < IGPT_LIMIT - IGPT_LEAD)); then
        if [[ -z "$IGPT_TIMER" ]]; then
          delay=$((IGPT_LIMIT - IGPT_LEAD - SECONDS))
          echo "$(date -Is) caught SIGUSR1 after ${SECONDS} s of a ${IGPT_LIMIT} s time limit: a ${SIGNAL_LEAD:-300} s lead leaves no time to train; passing it on in ${delay} s, ${IGPT_LEAD} s before the limit"
          # its own stdout: a pending timer must not keep the job's log (or a test's pipe) open
          (sleep "$delay" && kill -USR1 "$$") >/dev/null 2>&1 &
          IGPT_TIMER=$!
        fi
        return 0
      fi
      cause="SIGUSR1 (the time-limit warning, scancel --signal=USR1 --batch, or a preemption with send_user_signal): save and requeue" ;;
    USR2)
      cause="SIGUSR2 (scancel --signal=USR2 --batch): save and stop" ;;
    TERM)
      igpt_forward  # first: the trainer's KillWait runs while we ask slurmctld below
      # Slurm sends SIGTERM for a scancel, a scontrol requeue, a preemption and the end of the
      # time limit alike; only a preemption sets PreemptTime. After scontrol requeue Slurm
      # requeues the job itself, a cancelled job must stay cancelled: neither needs us.
      preempt="$(igpt_job_field PreemptTime)"
      if [[ -n "$preempt" && "$preempt" != None && "$preempt" != Unknown ]]; then
        sig=PREEMPT
        cause="SIGTERM of a preemption (PreemptTime=$preempt): save and requeue"
      else
        cause="SIGTERM without a preemption (scancel, scontrol requeue or the end of the time limit): save and stop; Slurm itself requeues a scontrol requeue"
      fi ;;
  esac
  # the first signal decides: a SIGTERM at the limit while a time-limit save is under way must
  # not turn the requeue into a stop
  if [[ -z "$IGPT_SIGNALLED" ]]; then
    IGPT_SIGNALLED="$sig" IGPT_CAUSE="$cause"
  fi
  echo "$(date -Is) caught $cause: asking the trainer to save a checkpoint and exit"
  if [[ "$sig" == USR1 || "$sig" == USR2 ]]; then igpt_forward; fi
}

igpt_trap_signals() {
  IGPT_LIMIT="$(igpt_seconds "$(igpt_job_field TimeLimit)")"
  IGPT_LEAD="$(igpt_signal_lead "$IGPT_LIMIT")"
  trap 'igpt_on_signal USR1' USR1
  trap 'igpt_on_signal USR2' USR2
  trap 'igpt_on_signal TERM' TERM
  if [[ -n "$IGPT_LIMIT" ]] && ((IGPT_LEAD < ${SIGNAL_LEAD:-300})); then
    echo "time limit ${IGPT_LIMIT} s: the time-limit warning is passed on ${IGPT_LEAD} s before the end (SIGNAL_LEAD=${SIGNAL_LEAD:-300} is more than a fifth of it)"
  fi
  if igpt_dry; then
    local j="${SLURM_JOB_ID:-JOBID}"
    echo "on SIGUSR1 (${IGPT_LEAD} s before the time limit, or scancel --signal=USR1 --batch $j), or SIGTERM of a preemption:"
    echo "  + scancel --signal=USR1 $j   (trainer saves to ${SAVE:-SAVE} and exits)"
    echo "  + scontrol requeue $j   (if it exited 0 and a restart advanced ${SAVE:-SAVE}/latest at least every ${REQUEUE_MAX_NO_PROGRESS:-3} restarts; the requeued job resumes with --load ${SAVE:-SAVE})"
    echo "on SIGUSR2 (scancel --signal=USR2 --batch $j), or SIGTERM otherwise (scancel $j, scontrol requeue $j, the end of the time limit):"
    echo "  + scancel --signal=USR1 $j   (trainer saves and exits; no requeue from this script)"
  fi
}

# Wait for the launched step; a trap interrupts `wait`, so wait again until it has really exited.
# After a job signal, igpt_requeue decides (REQUEUE=0 turns requeueing off).
igpt_wait() {
  local rc=0 again
  while true; do
    rc=0
    wait "$IGPT_CHILD" || rc=$?
    if kill -0 "$IGPT_CHILD" 2>/dev/null; then continue; fi
    # a status > 128 may be the trap interrupting `wait` just before the child ended: bash keeps
    # the child's own status, so ask once more (127: it has none, keep what we have)
    if ((rc > 128)); then
      again=0
      wait "$IGPT_CHILD" || again=$?
      if ((again != 127)); then rc="$again"; fi
    fi
    break
  done
  IGPT_CHILD=""
  if [[ -n "$IGPT_TIMER" ]]; then
    kill "$IGPT_TIMER" 2>/dev/null || true
    IGPT_TIMER=""
  fi
  if [[ -z "$IGPT_SIGNALLED" ]]; then return "$rc"; fi
  echo "$(date -Is) trainer exited with $rc after $IGPT_CAUSE"
  igpt_requeue "$rc"
}

# Requeue after a job signal, or say why not. Returns the job's exit status. Never a loop: a
# failed trainer is not requeued, nor a job whose restarts stop advancing $SAVE/latest.
igpt_requeue() {
  local rc="$1" latest n=0 max="${REQUEUE_MAX_NO_PROGRESS:-3}"
  local state="${SAVE:-.}/requeues_without_progress"
  case "$IGPT_SIGNALLED" in USR1 | PREEMPT) ;; *)
    echo "not requeueing: SIG$IGPT_SIGNALLED means stop (requeue with scancel --signal=USR1 --batch $SLURM_JOB_ID)"
    return "$rc" ;;
  esac
  if [[ "${REQUEUE:-1}" != 1 ]]; then
    echo "not requeueing: REQUEUE=${REQUEUE}; resubmit to resume from $SAVE"
    return "$rc"
  fi
  if [[ "$rc" != 0 ]]; then
    echo "not requeueing: the trainer exited with $rc, and a requeued job would fail the same way; fix the cause (the log above) and resubmit" >&2
    return "$rc"
  fi
  latest="$(cat "$SAVE/latest" 2>/dev/null || true)"
  if [[ -z "$latest" || "$latest" == "$IGPT_LATEST0" ]]; then
    n=$(($(cat "$state" 2>/dev/null || echo 0) + 1))
  fi
  if ((n > max)); then
    rm -f "$state"  # a resubmitted job starts counting afresh
    echo "error: not requeueing: $n restarts in a row without a new checkpoint ($SAVE/latest: ${latest:-none}), more than REQUEUE_MAX_NO_PROGRESS=$max; the job does not get to train before its signal: raise --time, or lower the lead with SIGNAL_LEAD=<s> and sbatch --signal=B:USR1@<s>" >&2
    return 1
  fi
  if ((n == 0)); then rm -f "$state"; else echo "$n" >"$state"; fi
  echo "$(date -Is) requeueing job $SLURM_JOB_ID (restart $((${SLURM_RESTART_COUNT:-0} + 1)); checkpoint ${latest:-none}; restarts without a new one: $n of $max)"
  if ! scontrol requeue "$SLURM_JOB_ID"; then
    echo "error: scontrol requeue $SLURM_JOB_ID failed (a job needs sbatch --requeue, and the cluster JobRequeue=1): resubmit to resume from $SAVE" >&2
    return 1
  fi
  return 0
}

# An array task trains a run of its own: tasks sharing SAVE would overwrite each other's
# checkpoints and resume from each other's. "{task}" in SAVE puts the task id there, otherwise
# it becomes a suffix (runs/igpt-s -> runs/igpt-s-3); a requeued task keeps its id, so its SAVE.
igpt_array_save() {
  if [[ -z "${SLURM_ARRAY_TASK_ID:-}" ]]; then
    [[ "$SAVE" != *"{task}"* ]] ||
      igpt_die "SAVE=$SAVE has {task} but this is no array job (SLURM_ARRAY_TASK_ID unset): submit with sbatch --array=0-3, or drop {task} from SAVE"
    return 0
  fi
  if [[ "$SAVE" == *"{task}"* ]]; then
    SAVE="${SAVE//\{task\}/$SLURM_ARRAY_TASK_ID}"
  else
    SAVE="${SAVE%/}-$SLURM_ARRAY_TASK_ID"
  fi
  export SAVE
  echo "array task $SLURM_ARRAY_TASK_ID of job ${SLURM_ARRAY_JOB_ID:-?}: SAVE=$SAVE"
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
  igpt_array_save
  local tp="${TP:-1}" pp="${PP:-1}"
  local config="${DS_CONFIG:-$(igpt_default_ds_config "$MODEL" "$pp")}"
  if [[ ! -f "$config" && -z "${DS_CONFIG:-}" ]]; then
    igpt_die "DS_CONFIG is unset and MODEL=$MODEL has no preset config $config: set DS_CONFIG=ds_configs/<name>.json (one of ds_configs/, e.g. DS_CONFIG=ds_configs/zero1_fp32.json)"
  elif [[ ! -f "$config" ]]; then
    igpt_die "DS_CONFIG=$config not found (relative to $IGPT_ROOT): set DS_CONFIG to an existing file, e.g. DS_CONFIG=ds_configs/zero1_fp32.json"
  fi
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
  # the presets default TRAIN_STEPS to the paper's; --train-epochs among the extra arguments replaces it
  # (the trainer would let --train-steps win)
  local a epochs=""
  for a in "$@"; do if [[ "$a" == --train-epochs* ]]; then epochs=1; fi; done
  if [[ -n "${TRAIN_STEPS:-}" && -z "$epochs" ]]; then args+=(--train-steps "$TRAIN_STEPS"); fi
  if [[ -n "${WARMUP_STEPS:-}" ]]; then args+=(--warmup-steps "$WARMUP_STEPS"); fi
  if [[ "${ACTIVATION_CHECKPOINTING:-0}" == 1 ]]; then args+=(--activation-checkpointing); fi
  # resume: DeepSpeed writes SAVE/latest naming the newest checkpoint tag
  if [[ -f "$SAVE/latest" ]]; then
    echo "resuming from $SAVE (latest: $(cat "$SAVE/latest"))"
    args+=(--load "$SAVE")
  fi
  args+=("$@")
  IGPT_LATEST0="$(cat "$SAVE/latest" 2>/dev/null || true)"
  if ! igpt_dry; then mkdir -p "$SAVE"; fi
  igpt_trap_signals
  IGPT_TP="$tp" IGPT_PP="$pp" igpt_launch "${args[@]}"
}
