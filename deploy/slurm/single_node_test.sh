#!/usr/bin/env bash
# A private single-node SLURM (munged, slurmctld, slurmd) on 127.0.0.1, for testing the SLURM
# recipe on one machine. Idempotent: `start` starts only what is not running and waits until the
# node is idle; `stop` stops only the daemons whose pid files it wrote. Needs root and the Debian
# packages `slurm-wlm munge` (apt-get install -y --no-install-recommends slurm-wlm munge).
# Everything (config, munge key and socket, spool, logs, pid files) lives in $DEEPMR_SLURM_DIR
# (default /tmp/deepmr-slurm); nothing in /etc is touched, and the ports are not SLURM's defaults,
# so a site's own SLURM is left alone. Clients use it with: export SLURM_CONF=$DEEPMR_SLURM_DIR/slurm.conf
#
# Usage: deploy/slurm/single_node_test.sh start|stop|status
set -euo pipefail

dir=${DEEPMR_SLURM_DIR:-/tmp/deepmr-slurm}
ctld_port=${DEEPMR_SLURMCTLD_PORT:-16817}
slurmd_port=${DEEPMR_SLURMD_PORT:-16818}
conf=$dir/slurm.conf
export SLURM_CONF=$conf

running() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

write_config() {
  mkdir -p "$dir/ctld" "$dir/spool" "$dir/log"
  local node mem
  # slurmd -C reports this node's CPUs, sockets, cores and memory (MB); keep a little memory back.
  node=$(slurmd -C | head -n 1 | sed 's/^NodeName=[^ ]* //; s/ RealMemory=[0-9]*//')
  mem=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
  mem=$((mem > 1024 ? mem - 512 : mem))
  cat >"$conf" <<CONF
ClusterName=deepmr-test
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge.socket
StateSaveLocation=$dir/ctld
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
GresTypes=gpu
ReturnToService=2
SlurmdTimeout=60
InactiveLimit=0
KillWait=5
NodeName=localhost NodeAddr=127.0.0.1 $node RealMemory=$mem Gres=gpu:1 State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
CONF
  # One stand-in GPU (slurmd drops GPUs without a device file), so that `--gres=gpu:1` jobs
  # schedule on a machine without GPUs: their workers declare GPU=1 and run on the CPU.
  echo "NodeName=localhost Name=gpu File=/dev/null" >"$dir/gres.conf"
}

start() {
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
    || { echo "single_node_test.sh: slurmctld, slurmd or munged not found (apt-get install slurm-wlm munge)" >&2; exit 1; }
  write_config
  if [[ ! -f $dir/munge.key ]]; then
    mungekey --create --keyfile="$dir/munge.key"
    chmod 600 "$dir/munge.key"
  fi
  if ! running "$dir/munged.pid"; then
    munged --force --key-file="$dir/munge.key" --socket="$dir/munge.socket" --pid-file="$dir/munged.pid" \
      --log-file="$dir/log/munged.log" --seed-file="$dir/munge.seed"
  fi
  # -c: a fresh controller forgets the jobs and node states of an earlier test run.
  running "$dir/slurmctld.pid" || slurmctld -c -f "$conf"
  running "$dir/slurmd.pid" || slurmd -f "$conf" -N localhost
  for _ in $(seq 60); do
    if [[ $(sinfo -h -n localhost -o %t 2>/dev/null) =~ ^(idle|mix|alloc)$ ]]; then
      echo "single-node SLURM up: SLURM_CONF=$conf"
      return 0
    fi
    sleep 1
  done
  echo "single_node_test.sh: node did not become idle; see $dir/log" >&2
  sinfo -N -l >&2 || true
  exit 1
}

stop() {
  local name
  # jobs first: their processes outlive slurmd
  if running "$dir/slurmctld.pid"; then
    scancel --user="$(id -un)" 2>/dev/null || true
    for _ in $(seq 30); do
      [[ -z $(squeue -h 2>/dev/null) ]] && break
      sleep 1
    done
  fi
  for name in slurmd slurmctld munged; do
    if running "$dir/$name.pid"; then
      kill "$(cat "$dir/$name.pid")"
    fi
  done
}

case ${1:-start} in
  start) start ;;
  stop) stop ;;
  status) sinfo -N -l ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
