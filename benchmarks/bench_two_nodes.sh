#!/usr/bin/env bash
# Two SLURM nodes on this one machine, and slurm/pretrain.sh trained across them: a demonstration
# and benchmark (issue 17), not part of the CI suite (it takes longer than CI's budget allows: see
# docs/benchmarks.md, "Two SLURM nodes on one machine"). Needs root on Linux.
#
#   sudo bash benchmarks/bench_two_nodes.sh [STATE_DIR]
#
# Node "mlipa" is this machine's network namespace; node "mlipb" is a network namespace that the
# script creates (`ip netns`), joined to it by a veth pair named the same on both sides
# (10.213.77.1 <-> 10.213.77.2), so each node has its own address and its own slurmd
# (`slurmd -N <node>`). Both nodes share the file system, munge and the CPUs. Then:
#   1. `sbatch --nodes 2 --ntasks-per-node 1 slurm/pretrain.sh` (tiny model, ZeRO-2, gloo over the
#      veth: GLOO_SOCKET_IFNAME names the same interface on both nodes);
#   2. `scontrol requeue` once the first checkpoint exists;
#   3. the restarted job resumes from it on both nodes and finishes; the script checks the step
#      count, the world size, that a rank ran on each node, and that the resume happened.
# Prints one JSON line with the timings. Stops its daemons and removes the namespace on exit
# (munged, if it started it, is left running as tools/slurm_local.sh does).
# Environment: MLIP_SLURM_PORT (slurmctld port, default: a free one; the slurmds use it + 1),
# MLIP_TWO_NODES_STEPS (optimizer steps, default 48), MLIP_TWO_NODES_SAVE_EVERY (default 8).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
STATE="${1:-$(mktemp -d /tmp/mlip-two-nodes.XXXXXX)}"
mkdir -p "$STATE"/{state,log,run} "$STATE"/spool/slurmd-mlipa "$STATE"/spool/slurmd-mlipb
STATE="$(cd "$STATE" && pwd)"
NS="mlipb$$"
IF="m2n$$"
IF="${IF:0:15}"
NET=10.213.77
STEPS="${MLIP_TWO_NODES_STEPS:-48}"
SAVE_EVERY="${MLIP_TWO_NODES_SAVE_EVERY:-8}"
PY="$ROOT/.venv/bin/python"
[ -x "$PY" ] || PY=python3

log() { echo "[two_nodes $(date +%H:%M:%S)] $*" >&2; }
die() { log "error: $*"; exit 1; }
[ "$(id -u)" -eq 0 ] || die "needs root (network namespace, munge and SLURM daemons)"

free_port() { "$PY" -c 'import socket
for _ in range(50):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close()
    if p < 60000:
        t = socket.socket()
        try:
            t.bind(("127.0.0.1", p + 1)); print(p); break
        except OSError: pass
        finally: t.close()'; }
CTLD_PORT="${MLIP_SLURM_PORT:-$(free_port)}"
SLURMD_PORT=$((CTLD_PORT + 1))
CONF="$STATE/slurm.conf"
export SLURM_CONF="$CONF"

cleanup() {
  set +e
  if [ -s "$STATE/run/slurmctld.pid" ]; then
    jobs="$(timeout 10 squeue -h -o %i 2>/dev/null)"
    # shellcheck disable=SC2086
    [ -n "$jobs" ] && timeout 10 scancel $jobs && sleep 3
  fi
  for pidfile in "$STATE"/run/slurmd-*.pid "$STATE/run/slurmctld.pid"; do
    [ -s "$pidfile" ] || continue
    pid="$(cat "$pidfile")"
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null
    rm -f "$pidfile"
  done
  ip netns pids "$NS" 2>/dev/null | while read -r pid; do kill -KILL "$pid" 2>/dev/null; done
  ip netns del "$NS" 2>/dev/null   # removes the veth pair with it
  ip link del "$IF" 2>/dev/null
}
trap cleanup EXIT
trap 'exit 143' TERM INT

# Packages and munge: tools/slurm_local.sh's way (apt, a key, munged as user munge).
if ! command -v slurmd >/dev/null || ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  log "installing slurmctld slurmd slurm-client munge (apt)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurmctld slurmd slurm-client munge >"$STATE/apt.log" 2>&1 \
    || die "apt-get install failed (see $STATE/apt.log)"
fi
munge_ok() { timeout 5 munge -n 2>/dev/null | timeout 5 unmunge >/dev/null 2>&1; }
if ! munge_ok; then
  if [ ! -s /etc/munge/munge.key ]; then
    install -d -m 0700 -o munge -g munge /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
  fi
  install -d -m 0755 -o munge -g munge /run/munge
  install -d -m 0700 -o munge -g munge /var/lib/munge /var/log/munge
  runuser -u munge -- /usr/sbin/munged --force
  for _ in $(seq 50); do munge_ok && break; sleep 0.1; done
  munge_ok || die "munged did not start"
fi

T0=$SECONDS
# Node B's network: a namespace and a veth pair, the same interface name on both sides.
ip netns add "$NS"
ip link add "$IF" type veth peer name "$IF" netns "$NS"
ip addr add "$NET.1/24" dev "$IF"
ip link set "$IF" up
ip netns exec "$NS" ip addr add "$NET.2/24" dev "$IF"
ip netns exec "$NS" ip link set "$IF" up
ip netns exec "$NS" ip link set lo up

HOST="$(hostname -s 2>/dev/null || hostname)"
CPUS="${MLIP_SLURM_CPUS:-1}"
MEM=2000
cat >"$CONF" <<EOF
# Written by benchmarks/bench_two_nodes.sh: two nodes on $HOST (mlipb in network namespace $NS).
ClusterName=mlip-two
SlurmctldHost=$HOST($NET.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=5
# The daemons listen on every address of their namespace: node B reaches the controller at $NET.1.
StateSaveLocation=$STATE/state
SlurmdSpoolDir=$STATE/spool/slurmd-%n
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd-%n.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
MailProg=/bin/true
KillWait=10
MinJobAge=3600
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
NodeName=mlipa NodeAddr=$NET.1 NodeHostname=$HOST CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
NodeName=mlipb NodeAddr=$NET.2 NodeHostname=$HOST CPUs=$CPUS RealMemory=$MEM State=UNKNOWN
PartitionName=two Nodes=mlipa,mlipb Default=YES MaxTime=60 State=UP OverSubscribe=NO
EOF
slurmctld -f "$CONF" || die "slurmctld did not start (see $STATE/log/slurmctld.log)"
slurmd -f "$CONF" -N mlipa || die "slurmd mlipa did not start (see $STATE/log/slurmd-mlipa.log)"
# nsenter, not `ip netns exec`: that one also remounts /sys, where slurmd needs the cgroup tree.
nsenter --net="/run/netns/$NS" slurmd -f "$CONF" -N mlipb \
  || die "slurmd mlipb did not start (see $STATE/log/slurmd-mlipb.log)"
for _ in $(seq 200); do
  idle="$(timeout 10 sinfo -h -N -o '%N %T' 2>/dev/null | grep -c ' idle$' || true)"
  [ "$idle" = 2 ] && break
  sleep 0.3
done
[ "$idle" = 2 ] || { sinfo -N >&2; tail -5 "$STATE"/log/*.log >&2; die "the two nodes are not idle"; }
T_CLUSTER=$((SECONDS - T0))
log "cluster up in ${T_CLUSTER}s: $(sinfo -h -N -o '%N(%T)' | tr '\n' ' ')"

# Tiny data and job: 2 ranks x batch 4, $STEPS steps, a checkpoint every $SAVE_EVERY.
"$PY" "$ROOT/tools/make_shards.py" synthetic --out "$STATE/shards" --num-samples 192 --image-size 64 \
  --samples-per-shard 48 >/dev/null 2>&1 || die "make_shards failed"
OUT="$STATE/run-out"
JOB_T0=$SECONDS
JOB="$(cd "$ROOT" && env MLIP_SHARDS="$STATE/shards" MLIP_OUT="$OUT" MLIP_SAVE_EVERY="$SAVE_EVERY" \
  MLIP_VENV="$ROOT/.venv" GLOO_SOCKET_IFNAME="$IF" OMP_NUM_THREADS=1 \
  MLIP_ARGS="--batch-size 4 --workers 0 --log-every 4 --warmup-steps 2 --samples-per-epoch $((STEPS * 8))" \
  sbatch --parsable --nodes 2 --ntasks-per-node 1 --cpus-per-task 1 --time 30 \
  --output="$STATE/job-%j.out" --error="$STATE/job-%j.err" slurm/pretrain.sh)"
JOB="${JOB%%;*}"
ERR="$STATE/job-$JOB.err"
log "submitted job $JOB"

job_state() { scontrol show job -o "$JOB" 2>/dev/null | tr ' ' '\n' | sed -n "s/^$1=//p"; }
latest() { sed 's/^step0*//' "$OUT/checkpoints/latest" 2>/dev/null || echo -1; }
wait_for() {  # seconds description command...
  local limit=$1 what=$2; shift 2
  local t=$SECONDS
  until "$@"; do
    case "$(job_state JobState)" in FAILED|CANCELLED|TIMEOUT|NODE_FAIL|COMPLETED)
      "$@" && return 0
      tail -30 "$ERR" >&2; die "job $JOB ended ($(job_state JobState)) before: $what";;
    esac
    [ $((SECONDS - t)) -lt "$limit" ] || { tail -30 "$ERR" >&2; die "timed out waiting for: $what"; }
    sleep 0.5
  done
}
has_checkpoint() { [ "$(latest)" -ge "$SAVE_EVERY" ]; }
wait_for 300 "the first checkpoint" has_checkpoint
T_FIRST_CKPT=$((SECONDS - JOB_T0))
REQUEUED_AT="$(latest)"
log "checkpoint at step $REQUEUED_AT after ${T_FIRST_CKPT}s: scontrol requeue $JOB"
scontrol requeue "$JOB"
REQ_T0=$SECONDS
resumed() { grep -q "restart 1\] 2 tasks on" "$ERR" 2>/dev/null && grep -q "resumed from" "$ERR"; }
wait_for 300 "the requeued job to resume" resumed
T_RESUME=$((SECONDS - REQ_T0))
completed() { [ "$(job_state JobState)" = COMPLETED ]; }
wait_for 600 "the job to complete" completed
T_TOTAL=$((SECONDS - JOB_T0))

# Checks: steps, world size, one rank per node, the resume.
"$PY" - "$OUT" "$ERR" "$STEPS" <<'EOF' || die "checks failed (log: $ERR)"
import json, re, sys
out, err, steps = sys.argv[1], open(sys.argv[2], errors="replace").read(), int(sys.argv[3])
summary = json.load(open(f"{out}/summary.json"))
assert summary["step"] == steps and summary["world_size"] == 2, summary
assert summary["samples_seen"] == steps * 8, summary
starts = re.findall(r"2 tasks on (\S+),", err)
assert len(starts) == 2 and all(n in ("mlipa,mlipb", "mlip[a-b]") for n in starts), f"not on both nodes: {starts}"
resumed = [int(s) for s in re.findall(r"resumed from \S*step(\d+)", err)]
assert resumed and resumed[0] >= 1, "no resume after the requeue"
print(json.dumps({"resumed_from": resumed[0], "summary_step": summary["step"]}))
EOF
RESUMED_FROM="$(grep -o 'resumed from [^ ]*step[0-9]*' "$ERR" | head -1 | grep -o '[0-9]*$' | sed 's/^0*//')"
MASTER="$(grep -o 'master [^ ,]*' "$ERR" | head -1)"
echo "{\"nodes\": 2, \"tasks\": 2, \"steps\": $STEPS, \"save_every\": $SAVE_EVERY, \"cluster_start_s\": $T_CLUSTER," \
     "\"submit_to_first_checkpoint_s\": $T_FIRST_CKPT, \"requeued_at_step\": $REQUEUED_AT," \
     "\"resumed_from_step\": ${RESUMED_FROM:-null}, \"requeue_to_resume_s\": $T_RESUME," \
     "\"submit_to_completed_s\": $T_TOTAL, \"${MASTER%% *}\": \"${MASTER#* }\", \"restarts\": $(job_state Restarts)}"
log "ok: state and logs in $STATE"
