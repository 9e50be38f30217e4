#!/usr/bin/env bash
# Start a single-node SLURM (munged, slurmctld, slurmd on 127.0.0.1, two fake GPUs) whose
# files all live under STATE_DIR; stop it with stop_slurm.sh STATE_DIR.
#   sudo tests/cluster/start_slurm.sh /tmp/sdxl-slurm; export SLURM_CONF=/tmp/sdxl-slurm/slurm.conf
# Environment: SLURM_TEST_CPUS (default nproc), SLURM_TEST_MEM_MB (default: physical memory),
# SLURM_TEST_CTLD_PORT / SLURM_TEST_SLURMD_PORT (default 6817 / 6818),
# SLURM_TEST_INSTALL=0 to never apt-get install the packages.
# Exit codes: 0 started, 2 cannot run here (not root, packages missing), 1 failed to start.
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"

HERE="$(cd "$(dirname "$0")" && pwd)"
STATE="${1:-/tmp/sdxl-slurm}"
NODE=testnode
PACKAGES=(slurm-wlm munge)
RUN_CONF=/run/slurm/conf
MARKER=sdxl-test-cluster

die() { echo "start_slurm: $1" >&2; exit "${2:-1}"; }

ensure_packages() {
    local missing=0 cmd
    for cmd in munged mungekey slurmctld slurmd sinfo sbatch srun squeue scontrol; do
        command -v "$cmd" >/dev/null 2>&1 || missing=1
    done
    [[ $missing == 0 ]] && return 0
    if [[ "${SLURM_TEST_INSTALL:-1}" != 1 ]] || ! command -v apt-get >/dev/null 2>&1; then
        die "SLURM is not installed and apt-get is not usable: install ${PACKAGES[*]}" 2
    fi
    echo "start_slurm: installing ${PACKAGES[*]}" >&2
    apt_install >/dev/null 2>&1 \
        || { apt-get update -q >/dev/null 2>&1 && apt_install >/dev/null; } \
        || die "apt-get install ${PACKAGES[*]} failed" 2
}

apt_install() {
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${PACKAGES[@]}"
}

memory_mb() {
    awk '/^MemTotal:/ { printf "%d\n", $2 / 1024 }' /proc/meminfo
}

fill_template() {
    sed -e "s|@STATE@|$STATE|g" -e "s|@NODE@|$NODE|g" -e "s|@HOST@|$(uname -n | cut -d. -f1)|g" \
        -e "s|@CTLD_PORT@|${SLURM_TEST_CTLD_PORT:-6817}|g" \
        -e "s|@SLURMD_PORT@|${SLURM_TEST_SLURMD_PORT:-6818}|g" \
        -e "s|@CPUS@|${SLURM_TEST_CPUS:-$(nproc)}|g" \
        -e "s|@MEM_MB@|${SLURM_TEST_MEM_MB:-$(memory_mb)}|g" \
        -e "s|@GPU0@|/dev/null|g" -e "s|@GPU1@|/dev/zero|g" "$1" > "$2"
}

start_munge() {
    mungekey --create --force --keyfile "$STATE/munge/munge.key"
    chmod 0600 "$STATE/munge/munge.key"
    munged --force --socket "$STATE/munge/munge.socket.2" --key-file "$STATE/munge/munge.key" \
        --pid-file "$STATE/run/munged.pid" --log-file "$STATE/log/munged.log" \
        --seed-file "$STATE/munge/munged.seed" \
        || die "munged failed: see $STATE/log/munged.log"
}

wait_for() {  # wait_for SECONDS WHAT COMMAND...: poll until COMMAND succeeds
    local deadline=$((SECONDS + $1)) what=$2
    shift 2
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || die "timed out waiting for $what (logs in $STATE/log)"
        sleep 0.5
    done
}

# SLURM commands without SLURM_CONF (the plugin's job step unsets every SLURM_* variable before
# it calls srun) read /etc/slurm/slurm.conf, else /run/slurm/conf/slurm.conf: link the latter
# to STATE, as slurmd does on a configless cluster. Never touch a configuration we did not make.
link_config() {
    [[ -e /etc/slurm/slurm.conf ]] \
        && die "/etc/slurm/slurm.conf exists: this machine has its own SLURM, use that"
    if [[ -e "$RUN_CONF" ]]; then
        [[ -e "$RUN_CONF/$MARKER" ]] || die "$RUN_CONF exists and is not a test cluster's"
        local pid
        pid=$(cat "$RUN_CONF/run/slurmctld.pid" 2>/dev/null || true)
        [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null \
            && die "another test cluster runs ($(readlink -f "$RUN_CONF")): stop it first"
    fi
    mkdir -p "$(dirname "$RUN_CONF")"
    ln -sfn "$STATE" "$RUN_CONF"
}

stop_on_failure() {  # keep the logs of a failed start, stop what did start
    SLURM_TEST_KEEP_STATE=1 "$HERE/stop_slurm.sh" "$STATE"
}

node_idle() {
    [[ "$(sinfo -h -N -n "$NODE" -o %T 2>/dev/null | head -1)" == idle ]]
}

main() {
    [[ $(id -u) == 0 ]] || die "must run as root (it starts munged, slurmctld and slurmd)" 2
    ensure_packages
    local pid
    pid=$(cat "$STATE/run/slurmctld.pid" 2>/dev/null || true)
    [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null \
        && die "$STATE holds a running cluster: stop_slurm.sh $STATE first"
    mkdir -p "$STATE"/{munge,run,log,ctld,slurmd}
    chmod 0755 "$STATE/munge"
    touch "$STATE/$MARKER"
    fill_template "$HERE/slurm.conf.in" "$STATE/slurm.conf"
    fill_template "$HERE/gres.conf.in" "$STATE/gres.conf"
    export SLURM_CONF="$STATE/slurm.conf"
    link_config
    trap stop_on_failure EXIT
    start_munge
    slurmctld -f "$SLURM_CONF" -i || die "slurmctld failed: see $STATE/log/slurmctld.log"
    wait_for 30 slurmctld scontrol ping
    slurmd -f "$SLURM_CONF" -N "$NODE" || die "slurmd failed: see $STATE/log/slurmd.log"
    wait_for 60 "node $NODE idle" node_idle
    trap - EXIT
    echo "SLURM_CONF=$SLURM_CONF"
}

main "$@"
