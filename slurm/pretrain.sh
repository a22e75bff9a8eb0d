#!/usr/bin/env bash
# MLIP pretraining as a SLURM batch job: one training process per task (per GPU, or per CPU rank on
# CPU-only nodes), started by srun with its rank taken from SLURM's environment.
#
#   MLIP_SHARDS=data/train MLIP_OUT=runs/clip MLIP_EPOCHS=5 sbatch slurm/pretrain.sh
#   MLIP_SHARDS=data/train MLIP_OUT=runs/clip sbatch --nodes 2 --ntasks-per-node 4 --gpus-per-node 4 \
#       --cpus-per-task 8 --time 12:00:00 --partition gpu slurm/pretrain.sh
#
# Submit from the repository root (or set MLIP_ROOT). sbatch's own flags override the #SBATCH lines
# below. Settings (environment variables, exported to the job by sbatch):
#   MLIP_SHARDS     training shard folder / brace pattern / glob (required)
#   MLIP_OUT        run folder (default runs/slurm-$SLURM_JOB_ID); keep it fixed across requeues
#   MLIP_DS_CONFIG  DeepSpeed JSON (default ds_configs/zero2.json)
#   MLIP_MODEL      --model (default: train.py's, tiny)
#   MLIP_EPOCHS     --epochs (default: train.py's, 1)
#   MLIP_SAVE_EVERY --save-every N optimizer steps (default 100): what a requeued job resumes from
#   MLIP_ARGS       extra train.py flags, word-split, passed last (e.g. "--batch-size 64 --lr 1e-3")
#   MLIP_VENV       virtualenv to activate (default $MLIP_ROOT/.venv if it exists)
#   MLIP_ROOT       repository root (default: the submit directory)
#   MLIP_MASTER_PORT  rendezvous port (default 20000 + job id mod 20000)
#   MLIP_STOP_SIGNAL  signal forwarded to the training tasks when the time limit nears (default
#                   USR1; "" forwards none); MLIP_STOP_GRACE seconds to wait for them
#                   (default 150; keep it below the --signal lead time)
#   MLIP_MAX_REQUEUES stop requeueing after this many restarts (default 20)
# Training always runs with --resume latest: the first start begins from scratch, a requeued start
# continues from <MLIP_OUT>/checkpoints/latest.
# Near the time limit SLURM sends USR1 to this script (--signal=B:USR1@180); the script forwards
# MLIP_STOP_SIGNAL to the tasks, waits up to MLIP_STOP_GRACE s, then `scontrol requeue`s the job,
# which restarts it with the same job id (and output file, opened in append mode).
#SBATCH --job-name=mlip-pretrain
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=2
#SBATCH --cpus-per-task=1
#SBATCH --time=24:00:00
#SBATCH --output=slurm-%x-%j.out
#SBATCH --error=slurm-%x-%j.err
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@180
set -euo pipefail

log() { echo "[pretrain.sh $(date +%H:%M:%S) job ${SLURM_JOB_ID:-?} restart ${SLURM_RESTART_COUNT:-0}] $*" >&2; }

if [ -z "${SLURM_JOB_ID:-}" ]; then
  echo "slurm/pretrain.sh is a batch script: submit it with sbatch (see its header)" >&2
  exit 2
fi

ROOT="${MLIP_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}"
if [ ! -f "$ROOT/mlip_ds/train.py" ]; then
  log "error: $ROOT is not the mlip-ds repository: submit from its root or set MLIP_ROOT"
  exit 2
fi
cd "$ROOT"
if [ -z "${MLIP_SHARDS:-}" ]; then
  log "error: set MLIP_SHARDS to the training shards (a folder from tools/make_shards.py)"
  exit 2
fi

# Every node must run the same number of tasks: a task's local world is NTASKS / NNODES.
NNODES="${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}"
NTASKS="${SLURM_NTASKS:-1}"
PER_NODE="${SLURM_NTASKS_PER_NODE:-}"
if { [[ "$PER_NODE" =~ ^[0-9]+$ ]] && [ "$((NNODES * PER_NODE))" -ne "$NTASKS" ]; } \
   || [ "$((NTASKS % NNODES))" -ne 0 ] || [[ "${SLURM_TASKS_PER_NODE:-}" == *,* ]]; then
  log "error: $NTASKS tasks do not match $NNODES nodes (tasks per node: ${SLURM_TASKS_PER_NODE:-${PER_NODE:-?}}," \
      "ntasks-per-node: ${PER_NODE:-unset}): every node must run the same number of tasks;" \
      "submit with --nodes N --ntasks-per-node K and no --ntasks (NTASKS = N x K)"
  exit 2
fi

VENV="${MLIP_VENV:-}"
[ -z "$VENV" ] && [ -x "$ROOT/.venv/bin/python" ] && VENV="$ROOT/.venv"
if [ -n "$VENV" ]; then
  # shellcheck disable=SC1091
  . "$VENV/bin/activate"
fi

# Ranks come from SLURM; the rendezvous is the first node of the allocation, at the address SLURM
# itself reaches it by (its NodeAddr; the node name where NodeAddr is not set or not shown).
MASTER_NODE="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -1)"
MASTER_ADDR="$(scontrol show node -o "$MASTER_NODE" 2>/dev/null | sed -n 's/.* NodeAddr=\([^ ]*\).*/\1/p' || true)"
MASTER_ADDR="${MASTER_ADDR:-$MASTER_NODE}"
MASTER_PORT="${MLIP_MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
CPUS_PER_TASK="${SLURM_CPUS_PER_TASK:-1}"
export MASTER_ADDR MASTER_PORT
export OMP_NUM_THREADS="$CPUS_PER_TASK" PYTHONUNBUFFERED=1
if ! nvidia-smi -L >/dev/null 2>&1; then
  export DS_ACCELERATOR=cpu  # no GPU on this node: DeepSpeed's CPU accelerator (gloo)
fi

OUT="${MLIP_OUT:-runs/slurm-$SLURM_JOB_ID}"
ARGS=(--deepspeed_config "${MLIP_DS_CONFIG:-ds_configs/zero2.json}" --train-shards "$MLIP_SHARDS"
      --out-dir "$OUT" --save-every "${MLIP_SAVE_EVERY:-100}")
[ -n "${MLIP_MODEL:-}" ] && ARGS+=(--model "$MLIP_MODEL")
[ -n "${MLIP_EPOCHS:-}" ] && ARGS+=(--epochs "$MLIP_EPOCHS")
if [ -n "${MLIP_ARGS:-}" ]; then
  set -f  # split on spaces, no globbing
  # shellcheck disable=SC2206
  ARGS+=($MLIP_ARGS)
  set +f
fi
ARGS+=(--resume latest)

STOP_SIGNAL="${MLIP_STOP_SIGNAL-USR1}"
STOP_GRACE="${MLIP_STOP_GRACE:-150}"
MAX_REQUEUES="${MLIP_MAX_REQUEUES:-20}"
SRUN_PID=""
START_TS="$(date +%s)"

on_time_limit() {
  set +e
  log "time limit near (USR1)"
  if [ -n "$STOP_SIGNAL" ] && kill -0 "$SRUN_PID" 2>/dev/null; then
    # srun forwards the signal to every task; a train.py that handles it saves and exits.
    log "sending SIG$STOP_SIGNAL to the training tasks, waiting up to ${STOP_GRACE}s"
    kill -s "$STOP_SIGNAL" "$SRUN_PID"
    for _ in $(seq "$STOP_GRACE"); do kill -0 "$SRUN_PID" 2>/dev/null || break; sleep 1; done
  fi
  if ! kill -0 "$SRUN_PID" 2>/dev/null; then
    wait "$SRUN_PID"
    local rc=$?
    if [ "$rc" -eq 0 ] && [ -f "$OUT/summary.json" ] && [ "$(stat -c %Y "$OUT/summary.json")" -ge "$START_TS" ]; then
      log "training had already finished: not requeueing"
      exit 0
    fi
  fi
  if [ "${SLURM_RESTART_COUNT:-0}" -ge "$MAX_REQUEUES" ]; then
    log "already restarted ${SLURM_RESTART_COUNT:-0} times (MLIP_MAX_REQUEUES=$MAX_REQUEUES): not requeueing"
    exit 1
  fi
  log "requeueing: the next start resumes from $OUT/checkpoints/latest"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
}
on_term() {
  # scancel, `scontrol requeue` or preemption: SLURM signals the tasks itself (train.py saves a
  # checkpoint on SIGTERM and exits 75); wait for them, SLURM decides whether the job comes back.
  set +e
  log "SIGTERM: waiting for the training tasks to save and stop"
  wait "$SRUN_PID"
  exit 143
}
trap on_time_limit USR1
trap on_term TERM

log "$SLURM_NTASKS tasks on $SLURM_JOB_NODELIST, $CPUS_PER_TASK CPUs each, master $MASTER_ADDR:$MASTER_PORT," \
    "accelerator ${DS_ACCELERATOR:-cuda}, out $OUT"
# srun does not inherit --cpus-per-task from sbatch since SLURM 22.05: pass it on.
# Each task turns SLURM's ids into the variables torch.distributed / DeepSpeed read (DeepSpeed
# itself only looks for RANK... or MPI, not SLURM_*).
srun --kill-on-bad-exit=1 --cpus-per-task="$CPUS_PER_TASK" bash -c '
  export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS
  export LOCAL_WORLD_SIZE=$(( SLURM_NTASKS / SLURM_JOB_NUM_NODES ))
  exec python -u "$0" "$@"' mlip_ds/train.py "${ARGS[@]}" &
SRUN_PID=$!
# `wait` returns early when USR1 arrives (the trap then runs); otherwise it returns srun's status.
set +e
wait "$SRUN_PID"
rc=$?
set -e
log "training exited with status $rc"
exit "$rc"
