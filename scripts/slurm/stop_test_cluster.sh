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
    for _ in $(seq 1 20); do
        [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break
        sleep 0.5
    done
fi
stop_pid_file() {  # $1: pid file; $2: command name it must be (a stale pid may be someone else's)
    local f="$1" name="$2" pid
    [ -f "$f" ] || return 0
    pid="$(cat "$f" 2>/dev/null)"
    if [ -n "$pid" ] && [ "$(cat /proc/"$pid"/comm 2>/dev/null)" = "$name" ]; then
        kill -TERM "$pid" 2>/dev/null
        for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$f"
}
stop_pid_file "$DIR/slurmd.pid" slurmd
stop_pid_file "$DIR/slurmctld.pid" slurmctld
stop_pid_file "$DIR/munge/munged.pid" munged
exit 0
