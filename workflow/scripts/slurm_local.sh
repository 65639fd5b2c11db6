#!/usr/bin/env bash
# A one-node SLURM on this machine, for testing the SLURM profile against a real scheduler
# (CI runs it through tests/test_slurm.py). Debian 12's slurm-wlm (SLURM 22.05), as root.
#   bash workflow/scripts/slurm_local.sh start    # install if missing, configure, start, wait for the node
#   bash workflow/scripts/slurm_local.sh stop     # stop what start started
#   bash workflow/scripts/slurm_local.sh status
# Accounting is off (no slurmdbd): job states come from squeue, and no account may be set;
# the profile says so (slurm-status-command: squeue, slurm-no-account: true).
set -euo pipefail
STATE=${ECOFLAP_SLURM_DIR:-/tmp/ecoflap-slurm}
CONF=/etc/slurm

need_root() {
  [[ $(id -u) == 0 ]] || { echo "slurm_local.sh: runs slurmctld/slurmd and writes $CONF, so it needs root" >&2; exit 2; }
}

install() {
  command -v slurmctld >/dev/null && command -v munged >/dev/null && return
  echo "installing slurm-wlm and munge (Debian packages)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q slurm-wlm munge >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null && apt-get install -y -q slurm-wlm munge >/dev/null; }
}

start_munge() {
  mkdir -p /etc/munge /run/munge /var/lib/munge /var/log/munge
  [[ -s /etc/munge/munge.key ]] || head -c 1024 /dev/urandom > /etc/munge/munge.key
  chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge
  chmod 0400 /etc/munge/munge.key
  chmod 0755 /run/munge
  pgrep -x munged >/dev/null || runuser -u munge -- /usr/sbin/munged
  for _ in $(seq 50); do munge -n >/dev/null 2>&1 && return; sleep 0.1; done
  echo "munged did not start" >&2; exit 1
}

MARK="# written by workflow/scripts/slurm_local.sh"

write_config() {
  local host node
  # never touch a real cluster's configuration
  if [[ -f "$CONF/slurm.conf" ]] && ! grep -qF "$MARK" "$CONF/slurm.conf"; then
    echo "slurm_local.sh: $CONF/slurm.conf exists and was not written by this script; not touching it" >&2
    exit 1
  fi
  host=$(hostname -s)
  # the node's real CPUs, sockets and memory, as slurmd sees them ("NodeName=... RealMemory=...")
  node=$(slurmd -C | head -1)
  mkdir -p "$CONF" "$STATE"/{spool,state,log}
  cat > "$CONF/slurm.conf" <<EOF
$MARK: one node, no accounting, no cgroup enforcement
ClusterName=ecoflap-test
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
MinJobAge=600
KillWait=5
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmdSpoolDir=$STATE/spool
StateSaveLocation=$STATE/state
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
$node State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
  # 22.05 has no "disabled" cgroup plugin (slurmd refuses it): v1 with nothing constrained
  cat > "$CONF/cgroup.conf" <<EOF
$MARK
CgroupPlugin=cgroup/v1
CgroupAutomount=yes
ConstrainCores=no
ConstrainRAMSpace=no
ConstrainDevices=no
EOF
}

start() {
  need_root
  install
  start_munge
  write_config
  pgrep -x slurmctld >/dev/null || slurmctld
  pgrep -x slurmd >/dev/null || slurmd
  for _ in $(seq 100); do
    if sinfo -h -o %t 2>/dev/null | grep -qE '^(idle|mix|alloc)'; then
      srun -t 1 hostname >/dev/null && { echo "SLURM up: $(sinfo -h -o '%P %D %t %c CPUs %m MB')"; return; }
    fi
    sleep 0.2
  done
  echo "SLURM did not come up; logs in $STATE/log" >&2
  tail -5 "$STATE"/log/*.log >&2 || true
  exit 1
}

stop() {
  need_root
  scancel --user=root 2>/dev/null || true
  pkill -x slurmd 2>/dev/null || true
  pkill -x slurmctld 2>/dev/null || true
  for _ in $(seq 50); do { pgrep -x slurmd || pgrep -x slurmctld; } >/dev/null || break; sleep 0.1; done
  # remove our configuration too: with a slurm.conf naming a stopped controller, every squeue
  # (the SLURM executor plugin runs one when Snakemake starts) retries for about 9 s
  for f in "$CONF/slurm.conf" "$CONF/cgroup.conf"; do
    [[ -f "$f" ]] && grep -qF "$MARK" "$f" && rm -f "$f"
  done
  echo "SLURM stopped"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) sinfo && squeue ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
