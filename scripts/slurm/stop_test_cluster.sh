#!/usr/bin/env bash
# Stop what scripts/slurm/start_test_cluster.sh started in DIR: by the pids in DIR's pid files
# only (never by name), cancelling the jobs first so that no job step outlives the daemons.
#   bash scripts/slurm/stop_test_cluster.sh [DIR]
set -uo pipefail
DIR="${1:-${SLURM_TEST_DIR:-${TMPDIR:-/tmp}/spmd_dp-slurm}}"
[ -d "$DIR" ] || exit 0
export SLURM_CONF="$DIR/slurm.conf"
if [ -f "$DIR/slurmctld.pid" ] && command -v scancel >/dev/null; then
    scancel --full --quiet --user="$(id -un)" >/dev/null 2>&1 || true
    # Give the steps a moment to go: slurmd ends them (KillWait) before it stops.
    for _ in $(seq 1 50); do
        [ -z "$(squeue -h -t all -o '%i %T' 2>/dev/null | grep -v -E 'COMPLETED|FAILED|CANCELLED|TIMEOUT|PREEMPTED|NODE_FAIL|OUT_OF_MEMORY|BOOT_FAIL|DEADLINE')" ] && break
        sleep 0.2
    done
fi
alive() {  # a zombie is gone (where PID 1 is slow to reap, kill -0 still succeeds on one)
    local state
    state="$(awk '{print $3}' /proc/"$1"/stat 2>/dev/null)" || return 1
    [ -n "$state" ] && [ "$state" != Z ] && [ "$state" != X ]
}
stop_pid_file() {  # $1: pid file; $2: command name it must be (a stale pid may be someone else's)
    local f="$1" name="$2" pid
    [ -f "$f" ] || return 0
    pid="$(cat "$f" 2>/dev/null)"
    if [ -n "$pid" ] && [ "$(cat /proc/"$pid"/comm 2>/dev/null)" = "$name" ] && alive "$pid"; then
        kill -TERM "$pid" 2>/dev/null
        for _ in $(seq 1 100); do alive "$pid" || break; sleep 0.1; done
        if alive "$pid"; then kill -KILL "$pid" 2>/dev/null; sleep 0.2; fi
    fi
    rm -f "$f"
}
stop_pid_file "$DIR/slurmd.pid" slurmd
stop_pid_file "$DIR/slurmctld.pid" slurmctld
stop_pid_file "$DIR/munge/munged.pid" munged
exit 0
