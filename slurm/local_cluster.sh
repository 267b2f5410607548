#!/usr/bin/env bash
# A real local SLURM cluster for tests and for trying hpc-seg on one machine:
# Debian slurm-wlm + munge, one slurmctld and two slurmd (nodes n1, n2) on this host.
#
#   slurm/local_cluster.sh start    # install if needed (root, apt), configure, start, wait until idle
#   slurm/local_cluster.sh status   # sinfo / squeue, exit 0 when both nodes answer
#   slurm/local_cluster.sh stop     # stop the daemons (idempotent)
#
# It writes /etc/slurm/slurm.conf only when that file is absent or was written by this script
# (marker line below), so it never overwrites a real cluster's configuration.
set -euo pipefail
MARKER="# hpc-seg local test cluster"
CONF=/etc/slurm/slurm.conf
STATE=/var/lib/hpc-seg-slurm
LOGS=/var/log/hpc-seg-slurm
CPUS=$(nproc)

need_root() { [ "$(id -u)" = 0 ] || { echo "local_cluster.sh: needs root (apt, daemons, /etc)" >&2; exit 2; }; }

install() {
  if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    echo "installing slurm-wlm and munge (apt)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq slurm-wlm munge >/dev/null
  fi
}

configure() {
  if [ -f "$CONF" ] && ! grep -qF "$MARKER" "$CONF"; then
    echo "local_cluster.sh: $CONF exists and is not ours; refusing to touch it" >&2; exit 2
  fi
  mkdir -p /etc/slurm "$STATE/ctld" "$STATE/slurmd-n1" "$STATE/slurmd-n2" "$LOGS" \
           /run/munge /var/lib/munge /var/log/munge
  cat > "$CONF" <<CONF
$MARKER (slurm/local_cluster.sh)
ClusterName=hpcseg
SlurmctldHost=localhost
SlurmUser=root
SlurmctldPort=6817
AuthType=auth/munge
CryptoType=crypto/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
JobRequeue=1
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/slurmd-%n
SlurmctldPidFile=/run/hpc-seg-slurmctld.pid
SlurmdPidFile=/run/hpc-seg-slurmd-%n.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd-%n.log
SlurmdParameters=config_overrides
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MinJobAge=600
KillWait=10
NodeName=n1 NodeAddr=127.0.0.1 Port=17001 CPUs=$CPUS RealMemory=2000 State=UNKNOWN
NodeName=n2 NodeAddr=127.0.0.1 Port=17002 CPUs=$CPUS RealMemory=2000 State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
CONF
  # node names must resolve (MASTER_ADDR=n1 for multi-node rendezvous)
  for n in n1 n2; do grep -qE "^[0-9.]+[[:space:]].*\b$n\b" /etc/hosts || echo "127.0.0.1 $n" >> /etc/hosts; done
  if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
  fi
  chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
  chmod 400 /etc/munge/munge.key
  chmod 755 /run/munge
}

running() { pgrep -f "$1" >/dev/null 2>&1; }

start() {
  if command -v sinfo >/dev/null && [ "$(sinfo -h -N -o '%T' 2>/dev/null | grep -cE 'idle|mixed|allocated')" = 2 ]; then
    echo "local SLURM cluster already up"; return 0
  fi
  need_root; install; configure
  running "/usr/sbin/munged" || runuser -u munge -- /usr/sbin/munged
  running "slurmctld" || slurmctld
  for n in n1 n2; do running "slurmd -N $n" || slurmd -N "$n"; done
  for _ in $(seq 1 60); do
    if sinfo -h -o "%T" 2>/dev/null | grep -qE "idle|mixed|allocated"; then
      scontrol update nodename=n1,n2 state=resume >/dev/null 2>&1 || true
      if [ "$(sinfo -h -N -o '%T' | grep -cE 'idle|mixed|allocated')" = 2 ]; then
        echo "local SLURM cluster up: $(sinfo -h -N -o '%N:%T' | tr '\n' ' ')"; return 0
      fi
    fi
    scontrol update nodename=n1,n2 state=resume >/dev/null 2>&1 || true
    sleep 1
  done
  echo "local_cluster.sh: nodes did not come up; see $LOGS" >&2; sinfo -N >&2 || true; exit 1
}

stop() {
  for p in "slurmd -N n1" "slurmd -N n2" "slurmctld"; do pkill -f "$p" 2>/dev/null || true; done
  echo "local SLURM cluster stopped"
}

status() {
  if sinfo -N 2>/dev/null && squeue 2>/dev/null; then
    [ "$(sinfo -h -N -o '%T' | grep -cE 'idle|mixed|allocated')" = 2 ]
  else
    echo "local SLURM cluster: not running"; return 1
  fi
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
