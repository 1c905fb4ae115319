#!/usr/bin/env bash
# A real Slurm cluster of two simulated nodes on this machine, for trying `orlhf launch
# cluster=slurm` and for the integration tests:   scripts/local_slurm.sh {install|start|stop|status}
#
# Nodes n1 and n2 are two slurmd daemons on this host, each with its own port and spool
# directory; both names resolve to 127.0.0.1 (a line in /etc/hosts), so multi-node jobs
# (torchrun's c10d rendezvous across nodes) and heterogeneous jobs (one component per node)
# run for real. Written for Debian/Ubuntu as root without systemd (containers, CI runners):
# the daemons are started directly and stopped by the PIDs recorded at start. Slurm 22.05
# facts this relies on are noted where they matter.
set -euo pipefail

STATE_DIR=${ORLHF_SLURM_STATE:-/var/lib/orlhf-slurm}
SLURM_CONF=/etc/slurm/slurm.conf
MARKER="# written by orlhf scripts/local_slurm.sh"
PACKAGES=(munge slurm-client slurmctld slurmd)
CONTROLLER=$(hostname -s)
NODES=(n1 n2)
NODE_PORTS=(6821 6822)
HOSTS_LINE="127.0.0.1 ${NODES[*]} $MARKER"

die() { echo "local_slurm: $*" >&2; exit 1; }
say() { echo "local_slurm: $*"; }

need_root() { [ "$(id -u)" = 0 ] || die "must run as root (it installs packages and starts daemons)"; }

installed() { command -v munged >/dev/null && command -v slurmctld >/dev/null \
  && command -v slurmd >/dev/null && command -v sbatch >/dev/null; }

cmd_install() {
  if installed; then say "already installed ($(slurmd -V))"; return; fi
  need_root
  command -v apt-get >/dev/null || die "apt-get not found; install munge and Slurm by hand"
  apt-get update
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${PACKAGES[@]}"
  say "installed $(slurmd -V)"
}

mem_mb() { awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo; }

# cons_tres with CR_Core: cores are consumable, memory is not (a job's --mem is only
# checked against RealMemory). linuxproc/task none: no cgroups needed. Without slurmdbd,
# finished jobs are listed by `sacct -c` from the filetxt job-completion log. Each node
# offers all of this machine's CPUs (the two share them). %n in the slurmd paths is the
# node name, so the two daemons keep apart. Heterogeneous jobs are started by the backfill
# scheduler only (22.05), every bf_interval seconds: 1 instead of the default 30.
write_slurm_conf() {
  if [ -f "$SLURM_CONF" ] && ! grep -qF "$MARKER" "$SLURM_CONF"; then
    die "$SLURM_CONF exists and was not written by this script; refusing to overwrite it"
  fi
  mkdir -p "$(dirname "$SLURM_CONF")" "$STATE_DIR"/{ctld,log} "${NODES[@]/#/$STATE_DIR/slurmd-}"
  cat >"$SLURM_CONF" <<EOF
$MARKER
ClusterName=local
SlurmctldHost=$CONTROLLER(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE_DIR/ctld
SlurmdSpoolDir=$STATE_DIR/slurmd-%n
SlurmctldPidFile=$STATE_DIR/slurmctld.pid
SlurmdPidFile=$STATE_DIR/slurmd-%n.pid
SlurmctldLogFile=$STATE_DIR/log/slurmctld.log
SlurmdLogFile=$STATE_DIR/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
ReturnToService=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# Without batch_sched_delay=0 every job waits about 3 s before it is scheduled.
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,bf_interval=1
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc=$STATE_DIR/log/jobcomp.log
MinJobAge=300
$(node_lines)
PartitionName=debug Nodes=$(IFS=,; echo "${NODES[*]}") Default=YES MaxTime=INFINITE State=UP
EOF
}

node_lines() {
  local i
  for i in "${!NODES[@]}"; do
    echo "NodeName=${NODES[$i]} NodeHostname=$CONTROLLER NodeAddr=127.0.0.1 Port=${NODE_PORTS[$i]}" \
      "CPUs=$(nproc) RealMemory=$(mem_mb) State=UNKNOWN"
  done
}

# Job steps and services address nodes by name (torchrun's rendezvous host, a service URL).
ensure_node_names() {
  local name
  for name in "${NODES[@]}"; do
    getent hosts "$name" | grep -q '^127\.0\.0\.1 ' && continue
    grep -qF "$MARKER" /etc/hosts && die "/etc/hosts has this script's line, but $name does not resolve to 127.0.0.1"
    echo "$HOSTS_LINE" >>/etc/hosts
    return
  done
}

ensure_munge_key() {
  [ -s /etc/munge/munge.key ] && return
  mkdir -p /etc/munge
  if command -v mungekey >/dev/null; then mungekey --create --force
  else dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none; fi
  chown munge:munge /etc/munge/munge.key
  chmod 400 /etc/munge/munge.key
}

start_munged() {
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  rm -f /run/munge/munged.pid
  runuser -u munge -- munged
  wait_for "munged pidfile" test -s /run/munge/munged.pid
  cat /run/munge/munged.pid >"$STATE_DIR/munged.pid.recorded"
}

# Daemons remove their pidfile while stopping, so the PIDs are copied at start.
# `start_slurm_daemon slurmd -N n1` starts the slurmd of node n1 (pidfile slurmd-n1.pid).
start_slurm_daemon() {
  local name=$1 pidfile=$1; shift
  [ $# -eq 2 ] && pidfile="$name-$2"
  "$name" "$@"
  wait_for "$pidfile pidfile" test -s "$STATE_DIR/$pidfile.pid"
  cat "$STATE_DIR/$pidfile.pid" >"$STATE_DIR/$pidfile.pid.recorded"
}

wait_for() {
  local what=$1; shift
  for _ in $(seq 100); do "$@" >/dev/null 2>&1 && return; sleep 0.2; done
  die "timed out waiting for $what (logs: $STATE_DIR/log)"
}

nodes_idle() { [ "$(sinfo -h -N -o %t | grep -cx idle)" = "${#NODES[@]}" ]; }

cmd_start() {
  if cmd_status >/dev/null 2>&1; then say "already running"; return; fi
  need_root
  installed || die "Slurm is not installed; run: $0 install"
  cmd_stop >/dev/null 2>&1 || true
  write_slurm_conf
  ensure_node_names
  ensure_munge_key
  start_munged
  start_slurm_daemon slurmctld
  local node
  for node in "${NODES[@]}"; do start_slurm_daemon slurmd -N "$node"; done
  wait_for "nodes ${NODES[*]} to become idle" nodes_idle
  say "up: partition debug, nodes ${NODES[*]} ($(nproc) CPUs and $(mem_mb) MB each, shared)"
}

recorded_pids() { cat "$STATE_DIR"/*.pid.recorded 2>/dev/null || true; }
alive_pids() { local pid; for pid in "$@"; do if kill -0 "$pid" 2>/dev/null; then echo "$pid"; fi; done; }

# Wait up to $2 seconds for the PIDs in $1 to exit; prints the ones still alive.
wait_exit() {
  local alive
  for _ in $(seq $(($2 * 5))); do
    # shellcheck disable=SC2086  # one PID per word
    alive=$(alive_pids $1)
    [ -z "$alive" ] && return
    sleep 0.2
  done
  echo "$alive"
}

cmd_stop() {
  local pids alive
  pids=$(recorded_pids)
  [ -n "$pids" ] || { say "not running"; return; }
  # shellcheck disable=SC2086  # one PID per word
  kill $pids 2>/dev/null || true
  # slurmd waits for a cancelled job's processes (Slurm's KillWait, 30 s by default), so a
  # daemon may outlive a shorter wait; these are the daemons this script started: killed then.
  alive=$(wait_exit "$pids" 40)
  # shellcheck disable=SC2086
  [ -z "$alive" ] || { kill -KILL $alive 2>/dev/null || true; alive=$(wait_exit "$alive" 5); }
  [ -z "$alive" ] || die "still running after SIGKILL: pid(s) $(echo "$alive" | tr '\n' ' ')"
  rm -f "$STATE_DIR"/*.pid.recorded
  say "stopped"
}

cmd_status() {
  local pids
  pids=$(recorded_pids)
  [ -n "$pids" ] || { echo "down"; return 1; }
  # shellcheck disable=SC2086
  [ "$(alive_pids $pids)" = "$pids" ] || { echo "down (a daemon has exited; logs: $STATE_DIR/log)"; return 1; }
  scontrol ping | grep -q UP || { echo "down (slurmctld does not answer)"; return 1; }
  # A Slurm started by an older version of this script runs one node; `start` replaces it.
  [ "$(sinfo -h -N -o %N | sort -u | tr '\n' ' ')" = "${NODES[*]} " ] \
    || { echo "down (not the nodes ${NODES[*]}; $0 start replaces it)"; return 1; }
  sinfo -h -o "up: partition %P, nodes %N, state %t, %c CPUs each"
}

case "${1:-}" in
  install) cmd_install ;;
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  *) echo "usage: $0 {install|start|stop|status}" >&2; exit 2 ;;
esac
