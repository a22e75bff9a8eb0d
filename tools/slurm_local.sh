#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine, for the SLURM tests and for trying the cluster
# launchers (slurm/pretrain.sh, tools/submit.py) on a laptop or workstation. Needs root.
#
#   eval "$(sudo tools/slurm_local.sh start)"    # prints `export SLURM_CONF=...` on stdout
#   sbatch slurm/pretrain.sh ...                 # sinfo / squeue / scontrol work as usual
#   sudo tools/slurm_local.sh status
#   sudo tools/slurm_local.sh stop               # cancels this cluster's jobs, stops its daemons
#
# usage: tools/slurm_local.sh start|stop|status [STATE_DIR]   (default: $MLIP_SLURM_DIR or /tmp/mlip-slurm)
#
# start: installs slurmctld slurmd slurm-client munge with apt if missing (apt-get update only when
# the install needs it), creates /etc/munge/munge.key if missing, starts munged if it is not running,
# writes STATE_DIR/slurm.conf (this host as controller and only node, CPUs = nproc, state, spool,
# logs and pid files in STATE_DIR, loopback addresses), starts slurmctld and slurmd with -f that
# file and waits until sinfo shows the node idle. Idempotent: daemons already running from
# STATE_DIR are kept. Everything but the export line goes to stderr.
# Sourced (`. tools/slurm_local.sh`), it only defines its functions, for a script that builds
# another cluster the same way (benchmarks/bench_two_nodes.sh: two nodes, one in a network
# namespace): slurm_local_init STATE_DIR, install_packages, start_munge, write_conf, start_slurmctld,
# start_slurmd, wait_nodes_up, slurm_stop.
# Environment:
#   MLIP_SLURM_PORT         slurmctld port (default 6817; slurmd uses it + 1): give each cluster
#                           running at the same time its own
#   MLIP_SLURM_CPUS         CPUs the node offers (default: nproc)
#   MLIP_SLURM_MAXTIME      partition MaxTime (default 2-00:00:00)
#   MLIP_SLURM_CRED_EXPIRE  job credential lifetime, also how long a requeued job waits before it
#                           may start again (default 5 s, the least allowed; SLURM's default is 120)
#   MLIP_SLURM_WAIT         seconds to wait for the node to become idle (default 60)
# Exit codes: 0 ok, 1 failure, 3 not root, 4 the packages could not be installed.
set -euo pipefail

PACKAGES=(slurmctld slurmd slurm-client munge)

log() { echo "[slurm_local] $*" >&2; }
die() { log "error: $1"; exit "${2:-1}"; }

usage() {
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//' >&2
  exit 2
}

slurm_local_init() {  # STATE_DIR: the settings every function below reads
  STATE_DIR="$1"
  mkdir -p "$STATE_DIR" 2>/dev/null || true
  STATE_DIR="$(cd "$STATE_DIR" 2>/dev/null && pwd || echo "$STATE_DIR")"
  CONF="$STATE_DIR/slurm.conf"
  HOST="$(hostname -s 2>/dev/null || hostname)"
  CTLD_PORT="${MLIP_SLURM_PORT:-6817}"
  SLURMD_PORT=$((CTLD_PORT + 1))
  MAXTIME="${MLIP_SLURM_MAXTIME:-2-00:00:00}"
  WAIT_S="${MLIP_SLURM_WAIT:-60}"
  CRED_EXPIRE="${MLIP_SLURM_CRED_EXPIRE:-5}"
}

pid_alive() {  # pid file -> 0 if the process in it runs
  local pid
  [ -s "$1" ] || return 1
  pid="$(cat "$1" 2>/dev/null)" || return 1
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null
}

install_packages() {
  local missing=()
  command -v slurmctld >/dev/null || missing+=(slurmctld)
  command -v slurmd >/dev/null || missing+=(slurmd)
  command -v sbatch >/dev/null && command -v sinfo >/dev/null || missing+=(slurm-client)
  command -v munged >/dev/null || missing+=(munge)
  [ ${#missing[@]} -eq 0 ] && return 0
  command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get: install SLURM and munge yourself" 4
  log "installing ${PACKAGES[*]} (apt)"
  export DEBIAN_FRONTEND=noninteractive
  # Try the package lists already on the machine first; refresh them only if that fails.
  if ! apt-get install -y -q "${PACKAGES[@]}" >"$STATE_DIR/apt.log" 2>&1; then
    log "apt-get install failed with the current package lists: apt-get update, then retry"
    { apt-get update -q && apt-get install -y -q "${PACKAGES[@]}"; } >>"$STATE_DIR/apt.log" 2>&1 \
      || die "could not install ${PACKAGES[*]} (see $STATE_DIR/apt.log)" 4
  fi
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
    || die "packages installed but the daemons are not on PATH (see $STATE_DIR/apt.log)" 4
}

# GNU nproc honours OMP_NUM_THREADS (set to 1 in tests and training shells): count without it.
ncpus() { env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc; }

munge_ok() { timeout 5 munge -n 2>/dev/null | timeout 5 unmunge >/dev/null 2>&1; }

start_munge() {
  if [ ! -s /etc/munge/munge.key ]; then
    log "creating /etc/munge/munge.key"
    install -d -m 0700 -o munge -g munge /etc/munge
    if command -v mungekey >/dev/null; then
      mungekey --create --keyfile=/etc/munge/munge.key --force
    else
      dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
  fi
  munge_ok && return 0
  log "starting munged"
  install -d -m 0755 -o munge -g munge /run/munge
  install -d -m 0700 -o munge -g munge /var/lib/munge /var/log/munge
  runuser -u munge -- /usr/sbin/munged --force
  for _ in $(seq 50); do munge_ok && return 0; sleep 0.1; done
  die "munged did not start (see /var/log/munge/munged.log)"
}

# write_conf CLUSTER CTLD_ADDR NODE...: STATE_DIR/slurm.conf for a cluster whose controller runs on
# this host at CTLD_ADDR, one partition ("debug", the default) over the nodes; NODE is
# name:addr:cpus:memory_mb. One node keeps the file names slurmd.pid and slurmd.log; with more,
# each slurmd (started with -N name) writes slurmd-<name>.pid and .log.
write_conf() {
  local cluster=$1 ctld_addr=$2 slurmd=slurmd nodes="" lines="" node name addr cpus mem tmp listen
  shift 2
  [ $# -gt 1 ] && slurmd='slurmd-%n'
  for node in "$@"; do
    IFS=: read -r name addr cpus mem <<<"$node"
    lines+="NodeName=$name NodeAddr=$addr NodeHostname=$HOST CPUs=$cpus RealMemory=$mem State=UNKNOWN"$'\n'
    nodes+="${nodes:+,}$name"
  done
  # On loopback the daemons bind to their own address only; on a real (or veth) network they
  # listen on every address of their namespace, where the other nodes reach them.
  listen="# The daemons listen on every address of their network namespace."
  [ "$ctld_addr" = 127.0.0.1 ] && listen="CommunicationParameters=NoCtldInAddrAny,NoInAddrAny"
  mkdir -p "$STATE_DIR/state" "$STATE_DIR/spool" "$STATE_DIR/log" "$STATE_DIR/run"
  tmp="$CONF.tmp.$$"
  cat >"$tmp" <<EOF
# Written by tools/slurm_local.sh: cluster $cluster on $HOST (nodes $nodes), state in $STATE_DIR.
ClusterName=$cluster
SlurmctldHost=$HOST($ctld_addr)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job waits cred_expire seconds before it may start again (default 120).
AuthInfo=cred_expire=$CRED_EXPIRE
$listen
StateSaveLocation=$STATE_DIR/state
SlurmdSpoolDir=$STATE_DIR/spool/slurmd-%n
SlurmctldPidFile=$STATE_DIR/run/slurmctld.pid
SlurmdPidFile=$STATE_DIR/run/$slurmd.pid
SlurmctldLogFile=$STATE_DIR/log/slurmctld.log
SlurmdLogFile=$STATE_DIR/log/$slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SchedulerType=sched/backfill
# Look at pending jobs every 2 s (default 60/30 s): a requeued job restarts within seconds.
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
${lines}PartitionName=debug Nodes=$nodes Default=YES MaxTime=$MAXTIME State=UP OverSubscribe=NO
EOF
  mv "$tmp" "$CONF"
}

start_slurmctld() {
  log "starting slurmctld (port $CTLD_PORT, conf $CONF)"
  slurmctld -f "$CONF" || die "slurmctld did not start (see $STATE_DIR/log/slurmctld.log)"
}

start_slurmd() {  # [NODE [PREFIX...]]: the slurmd of node NODE (-N; default: this host's), run under PREFIX
  local node="${1:-}"
  shift || true
  log "starting slurmd${node:+ $node} (port $SLURMD_PORT)"
  "$@" slurmd -f "$CONF" ${node:+-N "$node"} \
    || die "slurmd${node:+ $node} did not start (see $STATE_DIR/log/slurmd${node:+-$node}.log)"
}

# Waits until sinfo shows every node of the cluster up (idle, mixed, allocated or completing);
# a node left down by an earlier run of this state dir is resumed once.
wait_nodes_up() {
  local states="" t0=$SECONDS resumed=0 node
  while [ $((SECONDS - t0)) -lt "$WAIT_S" ]; do
    states="$(SLURM_CONF="$CONF" timeout 10 sinfo -h -N -o '%N %T' 2>/dev/null || true)"
    [ -n "$states" ] && ! grep -qvE ' (idle|mixed|allocated|completing)$' <<<"$states" && return 0
    if [ $resumed -eq 0 ]; then
      for node in $(awk '$2 ~ /^(down|drain|fail)/ {print $1}' <<<"$states"); do
        SLURM_CONF="$CONF" scontrol update nodename="$node" state=resume >/dev/null 2>&1 || true
        resumed=1
      done
    fi
    sleep 0.3
  done
  die "nodes not up after ${WAIT_S}s: $(echo ${states:-not answering}) (logs in $STATE_DIR/log)"
}

slurm_start() {
  [ "$(id -u)" -eq 0 ] || die "needs root (it installs packages and starts munged and the SLURM daemons as root)" 3
  install_packages
  start_munge
  local fresh=0 cpus="${MLIP_SLURM_CPUS:-$(ncpus)}" mem
  if ! pid_alive "$STATE_DIR/run/slurmctld.pid" || ! pid_alive "$STATE_DIR/run/slurmd.pid"; then
    mem="$(awk '/^MemTotal:/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)"
    write_conf mlip-local 127.0.0.1 "$HOST:127.0.0.1:$cpus:$mem"
    fresh=1
  fi
  pid_alive "$STATE_DIR/run/slurmctld.pid" || start_slurmctld
  pid_alive "$STATE_DIR/run/slurmd.pid" || start_slurmd
  wait_nodes_up
  [ $fresh -eq 1 ] && log "cluster up in $((SECONDS))s: node $HOST, $cpus CPUs, partition debug" \
                   || log "cluster already running: node $HOST is up"
  echo "export SLURM_CONF=$CONF"
}

stop_pid() {  # name pidfile
  local pid
  pid_alive "$2" || { rm -f "$2"; return 0; }
  pid="$(cat "$2")"
  log "stopping $1 (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid" 2>/dev/null || true; fi
  rm -f "$2"
}

slurm_stop() {  # cancels the cluster's jobs, then stops every slurmd and the slurmctld of STATE_DIR
  if pid_alive "$STATE_DIR/run/slurmctld.pid"; then
    # Cancel this cluster's jobs first, so no training processes outlive the daemons.
    local jobs
    jobs="$(SLURM_CONF="$CONF" timeout 10 squeue -h -o '%i' 2>/dev/null || true)"
    if [ -n "$jobs" ]; then
      log "cancelling jobs: $(echo "$jobs" | tr '\n' ' ')"
      # shellcheck disable=SC2086
      SLURM_CONF="$CONF" timeout 10 scancel $jobs 2>/dev/null || true
      for _ in $(seq 50); do
        [ -z "$(SLURM_CONF="$CONF" timeout 5 squeue -h -t all -o '%i %t' 2>/dev/null | grep -vE ' (CA|CD|F|TO|PR|NF|OOM)$' || true)" ] && break
        sleep 0.2
      done
    fi
  fi
  local pidfile
  for pidfile in "$STATE_DIR"/run/slurmd*.pid; do
    stop_pid "$(basename "$pidfile" .pid)" "$pidfile"
  done
  stop_pid slurmctld "$STATE_DIR/run/slurmctld.pid"
  log "stopped (munged is left running; state and logs stay in $STATE_DIR)"
}

slurm_status() {
  local ok=0
  for d in slurmctld slurmd; do
    if pid_alive "$STATE_DIR/run/$d.pid"; then log "$d: running (pid $(cat "$STATE_DIR/run/$d.pid"))"
    else log "$d: not running"; ok=1; fi
  done
  if munge_ok; then log "munged: running"; else log "munged: not running"; ok=1; fi
  if [ $ok -eq 0 ]; then
    SLURM_CONF="$CONF" timeout 10 sinfo >&2 || ok=1
    SLURM_CONF="$CONF" timeout 10 squeue >&2 || true
    echo "export SLURM_CONF=$CONF"
  fi
  return $ok
}

slurm_local_main() {
  case "${1:-}" in start|stop|status) ;; *) usage ;; esac
  slurm_local_init "${2:-${MLIP_SLURM_DIR:-/tmp/mlip-slurm}}"
  "slurm_$1"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  slurm_local_main "$@"
fi
