#!/usr/bin/env bash
# Stop the cluster that start_slurm.sh STATE_DIR started: cancel its jobs, end slurmd,
# slurmctld and munged by the PIDs they recorded, and remove STATE_DIR (keep it with
# SLURM_TEST_KEEP_STATE=1, e.g. to read its logs).
set -uo pipefail
export PATH="$PATH:/usr/sbin:/sbin"

STATE="${1:-/tmp/sdxl-slurm}"
export SLURM_CONF="$STATE/slurm.conf"

pid_of() {  # the live process recorded in run/NAME.pid, or nothing
    local pid
    pid=$(cat "$STATE/run/$1.pid" 2>/dev/null) || return 0
    kill -0 "$pid" 2>/dev/null && echo "$pid"
}

stop() {  # TERM the recorded daemons together, KILL any still there after 10 s
    local pids=() name pid deadline=$((SECONDS + 10))
    for name in "$@"; do
        pid=$(pid_of "$name")
        [[ -n "$pid" ]] || continue
        pids+=("$pid")
        kill -TERM "$pid" 2>/dev/null
    done
    for pid in "${pids[@]}"; do
        while kill -0 "$pid" 2>/dev/null; do
            if ((SECONDS >= deadline)); then
                echo "stop_slurm: $pid ignored TERM, killing it" >&2
                kill -KILL "$pid" 2>/dev/null
                break
            fi
            sleep 0.1
        done
    done
}

if [[ -n "$(pid_of slurmctld)" ]]; then
    # Cancel the jobs (slurmd ends their processes) and give them a moment to go.
    scancel --quiet --partition=cpu,gpu 2>/dev/null
    for ((i = 0; i < 50; i++)); do
        [[ -z "$(squeue -h -t running,completing -o %i 2>/dev/null)" ]] && break
        sleep 0.1
    done
fi
stop slurmd slurmctld
stop munged
# The link start_slurm.sh made for SLURM commands that run without SLURM_CONF.
[[ "$(readlink /run/slurm/conf 2>/dev/null)" == "$STATE" ]] && rm -f /run/slurm/conf
[[ "${SLURM_TEST_KEEP_STATE:-0}" == 1 ]] || rm -rf "$STATE"
exit 0
