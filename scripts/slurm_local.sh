#!/usr/bin/env bash
# A SLURM cluster on this machine (one node, or several in network namespaces), to try and test the cluster path.
#
#   sudo scripts/slurm_local.sh            # install slurm-wlm + munge if missing, start, wait for the node
#   sudo scripts/slurm_local.sh --stop     # stop the daemons it started (by the pids it wrote)
#   sudo scripts/slurm_local.sh /tmp/x     # state, logs, pids and slurm.conf in /tmp/x (default /tmp/gradlab-slurm)
#   sudo scripts/slurm_local.sh --nodes 2  # two nodes n1, n2, each in its own network namespace (below);
#                                          # files in /tmp/gradlab-slurm2; use it with SLURM_CONF=<that>/slurm.conf
#   sudo scripts/slurm_local.sh --nodes 2 --stop
#   python train.py -m hydra/launcher=slurm hydra.launcher.gpus_per_node=0 hydra.launcher.cpus_per_task=1 \
#       hydra.launcher.mem_gb=1 data=toy model=mlp optimizer.lr=0.1,0.01
#
# Debian's SLURM 22.05, run as root: munged, then slurmctld, then slurmd. No accounting database (sacct fails;
# gradlab reads job states from squeue). Starting again while it runs says so and does nothing.
# slurm.conf lives in the folder; /etc/slurm/slurm.conf is linked to it only when there is none, so that sinfo,
# sbatch and srun find it without SLURM_CONF (otherwise: export SLURM_CONF=<folder>/slurm.conf).
#
# --nodes N (2..9): nodes n1..nN, one slurmd each (`slurmd -N nK`), each in network namespace gl-nK with its own
# hostname (unshare --uts) and /etc/hosts (/etc/netns/gl-nK/hosts, bind-mounted over /etc/hosts).
# slurmctld runs the same way as host `ctl` in gl-ctl. A veth pair per namespace joins bridge gl-br0, whose
# address 10.77.0.1 is this machine's (where sbatch, squeue and scancel run); ctl is 10.77.0.2, nK 10.77.0.(10+K).
# The namespaces have no route but 10.77.0.0/24 and their own loopback, and no IPv6: their traffic stays there.
# Nothing of this cluster listens outside the namespaces, so it runs beside the one-node cluster (same ports).
# munged stays outside: its socket is a file, which every namespace reaches. Gloo binds to the address the node's
# hostname resolves to (nK: 10.77.0.(10+K)); no GLOO_SOCKET_IFNAME needed.
set -euo pipefail

stop=false
nodes=1
dir=
while (($#)); do
  case "$1" in
    --stop) stop=true ;;
    --nodes) nodes=${2:-}; shift ;;
    --nodes=*) nodes=${1#--nodes=} ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    -*) echo "slurm_local.sh: unknown option $1 (use --stop, --nodes N or a folder)" >&2; exit 2 ;;
    *) dir=$1 ;;
  esac
  shift
done
if [[ ! $nodes =~ ^[1-9]$ ]]; then
  echo "slurm_local.sh: --nodes takes 1 to 9, not '$nodes'" >&2
  exit 2
fi
multi=false
((nodes > 1)) && multi=true
if [[ -z $dir ]]; then
  dir=/tmp/gradlab-slurm
  $multi && dir=/tmp/gradlab-slurm$nodes
fi
conf=$dir/slurm.conf
export SLURM_CONF=$conf
net=10.77.0      # the namespaces' private /24
bridge=gl-br0
node_names() { for k in $(seq "$nodes"); do echo "n$k"; done; }

pid_alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

stop_pid() {  # stop_pid NAME PIDFILE
  if pid_alive "$2"; then
    local pid
    pid=$(cat "$2")
    kill "$pid"
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    echo "stopped $1 (pid $pid)"
  fi
  rm -f "$2"
}

if $stop; then
  # slurmd first (it reports to slurmctld), munged last (both authenticate through it).
  if $multi; then
    for n in $(node_names); do stop_pid "slurmd $n" "$dir/slurmd.$n.pid"; done
    stop_pid slurmctld "$dir/slurmctld.pid"
    # What jobs left running in a namespace (their slurmd is gone) ends with it.
    for ns in $(node_names | sed 's/^/gl-/') gl-ctl; do
      if [[ -e /run/netns/$ns ]]; then
        for pid in $(ip netns pids "$ns"); do kill -9 "$pid" 2>/dev/null || true; done
        ip netns del "$ns"
      fi
      rm -rf "/etc/netns/$ns"
    done
    rmdir --ignore-fail-on-non-empty /etc/netns 2>/dev/null || true
    ip link del "$bridge" 2>/dev/null || true
    if [[ -s $dir/bridge-nf-call-iptables.old && -e /proc/sys/net/bridge/bridge-nf-call-iptables ]]; then
      cat "$dir/bridge-nf-call-iptables.old" > /proc/sys/net/bridge/bridge-nf-call-iptables
      rm "$dir/bridge-nf-call-iptables.old"
    fi
  else
    stop_pid slurmd "$dir/slurmd.pid"
    stop_pid slurmctld "$dir/slurmctld.pid"
  fi
  stop_pid munged "$dir/munged.pid"
  if [[ -L /etc/slurm/slurm.conf && $(readlink /etc/slurm/slurm.conf) == "$conf" ]]; then
    rm /etc/slurm/slurm.conf
  fi
  exit 0
fi

if [[ $(id -u) != 0 ]]; then
  echo "slurm_local.sh: run as root (SlurmUser=root; the daemons need it)" >&2
  exit 2
fi

again=$0
$multi && again="$again --nodes $nodes"
[[ $dir == /tmp/gradlab-slurm || $dir == "/tmp/gradlab-slurm$nodes" ]] || again="$again $dir"
slurmd_pids() { if $multi; then for n in $(node_names); do echo "$dir/slurmd.$n.pid"; done; else echo "$dir/slurmd.pid"; fi; }
running=true
for f in "$dir/munged.pid" "$dir/slurmctld.pid" $(slurmd_pids); do pid_alive "$f" || running=false; done
if $running; then
  echo "SLURM is already running from $dir (stop: $again --stop)"
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
$multi && for n in $(node_names); do mkdir -p "$dir/spool/$n"; done
chmod 700 "$dir/munge"
[[ -s /etc/munge/munge.key ]] || mungekey --create --keyfile=/etc/munge/munge.key 2>/dev/null \
  || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
chown root:root /etc/munge/munge.key
chmod 400 /etc/munge/munge.key

cpus=$(nproc --all)  # --all: plain nproc honours OMP_NUM_THREADS, which the test suite sets to 1
# RealMemory in MB: what `free` calls total, less 5% that SLURM must not hand out (the OS, these daemons).
mem_mb=$(free -m | awk '/^Mem:/ {print int($2 * 0.95)}')
if $multi; then
  # The nodes share this machine: each sees (and offers) all its CPUs, and gets an equal part of its memory.
  mem_mb=$((mem_mb / nodes))
  ctl_host=ctl ctl_addr=$net.2 cluster=gradlab$nodes
  names=$(node_names | paste -sd,)
  node_lines=$(for k in $(seq "$nodes"); do
    echo "NodeName=n$k NodeAddr=$net.$((10 + k)) CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN"; done)
  about="a $nodes-node cluster ($names: $cpus CPUs and $mem_mb MB each, all on this machine) on $net.0/24"
  # Per-node paths: slurmd expands %n to its node name.
  slurmd_paths="SlurmdSpoolDir=$dir/spool/%n
SlurmdPidFile=$dir/slurmd.%n.pid
SlurmdLogFile=$dir/slurmd.%n.log"
else
  host=$(hostname -s)
  ctl_host=$host ctl_addr=127.0.0.1 names=$host cluster=gradlab
  node_lines="NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN"
  about="a one-node cluster on $host ($cpus CPUs, $mem_mb MB), over 127.0.0.1 (no DNS)"
  slurmd_paths="SlurmdSpoolDir=$dir/spool
SlurmdPidFile=$dir/slurmd.pid
SlurmdLogFile=$dir/slurmd.log"
fi

cat > "$conf" <<EOF
# Written by scripts/slurm_local.sh: $about.
ClusterName=$cluster
SlurmctldHost=$ctl_host($ctl_addr)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# Lifetime of job credentials; it also holds a requeued job pending (Reason=BeginTime) for this long + 1 s
# (default 120 s, which is most of what a preemption test would wait for).
AuthInfo=socket=$dir/munge/munge.socket.2,cred_expire=10
StateSaveLocation=$dir/state
$slurmd_paths
SlurmctldPidFile=$dir/slurmctld.pid
SlurmctldLogFile=$dir/slurmctld.log
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
$node_lines
PartitionName=local Nodes=$names Default=YES MaxTime=INFINITE State=UP
EOF

if ! $multi; then
  if [[ ! -e /etc/slurm/slurm.conf ]]; then
    mkdir -p /etc/slurm
    ln -s "$conf" /etc/slurm/slurm.conf
  elif [[ $(readlink -f /etc/slurm/slurm.conf) != "$conf" ]]; then
    echo "note: /etc/slurm/slurm.conf is another cluster's; for this one: export SLURM_CONF=$conf"
  fi
fi

start() {  # start NAME PIDFILE CMD...: run the daemon unless its pid file names a live process
  local name=$1 pidfile=$2; shift 2
  pid_alive "$pidfile" && return 0
  "$@" || { echo "slurm_local.sh: $name did not start; see $dir/${name// /.}.log" >&2; exit 1; }
  for _ in $(seq 100); do pid_alive "$pidfile" && return 0; sleep 0.1; done
  echo "slurm_local.sh: $name wrote no pid file; see $dir/${name// /.}.log" >&2
  exit 1
}

namespace() {  # namespace HOST ADDR: network namespace gl-HOST at ADDR on the bridge, /etc/hosts of the cluster
  local ns=gl-$1 veth=gl-$1-br
  [[ -e /run/netns/$ns ]] && ip netns del "$ns"
  ip link del "$veth" 2>/dev/null || true
  ip netns add "$ns"
  ip link add "$veth" type veth peer name eth0 netns "$ns"
  echo 1 > "/proc/sys/net/ipv6/conf/$veth/disable_ipv6"
  ip link set "$veth" master "$bridge" up
  ip netns exec "$ns" sh -c "echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6"
  ip -n "$ns" addr add "$2/24" dev eth0
  ip -n "$ns" link set lo up
  ip -n "$ns" link set eth0 up
  mkdir -p "/etc/netns/$ns"
  { echo "127.0.0.1 localhost"; echo "$net.1 $(hostname -s)"; echo "$net.2 ctl"
    for k in $(seq "$nodes"); do echo "$net.$((10 + k)) n$k"; done; } > "/etc/netns/$ns/hosts"
}

if $multi; then
  if ! ip link show "$bridge" >/dev/null 2>&1; then
    ip link add "$bridge" type bridge
    echo 1 > "/proc/sys/net/ipv6/conf/$bridge/disable_ipv6"
    ip addr add "$net.1/24" dev "$bridge"
    ip link set "$bridge" up
  fi
  # With br_netfilter loaded, frames crossing a bridge go through iptables, whose rules (a FORWARD policy of
  # DROP, as Docker sets) can drop the nodes' traffic to each other; --stop restores the setting.
  nf=/proc/sys/net/bridge/bridge-nf-call-iptables
  if [[ -e $nf && $(cat $nf) != 0 ]]; then
    [[ -s $dir/bridge-nf-call-iptables.old ]] || cat $nf > "$dir/bridge-nf-call-iptables.old"
    echo 0 > $nf
  fi
  pid_alive "$dir/slurmctld.pid" || namespace ctl "$net.2"
  for n in $(node_names); do pid_alive "$dir/slurmd.$n.pid" || namespace "$n" "$net.$((10 + ${n#n}))"; done
fi

start munged "$dir/munged.pid" munged --socket="$dir/munge/munge.socket.2" --pid-file="$dir/munged.pid" \
  --log-file="$dir/munged.log" --seed-file="$dir/munge/munged.seed" --force
# -i: ignore state saved by an earlier run of this cluster (old jobs, a node left down).
if $multi; then
  # The daemon enters its network namespace (nsenter), and gets a hostname (--uts) and a mount namespace with
  # /etc/netns/gl-<host>/hosts over /etc/hosts (--mount; private, so the bind stays there) of its own. Not
  # `ip netns exec`: it remounts /sys, where slurmd then finds no cgroup filesystem. Its jobs inherit all three.
  in_ns() {
    local h=$1; shift
    nsenter --net="/run/netns/gl-$h" unshare --uts --mount \
      sh -c "mount --bind /etc/netns/gl-$h/hosts /etc/hosts && hostname $h && exec \"\$@\"" sh "$@"
  }
  start slurmctld "$dir/slurmctld.pid" in_ns ctl slurmctld -i
  for n in $(node_names); do start "slurmd $n" "$dir/slurmd.$n.pid" in_ns "$n" slurmd -N "$n"; done
else
  start slurmctld "$dir/slurmctld.pid" slurmctld -i
  start slurmd "$dir/slurmd.pid" slurmd
fi

for _ in $(seq 120); do
  states=$(sinfo -h -N -o %t 2>/dev/null | sort -u | paste -sd, || true)
  idle=$(sinfo -h -N -t idle,mix -o %N 2>/dev/null | wc -l || true)
  if ((idle == nodes)); then
    echo "SLURM is up: $about; node(s) $names idle in partition local; files in $dir"
    $multi && echo "use it with: export SLURM_CONF=$conf"
    sinfo
    exit 0
  fi
  sleep 0.5
done
echo "slurm_local.sh: node(s) $names not idle after 60 s (states: ${states:-none}); see $dir/slurmctld.log" >&2
exit 1
