#!/usr/bin/env bash
# Stop the cluster that slurm/local/start.sh started: cancel its jobs, then end the daemons named in its pid files
# (slurmd nodes, slurmctld, and munged only if start.sh started it). Nothing else is touched.
# LTM_SLURM_BASE selects the cluster (default /tmp/ltm-slurm); LTM_SLURM_PURGE=1 also deletes the base folder.
set -euo pipefail

BASE=${LTM_SLURM_BASE:-/tmp/ltm-slurm}
CONF=$BASE/etc/slurm.conf
log() { echo "[ltm-slurm] $*" >&2; }

[ -d "$BASE/run" ] || { log "nothing to stop under $BASE"; exit 0; }

# ours <pidfile> <command name>: the pid in the file runs that program (a stale file may name a reused pid)
ours() {
    [ -s "$1" ] || return 1
    local pid
    pid=$(cat "$1")
    [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$2" ]
}

# end <pidfile> <command name>: TERM, wait up to 10 s, then KILL
end() {
    ours "$1" "$2" || { rm -f "$1"; return 0; }
    local pid
    pid=$(cat "$1")
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
        log "$2 (pid $pid) did not exit on TERM; killing"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$1"
    log "stopped $2 (pid $pid)"
}

# Jobs first, while the controller and nodes still run, so that every job step ends through SLURM.
if ours "$BASE/run/slurmctld.pid" slurmctld && [ -f "$CONF" ]; then
    export SLURM_CONF=$CONF
    jobs=$(squeue -h -o '%i' 2>/dev/null || true)
    if [ -n "$jobs" ]; then
        log "cancelling jobs: $(echo "$jobs" | tr '\n' ' ')"
        # shellcheck disable=SC2086
        scancel $jobs 2>/dev/null || true
        for _ in $(seq 150); do
            [ -z "$(squeue -h -o '%i' 2>/dev/null)" ] && break
            sleep 0.2
        done
    fi
fi

for pidfile in "$BASE"/run/slurmd-*.pid; do
    [ -e "$pidfile" ] && end "$pidfile" slurmd
done
end "$BASE/run/slurmctld.pid" slurmctld
end "$BASE/run/munged.pid" munged

if [ "${LTM_SLURM_PURGE:-0}" = 1 ]; then
    rm -rf "$BASE"
    log "removed $BASE"
fi
