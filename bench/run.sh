#!/usr/bin/env bash
# runnel against Envoy, HAProxy, stunnel and nginx, side by side, in one run.
#
#   load generator --plain--> TUNNEL --mTLS--> Envoy gateway --> nginx backend
#
# Usage: bench/run.sh [--quick] [--only NAME,...] [--keep-work]
#   --quick       one round, short loads (< 5 min for all tunnels)
#   --only LIST   tunnels to measure: runnel envoy-tcp envoy-http haproxy stunnel nginx
#                 plain direct (default: all)
#   --keep-work   keep the work directory (configs, logs, PKI) after the run
# Environment: BENCH_WORK (work dir, default /tmp/runnel-bench), BENCH_PORT_BASE
# (default 18400; ports BASE..BASE+39 on 127.0.0.1), RUNNEL_BIN_PATH (default
# target/release/runnel, built first with `cargo build --release` as the Dockerfile does).
# See bench/README.md for what is measured and how to read the results.
set -Eeuo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export PYTHONDONTWRITEBYTECODE=1 # keep bench/lib free of __pycache__
REPO_DIR=$(cd "$BENCH_DIR/.." && pwd)
# shellcheck source=lib/common.sh
source "$BENCH_DIR/lib/common.sh"
# shellcheck source=lib/install.sh
source "$BENCH_DIR/lib/install.sh"
# shellcheck source=lib/pki.sh
source "$BENCH_DIR/lib/pki.sh"
# shellcheck source=lib/stack.sh
source "$BENCH_DIR/lib/stack.sh"
# shellcheck source=lib/tunnels.sh
source "$BENCH_DIR/lib/tunnels.sh"
# shellcheck source=lib/workloads.sh
source "$BENCH_DIR/lib/workloads.sh"

usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; }

QUICK=0
ONLY=""
KEEP_WORK=0
COMMAND_LINE="bench/run.sh $*"
while (($#)); do
    case $1 in
        --quick) QUICK=1 ;;
        --only) ONLY=${2:?--only needs a list}; shift ;;
        --only=*) ONLY=${1#--only=} ;;
        --keep-work) KEEP_WORK=1 ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; exit 2 ;;
    esac
    shift
done

TUNNELS=("${ALL_TUNNELS[@]}")
if [[ -n $ONLY ]]; then
    IFS=, read -r -a TUNNELS <<<"$ONLY"
    for t in "${TUNNELS[@]}"; do
        [[ " ${ALL_TUNNELS[*]} " == *" $t "* ]] || { echo "unknown tunnel: $t" >&2; exit 2; }
    done
fi

[[ $(id -u) == 0 ]] || { echo "bench/run.sh needs root (apt, iptables, NFQUEUE)" >&2; exit 2; }
(($(nproc) >= 2)) || { echo "bench/run.sh needs 2 cores (tunnel core + load core)" >&2; exit 2; }

# --- parameters ------------------------------------------------------------------------
if ((QUICK)); then
    ROUNDS=1 DURATION=3 IDLE_COUNTS=(1000) LAT_N=100 SPEED_SECONDS=1
    BULK_DOWN_BYTES=$((1 << 30)) BULK_UP_BYTES=$((256 << 20))
else
    ROUNDS=3 DURATION=8 IDLE_COUNTS=(1000 5000) LAT_N=300 SPEED_SECONDS=3
    BULK_DOWN_BYTES=$((1 << 30)) BULK_UP_BYTES=$((256 << 20))
fi
CONNS=32 H2_STREAMS=10 LAT_CONC=2 RTTS_MS=(1 5)
TUNNEL_CPU=1 LOAD_CPU=0 NFQUEUE_NUM=4242

PORT_BASE=${BENCH_PORT_BASE:-18400}
BACKEND_PORT=$((PORT_BASE + 1)) BACKEND_H2_PORT=$((PORT_BASE + 2))
GW_TLS_PORT=$((PORT_BASE + 10)) GW_TLS_DELAY_PORT=$((PORT_BASE + 11))
GW_PLAIN_PORT=$((PORT_BASE + 12)) GW_PLAIN_DELAY_PORT=$((PORT_BASE + 13))
GW_ADMIN_PORT=$((PORT_BASE + 19))
WORK=${BENCH_WORK:-/tmp/runnel-bench}
BODY_TEMP=/dev/shm/runnel-bench-body
export WORK BODY_TEMP BACKEND_PORT BACKEND_H2_PORT GW_TLS_PORT GW_TLS_DELAY_PORT \
    GW_PLAIN_PORT GW_PLAIN_DELAY_PORT GW_ADMIN_PORT

STAMP=$(date -u +%Y-%m-%dT%H%MZ)
((QUICK)) && STAMP+=-quick
# Two runs in one minute must not share a records file: the second would be merged in.
if [[ -e $REPO_DIR/bench/results/$STAMP.json || -e $WORK/out/$STAMP ]]; then
    STAMP=$(date -u +%Y-%m-%dT%H%M%SZ)
    ((QUICK)) && STAMP+=-quick
fi
RUN_DIR=$WORK/out/$STAMP
RECORDS=$RUN_DIR/records.jsonl

# --- set-up ----------------------------------------------------------------------------
trap cleanup EXIT
trap 'log "error: ${BASH_SOURCE[0]}:$LINENO: $BASH_COMMAND failed"' ERR
trap 'exit 130' INT
trap 'exit 143' TERM
rm -rf "$WORK/run" "$WORK/logs"
mkdir -p "$WORK/run" "$WORK/logs" "$RUN_DIR/samples"
# 5,000 idle connections need ~10,000 descriptors in a tunnel; the limit may be capped.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
(($(ulimit -n) >= 12000)) || die "need 12000 open files (ulimit -n), have $(ulimit -n)"
# Everything this script starts runs on the load core unless spawned on the tunnel core.
taskset -cp "$LOAD_CPU" $$ >/dev/null

LOADAVG_START=$(cut -d' ' -f1-3 /proc/loadavg)
log "run $STAMP: tunnels ${TUNNELS[*]}, $ROUNDS round(s), ${DURATION}s loads"
for p in $(seq "$PORT_BASE" $((PORT_BASE + 39))); do
    port_free "$p" || die "port $p is in use; set BENCH_PORT_BASE to another range"
done

need_tools
if [[ " ${TUNNELS[*]} " == *" runnel "* ]]; then
    RUNNEL_BIN=${RUNNEL_BIN_PATH:-$REPO_DIR/target/release/runnel}
    if [[ -z ${RUNNEL_BIN_PATH:-} ]]; then
        # As the image builds it: the build environment (no aws-lc CPU jitter entropy)
        # comes from .cargo/config.toml, as for every build; a no-op when fresh.
        log "building runnel (cargo build --release)"
        (cd "$REPO_DIR" && cargo build --release) \
            >>"$WORK/logs/cargo.log" 2>&1 \
            || die "cargo build --release failed (see $WORK/logs/cargo.log)"
    fi
    [[ -x $RUNNEL_BIN ]] || die "no runnel binary at $RUNNEL_BIN"
fi
make_pki
make_bodies
start_backend
start_gateway
log "backend and gateway up"

measure speed --cpu "$TUNNEL_CPU" --duration "$SPEED_SECONDS"

# --- rounds ----------------------------------------------------------------------------
for ((round = 1; round <= ROUNDS; round++)); do
    # Rotate the order each round so no tunnel always runs first or last.
    order=("${TUNNELS[@]:$(((round - 1) % ${#TUNNELS[@]}))}" "${TUNNELS[@]:0:$(((round - 1) % ${#TUNNELS[@]}))}")
    for name in "${order[@]}"; do
        log "round $round/$ROUNDS: $name"
        run_throughput_workloads "$name" "$round"
    done
    for rtt in "${RTTS_MS[@]}"; do
        delay_set "$rtt" "$round" || break
        for name in "${order[@]}"; do
            [[ $name == direct ]] && continue
            log "round $round/$ROUNDS: $name at ${rtt} ms RTT"
            run_latency_workload "$name" "$round" "$rtt"
        done
    done
    delay_off
done

# --- report ----------------------------------------------------------------------------
versions_json >"$RUN_DIR/versions.json"
write_meta >"$RUN_DIR/meta.json"
# Only a full run of every tunnel replaces the table in bench/README.md.
readme=()
((QUICK)) || [[ -n $ONLY ]] || readme=(--readme "$BENCH_DIR/README.md")
python3 "$BENCH_DIR/report.py" --run-dir "$RUN_DIR" --results "$BENCH_DIR/results" \
    --stamp "$STAMP" "${readme[@]}" >"$RUN_DIR/report.log"
((KEEP_WORK)) || rm -rf "$WORK/run" "$BODY_TEMP"

if ((FAILURES)); then
    log "$FAILURES measurement(s) failed; see the report and $WORK/logs"
    exit 1
fi
log "done: bench/results/$STAMP.md"
