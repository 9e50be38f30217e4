#!/usr/bin/env bash
# Stop the cluster that start_slurm.sh STATE_DIR started: cancel its jobs, then end slurmd,
# slurmctld and munged by the PIDs they recorded, and remove STATE_DIR.
set -uo pipefail

STATE="${1:-/tmp/sdxl-slurm}"
export SLURM_CONF="$STATE/slurm.conf"

stop_pid_file() {  # TERM the process in PID_FILE, KILL it after 10 s
    local pid_file=$1 pid i
    [[ -s "$pid_file" ]] || return 0
    pid=$(<"$pid_file")
    kill -TERM "$pid" 2>/dev/null || return 0
    for ((i = 0; i < 100; i++)); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    echo "stop_slurm: $pid_file ($pid) ignored TERM, killing it" >&2
    kill -KILL "$pid" 2>/dev/null
}

if [[ -s "$STATE/run/slurmctld.pid" ]]; then
    scancel --full --quiet --partition=cpu,gpu 2>/dev/null
    # Give slurmd a moment to end the jobs' steps before it goes itself.
    for ((i = 0; i < 50; i++)); do
        [[ -z "$(squeue -h -t running,completing -o %i 2>/dev/null)" ]] && break
        sleep 0.1
    done
fi
stop_pid_file "$STATE/run/slurmd.pid"
stop_pid_file "$STATE/run/slurmctld.pid"
stop_pid_file "$STATE/run/munged.pid"
# The link start_slurm.sh made for SLURM commands that run without SLURM_CONF.
[[ "$(readlink /run/slurm/conf 2>/dev/null)" == "$STATE" ]] && rm -f /run/slurm/conf
[[ "${SLURM_TEST_KEEP_STATE:-0}" == 1 ]] || rm -rf "$STATE"
