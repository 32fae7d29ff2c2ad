#!/usr/bin/env bash
# start_local_slurm.sh - bring up a REAL single-node SLURM cluster on localhost
# (Debian 12: slurm-wlm 22.05.8 + munge), with fake GPU GRES, for the cluster test
# (tests/test_slurm.py: `snakemake --profile profiles/slurm --profile profiles/slurm-ci`).
# .ci/run starts it before the test suite and stops it on exit. A test machine only: it
# overwrites /etc/slurm/slurm.conf, gres.conf and the munge key.
#
# Usage (as root):
#   bash tests/slurm/start_local_slurm.sh start   # install (apt) + configure + start + smoke test
#   bash tests/slurm/start_local_slurm.sh stop    # stop every daemon this script started (by pid file)
#   bash tests/slurm/start_local_slurm.sh status
#
# The partitions are named cpu and gpu; the test writes those names over the placeholders of
# profiles/slurm/config.yaml in its copy of the workflow. Without slurmdbd there is no accounting: any
# account name is accepted, and profiles/slurm-ci sets the squeue status command.
#
# Environment knobs (defaults in brackets):
#   SLURM_WITH_DBD      [0]  1 = also install mariadb-server + slurmdbd so that `sacct`
#                            works (plugin default status command); 0 = no accounting,
#                            then Snakemake MUST use `--slurm-status-command squeue`.
#   SLURM_BASE          [/tmp/ci-slurm]  state, logs, spool, fake GPU device nodes, db
#   SLURM_NODE_CPUS     [16]     CPUs advertised (can exceed real cores: config_overrides)
#   SLURM_NODE_MEM_MB   [131072] memory advertised (not enforced: no cgroups)
#   SLURM_NGPUS         [2]      number of fake GPUs
#   SLURM_GPU_TYPE      [testgpu] GRES type (for gpu_model= / --gpus=<type>:N)
#   SLURM_CPU_PARTITION [cpu]    default partition
#   SLURM_GPU_PARTITION [gpu]    second partition (same node)
#   SLURM_ACCOUNT       [ci]     account created when SLURM_WITH_DBD=1
#   SLURM_SKIP_APT      [0]      1 = packages already installed
#
# NOTE: the config is symlinked into /etc/slurm (the compiled-in default). Exporting
# SLURM_CONF is NOT enough: snakemake-executor-plugin-slurm-jobstep strips every SLURM_*
# variable before calling srun inside the job, so srun must find /etc/slurm/slurm.conf.
set -euo pipefail

ACTION="${1:-start}"
WITH_DBD="${SLURM_WITH_DBD:-0}"
BASE="${SLURM_BASE:-/tmp/ci-slurm}"
NODE_CPUS="${SLURM_NODE_CPUS:-16}"
NODE_MEM="${SLURM_NODE_MEM_MB:-131072}"
NGPUS="${SLURM_NGPUS:-2}"
GPU_TYPE="${SLURM_GPU_TYPE:-testgpu}"
CPU_PART="${SLURM_CPU_PARTITION:-cpu}"
GPU_PART="${SLURM_GPU_PARTITION:-gpu}"
ACCOUNT="${SLURM_ACCOUNT:-ci}"
HOST="$(hostname -s)"
ETC=/etc/slurm
T0=$(date +%s)

log() { printf '[%4ss] %s\n' "$(( $(date +%s) - T0 ))" "$*"; }
alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

stop_pidfile() {  # stop_pidfile NAME PIDFILE
  local name=$1 pf=$2 pid i
  if alive "$pf"; then
    pid=$(cat "$pf"); kill "$pid" 2>/dev/null || true
    for i in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
    log "stopped $name (pid $pid)"
  fi
  rm -f "$pf"
}

do_stop() {
  stop_pidfile slurmd     "$BASE/run/slurmd.pid"
  stop_pidfile slurmctld  "$BASE/run/slurmctld.pid"
  stop_pidfile slurmdbd   "$BASE/run/slurmdbd.pid"
  stop_pidfile mariadbd   "$BASE/mysql/mysqld.pid"
  stop_pidfile munged     "$BASE/run/munged.pid"
}

do_status() {
  for p in munged:run/munged.pid mariadbd:mysql/mysqld.pid slurmdbd:run/slurmdbd.pid \
           slurmctld:run/slurmctld.pid slurmd:run/slurmd.pid; do
    n=${p%%:*}; f=$BASE/${p#*:}
    if alive "$f"; then echo "$n: running (pid $(cat "$f"))"; else echo "$n: not running"; fi
  done
  sinfo 2>/dev/null || true
}

case "$ACTION" in
  stop) do_stop; exit 0 ;;
  status) do_status; exit 0 ;;
  start) ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac

[ "$(id -u)" = 0 ] || { echo "must run as root" >&2; exit 1; }

# ---------------------------------------------------------------- 1. packages
if [ "${SLURM_SKIP_APT:-0}" != 1 ]; then
  PKGS="munge slurm-wlm slurm-client"
  [ "$WITH_DBD" = 1 ] && PKGS="$PKGS slurmdbd mariadb-server"
  log "apt-get install $PKGS"
  # Package postinst scripts try to start services via invoke-rc.d; without systemd
  # that is skipped (or denied by policy-rc.d) - we start the daemons ourselves below.
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $PKGS \
    > "/tmp/start_local_slurm.apt.log" 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive \
         apt-get install -y -q --no-install-recommends $PKGS; }
  log "packages installed ($(slurmctld -V))"
fi

mkdir -p "$BASE"/{etc,state,spool,log,run,fakedev} "$ETC"

# ---------------------------------------------------------------- 2. munge
[ -s /etc/munge/munge.key ] || { mungekey --create --keyfile=/etc/munge/munge.key 2>/dev/null \
  || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none; }
chown munge:munge /etc/munge/munge.key; chmod 0400 /etc/munge/munge.key
mkdir -p /run/munge /var/lib/munge /var/log/munge
chown munge:munge /run/munge /var/lib/munge /var/log/munge; chmod 0755 /run/munge
if ! alive "$BASE/run/munged.pid"; then
  runuser -u munge -- /usr/sbin/munged --force
  # munged writes /run/munge/munged.pid; keep a copy under BASE for `stop`
  for i in $(seq 1 50); do [ -s /run/munge/munged.pid ] && break; sleep 0.1; done
  cp /run/munge/munged.pid "$BASE/run/munged.pid"
fi
munge -n | unmunge >/dev/null
log "munged up (pid $(cat "$BASE/run/munged.pid"))"

# ---------------------------------------------------------------- 3. fake GPUs
GRES_FILE_LINE=""
if [ "$NGPUS" -gt 0 ]; then
  ok=1
  for i in $(seq 0 $((NGPUS - 1))); do
    [ -c "$BASE/fakedev/nvidia$i" ] || mknod -m 666 "$BASE/fakedev/nvidia$i" c 1 3 2>/dev/null || ok=0
  done
  if [ "$ok" != 1 ]; then
    # no mknod permission (unprivileged container): regular files still let slurmd register
    # the GPUs (it logs "not a valid character or block device") and jobs get the GRES,
    # but CUDA_VISIBLE_DEVICES is then not set. (Count= without File= does NOT work for
    # gpu in 22.05: node goes INVAL "gres/gpu count reported lower than configured".)
    for i in $(seq 0 $((NGPUS - 1))); do rm -f "$BASE/fakedev/nvidia$i"; touch "$BASE/fakedev/nvidia$i"; done
  fi
  # char devices cloned from /dev/null (major 1, minor 3) -> CUDA_VISIBLE_DEVICES=0,1,...
  GRES_FILE_LINE="NodeName=$HOST Name=gpu Type=$GPU_TYPE File=$BASE/fakedev/nvidia[0-$((NGPUS - 1))]"
fi

# ---------------------------------------------------------------- 4. config files
if [ "$WITH_DBD" = 1 ]; then
  ACCT="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
AccountingStorageTRES=gres/gpu
AccountingStorageEnforce=associations
AccountingStoreFlags=job_comment
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30"
else
  ACCT="AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none"
fi
NODE_GRES=""; [ "$NGPUS" -gt 0 ] && NODE_GRES="Gres=gpu:$GPU_TYPE:$NGPUS"

cat > "$BASE/etc/slurm.conf" <<EOF
# generated by start_local_slurm.sh - single-node test cluster, NOT for production
ClusterName=ci
SlurmctldHost=${HOST}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$BASE/state
SlurmdSpoolDir=$BASE/spool
SlurmctldPidFile=$BASE/run/slurmctld.pid
SlurmdPidFile=$BASE/run/slurmd.pid
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# no cgroups needed (hence no cgroup.conf): plain process tracking, no binding
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
$ACCT
JobCompType=jobcomp/filetxt
JobCompLoc=$BASE/log/jobcomp.txt
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=500
# keep finished jobs visible to squeue/scontrol for 10 min (the plugin's squeue status check needs
# >= 3 * init-seconds-before-status-checks; tests/test_slurm.py reads the jobs' TRES afterwards)
MinJobAge=600
ReturnToService=2
InactiveLimit=0
KillWait=5
# advertise the configured CPUs/memory even if the VM is smaller
SlurmdParameters=config_overrides
GresTypes=gpu
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$NODE_CPUS RealMemory=$NODE_MEM $NODE_GRES State=UNKNOWN
PartitionName=$CPU_PART Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
PartitionName=$GPU_PART Nodes=$HOST Default=NO MaxTime=INFINITE State=UP
EOF

cat > "$BASE/etc/gres.conf" <<EOF
AutoDetect=off
$GRES_FILE_LINE
EOF

ln -sfn "$BASE/etc/slurm.conf" "$ETC/slurm.conf"
ln -sfn "$BASE/etc/gres.conf"  "$ETC/gres.conf"

# ---------------------------------------------------------------- 5. accounting (optional)
if [ "$WITH_DBD" = 1 ]; then
  DB=$BASE/mysql
  if ! alive "$DB/mysqld.pid"; then
    if [ ! -d "$DB/data/mysql" ]; then
      mkdir -p "$DB"
      mariadb-install-db --user=root --datadir="$DB/data" --skip-test-db \
        --auth-root-authentication-method=socket > "$DB/install.log" 2>&1
    fi
    /usr/sbin/mariadbd --user=root --datadir="$DB/data" --socket="$DB/mysqld.sock" \
      --pid-file="$DB/mysqld.pid" --bind-address=127.0.0.1 --port=3306 \
      --log-error="$DB/error.log" --innodb-buffer-pool-size=64M --innodb-lock-wait-timeout=900 \
      > /dev/null 2>&1 &
    for i in $(seq 1 100); do mariadb-admin --socket="$DB/mysqld.sock" ping >/dev/null 2>&1 && break; sleep 0.2; done
  fi
  mariadb --socket="$DB/mysqld.sock" -e "
    CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm';
    CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
    CREATE DATABASE IF NOT EXISTS slurm_acct_db;
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
    FLUSH PRIVILEGES;"
  log "mariadb up (pid $(cat "$DB/mysqld.pid"))"

  cat > "$BASE/etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=3306
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
LogFile=$BASE/log/slurmdbd.log
PidFile=$BASE/run/slurmdbd.pid
DebugLevel=info
EOF
  chmod 600 "$BASE/etc/slurmdbd.conf"
  ln -sfn "$BASE/etc/slurmdbd.conf" "$ETC/slurmdbd.conf"
  alive "$BASE/run/slurmdbd.pid" || /usr/sbin/slurmdbd
  for i in $(seq 1 100); do sacctmgr -n list cluster >/dev/null 2>&1 && break; sleep 0.2; done
  sacctmgr -n list cluster format=cluster | grep -qw ci || sacctmgr -i add cluster ci >/dev/null
  sacctmgr -n list account format=account | grep -qw "$ACCOUNT" \
    || sacctmgr -i add account "$ACCOUNT" Description=ci Organization=ci >/dev/null
  sacctmgr -i add user root Account="$ACCOUNT" DefaultAccount="$ACCOUNT" >/dev/null 2>&1 || true
  log "slurmdbd up (pid $(cat "$BASE/run/slurmdbd.pid")), account '$ACCOUNT' registered"
fi

# ---------------------------------------------------------------- 6. slurm daemons
fail() {  # fail MESSAGE LOGFILE: say why, show the daemon's last log lines, exit
  echo "start_local_slurm.sh: $1" >&2
  tail -n 20 "$2" >&2 2>/dev/null || true
  exit 1
}
alive "$BASE/run/slurmctld.pid" || /usr/sbin/slurmctld -i
for i in $(seq 1 100); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.2; done
scontrol ping 2>/dev/null | grep -q UP || fail "slurmctld did not come up" "$BASE/log/slurmctld.log"
alive "$BASE/run/slurmd.pid" || /usr/sbin/slurmd -N "$HOST"
st=""
for i in $(seq 1 150); do
  st=$(sinfo -h -N -o %T 2>/dev/null | head -1 || true)
  case "$st" in idle*|mixed*|alloc*) break ;; esac
  sleep 0.2
done
[ -n "$st" ] || fail "slurmd did not register with slurmctld" "$BASE/log/slurmd.log"
[ "$st" = idle ] || { scontrol update nodename="$HOST" state=resume 2>/dev/null || true; sleep 1; }
log "slurmctld + slurmd up: $(sinfo -h -N -o '%N %P %T %G' | tr '\n' ';')"

# ---------------------------------------------------------------- 7. smoke test
WD=$(mktemp -d)
if [ "$NGPUS" -gt 0 ]; then
  JID=$(sbatch --parsable -p "$GPU_PART" --gres=gpu:1 -t 2 -D "$WD" -o "$WD/smoke.out" \
    --wrap 'echo "gpu-job CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-none}"; srun -n1 true')
else
  JID=$(sbatch --parsable -p "$CPU_PART" -t 2 -D "$WD" -o "$WD/smoke.out" --wrap 'echo cpu-job; srun -n1 true')
fi
for i in $(seq 1 300); do   # poll (sbatch --wait backs off to multi-second sleeps)
  JS=$(scontrol show job -o "$JID" | sed -n 's/.*JobState=\([A-Z_]*\).*/\1/p')
  case "$JS" in COMPLETED|FAILED|CANCELLED|TIMEOUT|NODE_FAIL|OUT_OF_MEMORY) break ;; esac
  sleep 0.2
done
[ "$JS" = COMPLETED ] || { echo "smoke test job $JID ended in state '$JS'" >&2; cat "$WD/smoke.out" >&2 || true; exit 1; }
log "smoke test job $JID: $(cat "$WD/smoke.out") ($(scontrol show job -o "$JID" | grep -o 'TresPer[A-Za-z]*=[^ ]*'))"
rm -rf "$WD"
if [ "$WITH_DBD" = 1 ]; then   # job records reach slurmdbd asynchronously
  for i in $(seq 1 50); do sacct -X -n -j "$JID" -o State | grep -q COMPLETED && break; sleep 0.2; done
  log "sacct: $(sacct -X -n -j "$JID" -o JobID,Account,State,AllocTRES%45 | tr -s ' ')"
fi
log "local SLURM ready (WITH_DBD=$WITH_DBD). Stop with: bash $0 stop"
