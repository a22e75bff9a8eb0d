#!/usr/bin/env bash
# Two SLURM nodes on this one machine, and the cluster launchers trained across them: a
# demonstration and benchmark (issue 17), not part of the CI suite (it needs root with CAP_NET_ADMIN
# and takes longer than CI's budget allows: see docs/benchmarks.md, "Two SLURM nodes on one
# machine"). Needs root on Linux.
#
#   sudo bash benchmarks/bench_two_nodes.sh [--launcher sbatch|submitit|both] [--interrupt requeue|signal]
#                                           [STATE_DIR]
#
# Node "mlipa" is this machine's network namespace; node "mlipb" is a network namespace that the
# script creates (`ip netns`), joined to it by a veth pair named the same on both sides
# (10.213.77.1 <-> 10.213.77.2), so each node has its own address and its own slurmd
# (`slurmd -N <node>`). Both nodes share the file system, munge and the CPUs. The packages, munge,
# slurm.conf, the daemons and their stop are tools/slurm_local.sh's (sourced). Then, for each
# launcher (default both, sbatch first):
#   1. sbatch: `sbatch --nodes 2 --ntasks-per-node 1 slurm/pretrain.sh`; submitit:
#      `tools/submit.py --cluster slurm --nodes 2 --tasks-per-node 1` (tiny model, ZeRO-2, gloo over
#      the veth: GLOO_SOCKET_IFNAME names the same interface on both nodes);
#   2. once the first checkpoint exists, `scontrol requeue` (--interrupt requeue, the default), or
#      (--interrupt signal) the launcher's own time-limit signal: USR1 to slurm/pretrain.sh's batch
#      shell (`scancel --batch --signal=USR1`; it forwards USR1 to train.py and requeues), USR2 to
#      submitit's tasks (`scancel --signal=USR2`; rank 0's checkpoint() stops training and requeues);
#   3. the restarted job resumes from it on both nodes and finishes; the script checks the step
#      count, samples_seen, the world size, that each start ran one rank on each node, that both
#      ranks resumed from the same checkpoint, one restart, and the rendezvous at mlipa's address.
# The jobs run with the virtualenv first on PATH and a private TORCH_EXTENSIONS_DIR, where
# DeepSpeed's CPU comm op is built once before them (op_build_s; see the comment there).
# Prints one JSON line with the timings (one object per launcher). Stops its daemons and removes
# the namespace on exit (munged, if it started it, is left running as tools/slurm_local.sh does).
# Environment: MLIP_SLURM_PORT (slurmctld port, default: a free one; the slurmds use it + 1),
# MLIP_SLURM_CPUS (CPUs per node, default 1), MLIP_TWO_NODES_STEPS (optimizer steps, default 48),
# MLIP_TWO_NODES_SAVE_EVERY (default 8).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
# shellcheck source=../tools/slurm_local.sh
. "$ROOT/tools/slurm_local.sh"
log() { echo "[two_nodes $(date +%H:%M:%S)] $*" >&2; }

LAUNCHERS=(sbatch submitit)
INTERRUPT=requeue
STATE=""
while [ $# -gt 0 ]; do
  case "$1" in
    --launcher|--launcher=*)
      if [ "$1" = --launcher ]; then value="${2:-}"; shift; else value="${1#*=}"; fi
      case "$value" in
        sbatch|submitit) LAUNCHERS=("$value") ;;
        both) LAUNCHERS=(sbatch submitit) ;;
        *) die "--launcher takes sbatch, submitit or both, not '$value'" 2 ;;
      esac ;;
    --interrupt|--interrupt=*)
      if [ "$1" = --interrupt ]; then INTERRUPT="${2:-}"; shift; else INTERRUPT="${1#*=}"; fi
      case "$INTERRUPT" in requeue|signal) ;; *) die "--interrupt takes requeue or signal, not '$INTERRUPT'" 2 ;; esac ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 0 ;;
    -*) die "unknown option $1 (see --help)" 2 ;;
    *) STATE="$1" ;;
  esac
  shift
done
[ "$(id -u)" -eq 0 ] || die "needs root (network namespace, munge and SLURM daemons)"

# Nothing of an enclosing job or run (SLURM_*, submitit's and torch's variables, the launchers'
# MLIP_* settings) may leak into the jobs: the launchers read them.
while read -r name; do unset "$name"; done < <(compgen -e | grep -E \
  '^(SLURM_|SBATCH_|SRUN_|SUBMITIT_|RANK$|LOCAL_RANK$|WORLD_SIZE$|LOCAL_WORLD_SIZE$|MASTER_ADDR$|MASTER_PORT$|MLIP_)' \
  | grep -vE '^MLIP_(SLURM|TWO_NODES)_' || true)

STATE="${STATE:-$(mktemp -d /tmp/mlip-two-nodes.XXXXXX)}"
NS="mlipb$$"
IF="m2n$$"
IF="${IF:0:15}"
NET=10.213.77
STEPS="${MLIP_TWO_NODES_STEPS:-48}"
SAVE_EVERY="${MLIP_TWO_NODES_SAVE_EVERY:-8}"
CPUS="${MLIP_SLURM_CPUS:-1}"
TINY="--batch-size 4 --workers 0 --log-every 4 --warmup-steps 2 --samples-per-epoch $((STEPS * 8))"
PY="$ROOT/.venv/bin/python"
[ -x "$PY" ] || PY=python3

free_port() { "$PY" -c 'import socket
for _ in range(50):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close()
    if p < 60000:
        t = socket.socket()
        try:
            t.bind(("127.0.0.1", p + 1)); print(p); break
        except OSError: pass
        finally: t.close()'; }
export MLIP_SLURM_PORT="${MLIP_SLURM_PORT:-$(free_port)}" MLIP_SLURM_MAXTIME=60
slurm_local_init "$STATE"
STATE="$STATE_DIR"
export SLURM_CONF="$CONF"

cleanup() {
  set +e
  slurm_stop
  ip netns pids "$NS" 2>/dev/null | while read -r pid; do kill -KILL "$pid" 2>/dev/null; done
  ip netns del "$NS" 2>/dev/null   # removes the veth pair with it
  ip link del "$IF" 2>/dev/null
}
trap cleanup EXIT
trap 'exit 143' TERM INT

install_packages
start_munge

T0=$SECONDS
# Node B's network: a namespace and a veth pair, the same interface name on both sides.
ip netns add "$NS"
ip link add "$IF" type veth peer name "$IF" netns "$NS"
ip addr add "$NET.1/24" dev "$IF"
ip link set "$IF" up
ip netns exec "$NS" ip addr add "$NET.2/24" dev "$IF"
ip netns exec "$NS" ip link set "$IF" up
ip netns exec "$NS" ip link set lo up

write_conf mlip-two "$NET.1" "mlipa:$NET.1:$CPUS:2000" "mlipb:$NET.2:$CPUS:2000"
start_slurmctld
start_slurmd mlipa
# nsenter, not `ip netns exec`: that one also remounts /sys, where slurmd needs the cgroup tree.
start_slurmd mlipb nsenter --net="/run/netns/$NS"
wait_nodes_up
T_CLUSTER=$((SECONDS - T0))
log "cluster up in ${T_CLUSTER}s: $(sinfo -h -N -o '%N(%T)' | tr '\n' ' ')"

# Tiny data and job: 2 ranks x batch 4, $STEPS steps, a checkpoint every $SAVE_EVERY.
"$PY" "$ROOT/tools/make_shards.py" synthetic --out "$STATE/shards" --num-samples 192 --image-size 64 \
  --samples-per-shard 48 >/dev/null 2>&1 || die "make_shards failed"

# DeepSpeed's CPU accelerator JIT-builds its shared-memory comm op (TORCH_EXTENSIONS_DIR, with the
# first `ninja` on PATH) at every start, and waits for a build another process is running. The
# virtualenv's ninja and a system ninja hash commands differently and rebuild each other's output
# ("command line changed"): slurm/pretrain.sh activates the virtualenv, other runs on the machine
# may not. So the jobs get a private extensions folder and the virtualenv first on PATH, and the op
# is built once here, timed apart (op_build_s), not inside the first start.
export PATH="$ROOT/.venv/bin:$PATH" TORCH_EXTENSIONS_DIR="$STATE/torch_extensions"
T_OP=$SECONDS
if ! nvidia-smi -L >/dev/null 2>&1; then
  DS_ACCELERATOR=cpu "$PY" -c 'from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder
ShareMemCommBuilder().load(verbose=False)' >"$STATE/op_build.log" 2>&1 || die "building DeepSpeed's shm comm op failed (see $STATE/op_build.log)"
fi
T_OP=$((SECONDS - T_OP))
log "DeepSpeed's shm comm op built in ${T_OP}s"

JOB="" LOGS=()
job_state() { scontrol show job -o "$JOB" 2>/dev/null | tr ' ' '\n' | sed -n "s/^$1=//p"; }
tails() { local f; for f in "${LOGS[@]}"; do [ -s "$f" ] && { echo "--- $f"; grep -v 'it/s]' "$f" | tail -20; }; done >&2; }
wait_for() {  # seconds description command...
  local limit=$1 what=$2; shift 2
  local t=$SECONDS
  until "$@"; do
    case "$(job_state JobState)" in FAILED|CANCELLED|TIMEOUT|NODE_FAIL|COMPLETED)
      sleep 2  # files may trail the job's end
      "$@" && return 0
      tails; die "job $JOB ended ($(job_state JobState)) before: $what";;
    esac
    [ $((SECONDS - t)) -lt "$limit" ] || { tails; die "timed out waiting for: $what"; }
    sleep 0.5
  done
}

submit_sbatch() {  # -> JOB, LOGS
  JOB="$(cd "$ROOT" && env MLIP_SHARDS="$STATE/shards" MLIP_OUT="$OUT" MLIP_SAVE_EVERY="$SAVE_EVERY" \
    MLIP_VENV="$ROOT/.venv" GLOO_SOCKET_IFNAME="$IF" OMP_NUM_THREADS=1 MLIP_ARGS="$TINY" \
    sbatch --parsable --nodes 2 --ntasks-per-node 1 --cpus-per-task "$CPUS" --time 30 \
    --output="$STATE/job-%j.out" --error="$STATE/job-%j.err" slurm/pretrain.sh)"
  JOB="${JOB%%;*}"
  LOGS=("$STATE/job-$JOB.err" "$STATE/job-$JOB.out")
}

submit_submitit() {  # -> JOB, LOGS (rank 0's .err/.out, rank 1's)
  local printed
  # shellcheck disable=SC2086
  printed="$(cd "$ROOT" && env GLOO_SOCKET_IFNAME="$IF" OMP_NUM_THREADS=1 "$PY" tools/submit.py --cluster slurm \
    --shards "$STATE/shards" --out "$OUT" --save-every "$SAVE_EVERY" --nodes 2 --tasks-per-node 1 \
    --cpus-per-task "$CPUS" --timeout-min 30 --stop-grace-s 60 -- $TINY)" || die "tools/submit.py failed: $printed"
  JOB="$(sed -n 's/^submitted job \([0-9]*\) .*/\1/p' <<<"$printed")"
  [ -n "$JOB" ] || die "no job id in: $printed"
  LOGS=("$OUT/submitit/${JOB}_0_log.err" "$OUT/submitit/${JOB}_0_log.out"
        "$OUT/submitit/${JOB}_1_log.err" "$OUT/submitit/${JOB}_1_log.out")
}

latest() { sed 's/^step0*//' "$OUT/checkpoints/latest" 2>/dev/null || echo -1; }
has_checkpoint() { [ "$(latest)" -ge "$SAVE_EVERY" ]; }
# Both ranks have logged their resume (the first start logs "no checkpoint in ...").
resumed() { [ "$(cat "${LOGS[@]}" 2>/dev/null | grep -c 'resumed from')" -ge 2 ]; }
completed() { [ "$(job_state JobState)" = COMPLETED ]; }

bench_launcher() {  # sbatch|submitit: submit, requeue after the first checkpoint, check -> JSON on stdout
  local launcher=$1 job_t0 t_first requeued_at req_t0 t_resume t_total
  OUT="$STATE/$launcher-out"
  job_t0=$SECONDS
  "submit_$launcher"
  log "$launcher: submitted job $JOB"
  wait_for 300 "the first checkpoint" has_checkpoint
  t_first=$((SECONDS - job_t0))
  requeued_at="$(latest)"
  if [ "$INTERRUPT" = requeue ]; then
    log "$launcher: checkpoint at step $requeued_at after ${t_first}s: scontrol requeue $JOB"
    scontrol requeue "$JOB"
  elif [ "$launcher" = sbatch ]; then
    log "$launcher: checkpoint at step $requeued_at after ${t_first}s: USR1 to the batch shell of $JOB"
    scancel --batch --signal=USR1 "$JOB"
  else
    log "$launcher: checkpoint at step $requeued_at after ${t_first}s: USR2 to the tasks of $JOB"
    scancel --signal=USR2 "$JOB"
  fi
  req_t0=$SECONDS
  wait_for 300 "the requeued job to resume on both ranks" resumed
  t_resume=$((SECONDS - req_t0))
  wait_for 600 "the job to complete" completed
  t_total=$((SECONDS - job_t0))
  "$PY" - "$launcher" "$INTERRUPT" "$JOB" "$OUT" "$STEPS" "$(job_state Restarts)" "$NET.1" \
    "$t_first" "$requeued_at" "$t_resume" "$t_total" "${LOGS[@]}" <<'EOF' || { tails; die "$launcher: checks failed"; }
import json, re, sys
from pathlib import Path
launcher, interrupt, job, out, steps, restarts, master_addr = sys.argv[1:8]
out, steps = Path(out), int(steps)
t_first, requeued_at, t_resume, t_total = map(int, sys.argv[8:12])
logs = sys.argv[12:]
texts = [Path(p).read_text(errors="replace") if Path(p).exists() else "" for p in logs]
text = "\n".join(texts)
summary = json.loads((out / "summary.json").read_text())
assert summary["step"] == steps and summary["world_size"] == 2, summary
assert summary["samples_seen"] == steps * 8, summary
assert restarts == "1", f"{restarts} restarts"
if launcher == "sbatch":  # slurm/pretrain.sh: "[pretrain.sh ... restart R] 2 tasks on NODES, ..."
    starts = re.findall(r"restart (\d+)\] 2 tasks on (\S+),", text)
    assert [r for r, _ in starts] == ["0", "1"], f"starts: {starts}"
    assert all(n in ("mlipa,mlipb", "mlip[a-b]") for _, n in starts), f"not on both nodes: {starts}"
    resumed = [int(s) for s in re.findall(r"resumed from \S*step(\d+)", text)]
else:  # tools/submit.py: "[submit.py] rank R/2 on node N, restart K, ..." in each task's log
    starts = {}
    for rank, node, restart in re.findall(r"\[submit.py\] rank (\d+)/2 on node (\S+), restart (\d+)", text):
        starts.setdefault(restart, {})[rank] = node
    assert sorted(starts) == ["0", "1"], f"starts: {starts}"
    assert all(sorted(s) == ["0", "1"] and sorted(s.values()) == ["mlipa", "mlipb"] for s in starts.values()), \
        f"not one rank on each node: {starts}"
    # each rank's training log (rank 0: logs[0], rank 1: logs[2]) resumed once
    resumed = [int(s) for t in texts[0::2] for s in re.findall(r"resumed from \S*step(\d+)", t)]
    import submitit
    results = submitit.SlurmJob(out / "submitit", job, tasks=(0, 1)).results()
    assert [r["step"] for r in results] == [steps, steps], results
assert len(resumed) == 2 and resumed[0] == resumed[1] >= 1, f"both ranks resume the same checkpoint: {resumed}"
if interrupt == "signal":  # train.py stopped on the launcher's forwarded SIGUSR1 and saved, then the requeue
    assert "stopped by SIGUSR1" in text, "train.py did not stop on SIGUSR1"
    assert ("requeueing: the next start" if launcher == "sbatch" else "Requeued job") in text, "no requeue"
masters = set(re.findall(r"master ([0-9.]+):", text))
assert masters == {master_addr}, f"rendezvous at {masters}, not at mlipa's NodeAddr {master_addr}"
print(json.dumps({"submit_to_first_checkpoint_s": t_first, "requeued_at_step": requeued_at,
                  "resumed_from_step": resumed[0], "requeue_to_resume_s": t_resume,
                  "submit_to_completed_s": t_total, "restarts": int(restarts), "master": master_addr}))
EOF
  log "$launcher: ok (${t_total}s)"
}

RESULTS=""
for launcher in "${LAUNCHERS[@]}"; do
  RESULTS+="${RESULTS:+, }\"$launcher\": $(bench_launcher "$launcher")"
done
echo "{\"nodes\": 2, \"tasks\": 2, \"steps\": $STEPS, \"save_every\": $SAVE_EVERY, \"interrupt\": \"$INTERRUPT\"," \
     "\"cluster_start_s\": $T_CLUSTER, \"op_build_s\": $T_OP, $RESULTS}"
log "ok: state and logs in $STATE"
