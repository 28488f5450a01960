#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, to try (and test) the cluster path without a cluster.
#
#   sudo scripts/slurm_local.sh            # install slurm-wlm + munge if missing, start, wait for the node
#   sudo scripts/slurm_local.sh --stop     # stop the daemons it started (by the pids it wrote)
#   sudo scripts/slurm_local.sh /tmp/x     # state, logs, pids and slurm.conf in /tmp/x (default /tmp/gradlab-slurm)
#   python train.py -m hydra/launcher=slurm hydra.launcher.gpus_per_node=0 hydra.launcher.cpus_per_task=1 \
#       hydra.launcher.mem_gb=1 data=toy model=mlp optimizer.lr=0.1,0.01
#
# Debian's SLURM 22.05, run as root: munged, then slurmctld, then slurmd. No accounting database (sacct fails;
# gradlab reads job states from squeue). Starting again while it runs says so and does nothing.
# slurm.conf lives in the folder; /etc/slurm/slurm.conf is linked to it only when there is none, so that sinfo,
# sbatch and srun find it without SLURM_CONF (otherwise: export SLURM_CONF=<folder>/slurm.conf).
set -euo pipefail

stop=false
dir=/tmp/gradlab-slurm
for arg in "$@"; do
  case "$arg" in
    --stop) stop=true ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    -*) echo "slurm_local.sh: unknown option $arg (use --stop or a folder)" >&2; exit 2 ;;
    *) dir=$arg ;;
  esac
done
conf=$dir/slurm.conf
export SLURM_CONF=$conf

pid_alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

if $stop; then
  # slurmd first (it reports to slurmctld), munged last (both authenticate through it).
  for name in slurmd slurmctld munged; do
    if pid_alive "$dir/$name.pid"; then
      pid=$(cat "$dir/$name.pid")
      kill "$pid"
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      echo "stopped $name (pid $pid)"
    fi
    rm -f "$dir/$name.pid"
  done
  if [[ -L /etc/slurm/slurm.conf && $(readlink /etc/slurm/slurm.conf) == "$conf" ]]; then
    rm /etc/slurm/slurm.conf
  fi
  exit 0
fi

if [[ $(id -u) != 0 ]]; then
  echo "slurm_local.sh: run as root (SlurmUser=root; the daemons need it)" >&2
  exit 2
fi

if pid_alive "$dir/slurmctld.pid" && pid_alive "$dir/slurmd.pid" && pid_alive "$dir/munged.pid"; then
  echo "SLURM is already running from $dir (stop: $0 --stop${1:+ $dir})"
  sinfo
  exit 0
fi

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  echo "installing slurm-wlm and munge (apt-get) ..."
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  apt-get install -y -q --no-install-recommends slurm-wlm munge >/dev/null
fi

mkdir -p "$dir"/{state,spool,munge}
chmod 700 "$dir/munge"
[[ -s /etc/munge/munge.key ]] || mungekey --create --keyfile=/etc/munge/munge.key 2>/dev/null \
  || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
chown root:root /etc/munge/munge.key
chmod 400 /etc/munge/munge.key

host=$(hostname -s)
cpus=$(nproc --all)  # --all: plain nproc honours OMP_NUM_THREADS, which the test suite sets to 1
# RealMemory in MB: what `free` calls total, less 5% that SLURM must not hand out (the OS, these daemons).
mem_mb=$(free -m | awk '/^Mem:/ {print int($2 * 0.95)}')

cat > "$conf" <<EOF
# Written by scripts/slurm_local.sh: a one-node cluster on $host ($cpus CPUs, $mem_mb MB), over 127.0.0.1 (no DNS).
ClusterName=gradlab
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# Lifetime of job credentials; it also holds a requeued job pending (Reason=BeginTime) for this long + 1 s
# (default 120 s, which is most of what a preemption test would wait for).
AuthInfo=socket=$dir/munge/munge.socket.2,cred_expire=10
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
# No cgroups needed: processes are tracked by parent pid, tasks are not bound to cores.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
# No accounting database: sacct has nothing to read (job states come from squeue).
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# Fast turn-around for tests: schedule at once on every submit/end, keep finished jobs visible 30 s.
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2,sched_min_interval=0
MinJobAge=30
KillWait=5
InactiveLimit=0
Waittime=0
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF

if [[ ! -e /etc/slurm/slurm.conf ]]; then
  mkdir -p /etc/slurm
  ln -s "$conf" /etc/slurm/slurm.conf
elif [[ $(readlink -f /etc/slurm/slurm.conf) != "$conf" ]]; then
  echo "note: /etc/slurm/slurm.conf is another cluster's; for this one: export SLURM_CONF=$conf"
fi

start() {  # start NAME PIDFILE CMD...: run the daemon unless its pid file names a live process
  local name=$1 pidfile=$2; shift 2
  pid_alive "$pidfile" && return 0
  "$@" || { echo "slurm_local.sh: $name did not start; see $dir/$name.log" >&2; exit 1; }
  for _ in $(seq 100); do pid_alive "$pidfile" && return 0; sleep 0.1; done
  echo "slurm_local.sh: $name wrote no pid file; see $dir/$name.log" >&2
  exit 1
}
start munged "$dir/munged.pid" munged --socket="$dir/munge/munge.socket.2" --pid-file="$dir/munged.pid" \
  --log-file="$dir/munged.log" --seed-file="$dir/munge/munged.seed" --force
# -i: ignore state saved by an earlier run of this cluster (old jobs, a node left down).
start slurmctld "$dir/slurmctld.pid" slurmctld -i
start slurmd "$dir/slurmd.pid" slurmd

for _ in $(seq 120); do
  state=$(sinfo -h -n "$host" -o %t 2>/dev/null || true)
  if [[ $state == idle || $state == mix ]]; then
    echo "SLURM is up: node $host idle in partition local ($cpus CPUs, $mem_mb MB); files in $dir"
    sinfo
    exit 0
  fi
  sleep 0.5
done
echo "slurm_local.sh: node $host is not idle after 60 s (state: ${state:-none}); see $dir/slurmctld.log" >&2
exit 1
