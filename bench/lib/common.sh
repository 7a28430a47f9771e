# shellcheck shell=bash
# shellcheck disable=SC2034 # SPAWN_T0 and friends are read by the other lib files
# Process ownership and small helpers shared by every part of the harness.
#
# Invariant: every process the harness starts goes through `spawn`, so its PID is in
# SPAWNED and `cleanup` (the EXIT trap) stops it, also on error or Ctrl-C. Nothing is
# ever killed by name.

SPAWNED=()          # PIDs started by spawn, stopped by cleanup
IPTABLES_RULES=()   # rules added by delay_on, removed by cleanup

log() { printf '%s bench: %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# spawn NAME CPU CMD... -- start CMD pinned to CPU, stdout+stderr to $WORK/logs/NAME.log.
# Sets SPAWN_PID and SPAWN_T0 (wall clock just before the fork, in seconds).
spawn() {
    local name=$1 cpu=$2
    shift 2
    SPAWN_T0=$EPOCHREALTIME
    taskset -c "$cpu" "$@" >>"$WORK/logs/$name.log" 2>&1 &
    SPAWN_PID=$!
    SPAWNED+=("$SPAWN_PID")
}

# descendants PID -- PID and all its descendants (nginx master -> worker).
descendants() {
    local pid=$1 child
    echo "$pid"
    for child in $(ps -o pid= --ppid "$pid" 2>/dev/null || true); do
        descendants "$child"
    done
}

# stop_pid PID -- TERM the process tree, wait up to 5 s, then KILL what is left.
stop_pid() {
    local pid=$1 tree i
    [[ -n $pid ]] || return 0
    tree=$(descendants "$pid")
    # shellcheck disable=SC2086
    kill -TERM $tree 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.05
    done
    # shellcheck disable=SC2086
    kill -KILL $tree 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    local kept=()
    for i in "${SPAWNED[@]}"; do [[ $i == "$pid" ]] || kept+=("$i"); done
    SPAWNED=("${kept[@]}")
}

cleanup() {
    local rc=$? pid rule
    trap - EXIT INT TERM
    for rule in "${IPTABLES_RULES[@]}"; do
        # shellcheck disable=SC2086
        iptables -D $rule 2>/dev/null || true
    done
    for pid in "${SPAWNED[@]}"; do stop_pid "$pid"; done
    exit "$rc"
}

# wait_port HOST PORT PID SECONDS -- poll until PORT accepts; fail early if PID died.
wait_port() {
    local host=$1 port=$2 pid=$3 deadline
    deadline=$(($(date +%s) + $4))
    while (($(date +%s) < deadline)); do
        if [[ -n $pid ]] && ! kill -0 "$pid" 2>/dev/null; then
            return 1
        fi
        if (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null; then
            return 0
        fi
        sleep 0.02
    done
    return 1
}

# port_free PORT -- true when nothing listens on 127.0.0.1:PORT.
port_free() { ! ss -Htln "sport = :$1" | grep -q .; }

# render TEMPLATE OUT -- substitute ${VARS} from the environment; a missing one is an error.
render() {
    python3 "$BENCH_DIR/lib/render.py" "$1" >"$2" || die "cannot render $1"
}
