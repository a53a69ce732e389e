#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for testing launch/slurm.sbatch for real:
# installs Debian's slurm-wlm and munge (apt-get), writes a minimal slurm.conf for this host and
# starts munged, slurmctld and slurmd directly (no systemd). Idempotent: a running cluster with
# this configuration is left alone (another configuration is replaced and the daemons
# restarted). Needs root (or passwordless sudo) and Debian/Ubuntu.
#   bash launch/install_slurm.sh          # install + start;  exit 0 when `sinfo` shows the node idle
# Exit status 3: Slurm cannot be installed here (no apt-get, not root, no package); the Slurm test
# then skips with that reason.
set -uo pipefail
log() { echo "[install_slurm] $*"; }
SUDO=""
if [ "$(id -u)" != 0 ]; then
  if sudo -n true 2>/dev/null; then SUDO="sudo -n"; else log "not root and no sudo: cannot install Slurm"; exit 3; fi
fi
HOST="$(hostname -s)"

ready() { timeout 10 sinfo -h -n "$HOST" -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated|completing)'; }

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
  command -v apt-get >/dev/null || { log "no apt-get: cannot install slurm-wlm here"; exit 3; }
  log "installing slurm-wlm and munge (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq >/dev/null 2>&1 || log "apt-get update failed (trying the cached lists)"
  if ! $SUDO apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null 2>&1; then
    log "apt-get install slurm-wlm munge failed"; exit 3
  fi
fi

# munge: the key the packages generated (or a new one), then the daemon as the munge user.
if [ ! -s /etc/munge/munge.key ]; then
  $SUDO mkdir -p /etc/munge
  $SUDO dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
$SUDO mkdir -p /run/munge /var/lib/munge /var/log/munge
$SUDO chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge 2>/dev/null || true
$SUDO chmod 0700 /etc/munge && $SUDO chmod 0400 /etc/munge/munge.key
if ! pgrep -x munged >/dev/null; then
  $SUDO runuser -u munge -- /usr/sbin/munged || { log "munged did not start"; exit 3; }
fi

# slurm.conf for one node: this host, its CPUs and memory. Process tracking by process tree
# (no cgroups in a container); KillWait is the grace between SIGTERM and SIGKILL when a job is
# cancelled, requeued or preempted (docs/operations.md uses the same number).
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s;
# 15 s keeps the requeue test short); the schedulers look for startable jobs every 2 s.
CONF_DIR=/etc/slurm
[ -d /etc/slurm-llnl ] && [ ! -d /etc/slurm ] && CONF_DIR=/etc/slurm-llnl
CPUS="$(nproc)"
MEM_MB="$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)"
$SUDO mkdir -p "$CONF_DIR" /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
CONF="$(mktemp)"
cat > "$CONF" <<EOF
# Written by launch/install_slurm.sh: a one-node test cluster.
ClusterName=local
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=15
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=2,sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
ReturnToService=2
KillWait=30
JobRequeue=1
MinJobAge=600
SlurmdParameters=config_overrides
NodeName=$HOST CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
if ! cmp -s "$CONF" "$CONF_DIR/slurm.conf"; then
  $SUDO cp "$CONF" "$CONF_DIR/slurm.conf"
  if pgrep -x slurmctld >/dev/null || pgrep -x slurmd >/dev/null; then
    log "configuration changed: restarting slurmctld and slurmd"
    $SUDO scontrol shutdown >/dev/null 2>&1 || true
    for _ in $(seq 1 20); do
      if ! pgrep -x slurmctld >/dev/null && ! pgrep -x slurmd >/dev/null; then break; fi
      sleep 0.5
    done
  fi
fi
rm -f "$CONF"
if pgrep -x slurmctld >/dev/null && pgrep -x slurmd >/dev/null && ready; then
  log "Slurm already running on $HOST"; exit 0
fi

pgrep -x slurmctld >/dev/null || $SUDO slurmctld || { log "slurmctld did not start (see /var/log/slurm/slurmctld.log)"; exit 3; }
pgrep -x slurmd >/dev/null || $SUDO slurmd || { log "slurmd did not start (see /var/log/slurm/slurmd.log)"; exit 3; }
for _ in $(seq 1 30); do
  if ready; then log "one-node Slurm up: $(sinfo -h -o '%P %D %T %c CPUs' | head -n1)"; exit 0; fi
  $SUDO scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true
  sleep 1
done
log "Slurm did not become ready: $(sinfo 2>&1 | tail -n2)"
exit 3
