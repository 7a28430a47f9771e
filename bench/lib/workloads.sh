# shellcheck shell=bash
# The workloads, in the order one tunnel goes through them. Each measurement is one call
# of lib/measure.py, which appends a JSON record to $RECORDS; a failed one counts in
# FAILURES (run.sh exits non-zero) but does not stop the run.

FAILURES=0

# measure SUBCOMMAND ARGS... -- one measure.py call, for the current tunnel and round.
measure() {
    if ! python3 "$BENCH_DIR/lib/measure.py" "$@" --out "$RECORDS" \
        --tunnel "${CUR_TUNNEL:-}" --round "${CUR_ROUND:-0}" >>"$WORK/logs/measure.log" 2>&1; then
        FAILURES=$((FAILURES + 1))
        log "FAILED: ${CUR_TUNNEL:-} $1 $(tail -n 1 "$WORK/logs/measure.log" | cut -c1-300)"
        return 1
    fi
}

# start_with_probe NAME UPSTREAM_PORT WORKLOAD -- start a tunnel under the start-up probe
# (workload 6); false when it did not answer a proxied 200 in time.
start_with_probe() {
    local t0file=$WORK/run/t0 i rc=0
    rm -f "$t0file" "$t0file.ready" "$t0file.tmp"
    spawn measure "$LOAD_CPU" python3 "$BENCH_DIR/lib/measure.py" startup --workload "$3" \
        --port "$(tunnel_port "$1")" --t0-file "$t0file" --timeout 30 --out "$RECORDS" \
        --tunnel "$CUR_TUNNEL" --round "$CUR_ROUND"
    local probe=$SPAWN_PID
    for ((i = 0; i < 500; i++)); do
        [[ -e $t0file.ready ]] && break
        sleep 0.01
    done
    start_tunnel "$1" "$2"
    printf '%s %s\n' "$SPAWN_T0" "${TUNNEL_PID:-0}" >"$t0file.tmp"
    mv "$t0file.tmp" "$t0file"
    wait "$probe" || rc=$?
    stop_pid "$probe"
    if ((rc)); then
        FAILURES=$((FAILURES + 1))
        log "FAILED: $1 start-up: no proxied 200 (see $WORK/logs/$1.log)"
        return 1
    fi
}

# run_throughput_workloads NAME ROUND -- workloads 6, 5, 1, 2, 3, 4 on a fresh tunnel.
run_throughput_workloads() {
    CUR_TUNNEL=$1 CUR_ROUND=$2
    local up pid port gw_listener=$GW_TLS_PORT h2_port n
    up=$(tunnel_upstream "$1" 0)
    [[ $1 == plain || $1 == direct ]] && gw_listener=0
    # 6. start-up: fork -> port accepting -> first proxied 200 (also the idle PSS).
    if [[ $1 == direct ]]; then
        start_tunnel direct "$up"
    elif ! start_with_probe "$1" "$up" startup; then
        log "$1 did not come up; skipping its workloads this round"
        stop_tunnel
        return 0
    fi
    pid=${TUNNEL_PID:-0} port=$TUNNEL_PORT
    h2_port=$port
    [[ $1 == direct ]] && h2_port=$BACKEND_H2_PORT # nginx speaks h2c on its own port
    # 5. memory: idle keep-alive connections held through the tunnel.
    for n in "${IDLE_COUNTS[@]}"; do
        measure idle --workload "idle_$n" --pid "$pid" --port "$port" --n "$n" --timeout 60 || true
    done
    # Warm-up, not recorded: fills caches and, for pooling tunnels, their pools.
    wrk -t1 -c"$CONNS" -d1s "http://127.0.0.1:$port/1k" >/dev/null 2>&1 || true
    # 1. keep-alive 1 KiB GETs.
    measure wrk --workload keepalive --pid "$pid" --port "$port" --conns "$CONNS" \
        --duration "$DURATION" || true
    # 2. a new connection per request; the gateway's full vs resumed handshakes.
    measure wrk --workload newconn --pid "$pid" --port "$port" --conns "$CONNS" \
        --duration "$DURATION" --close --gw-admin "$GW_ADMIN_PORT" --gw-listener "$gw_listener" || true
    # 3. h2c with prior knowledge.
    measure h2load --workload h2c --pid "$pid" --port "$h2_port" --conns "$CONNS" \
        --streams "$H2_STREAMS" --duration "$DURATION" || true
    # 4. bulk: download and upload.
    measure bulk --workload download --pid "$pid" --port "$port" --path /1g \
        --expect-bytes "$BULK_DOWN_BYTES" --timeout 120 || true
    measure bulk --workload upload --pid "$pid" --port "$port" --upload "$WORK/upload.bin" \
        --expect-bytes "$BULK_UP_BYTES" --timeout 120 || true
    save_runnel_metrics "$1" "throughput-r$2"
    stop_tunnel
}

# run_latency_workload NAME ROUND RTT_MS -- workload 7 through the delayed gateway ports.
run_latency_workload() {
    CUR_TUNNEL=$1 CUR_ROUND=$2
    local up
    up=$(tunnel_upstream "$1" 1)
    if start_with_probe "$1" "$up" "ready_rtt$3"; then
        measure latency --workload "rtt$3" --pid "${TUNNEL_PID:-0}" --port "$TUNNEL_PORT" \
            --n "$LAT_N" --warmup 10 --conc "$LAT_CONC" --timeout 120 \
            --samples-out "$RUN_DIR/samples/rtt$3-$1-r$2.txt" || true
    fi
    save_runnel_metrics "$1" "rtt$3-r$2"
    stop_tunnel
}

# save_runnel_metrics NAME LABEL -- runnel's own /metrics (pool hits, handshakes) next to
# the records, to explain its figures; other tunnels have no equivalent here.
save_runnel_metrics() {
    [[ $1 == runnel ]] || return 0
    curl -s --max-time 5 "http://127.0.0.1:$TUNNEL_ADMIN_PORT/metrics" \
        >"$RUN_DIR/runnel-metrics-$2.txt" 2>/dev/null || true
}

# delay_set RTT_MS ROUND -- (re)start the delayer for this RTT and check it took effect.
delay_set() {
    local rtt=$1 one_way measured
    CUR_TUNNEL=delayer CUR_ROUND=$2
    [[ -n ${DELAYER_PID:-} ]] && delay_off
    one_way=$(python3 -c "print($rtt / 2)")
    if ! delay_on "$one_way"; then
        FAILURES=$((FAILURES + 1))
        log "FAILED: NFQUEUE delayer did not start (see $WORK/logs/delayer.log); no workload 7"
        delay_off
        return 1
    fi
    measured=$(delay_check) || measured=0
    log "delayer: ${rtt} ms RTT asked, TCP connect to the delayed port takes $measured ms"
    printf '{"tunnel":"delayer","round":%s,"workload":"delay_check","rtt_ms":%s,"connect_ms":%s,"ok":true}\n' \
        "$2" "$rtt" "$measured" >>"$RECORDS"
}

write_meta() {
    local commit dirty
    commit=$(git -C "$REPO_DIR" rev-parse HEAD 2>/dev/null || echo "none (no commit yet)")
    dirty=$(git -C "$REPO_DIR" status --porcelain 2>/dev/null | wc -l)
    python3 - "$commit" "$dirty" <<EOF
import json, os, platform, sys
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
mem = next((l.split()[1] for l in open("/proc/meminfo") if l.startswith("MemTotal")), "0")
print(json.dumps({
    "stamp": "$STAMP", "command": "$COMMAND_LINE", "quick": $QUICK == 1,
    "commit": sys.argv[1], "uncommitted_files": int(sys.argv[2]),
    # A load average well above ~1.5 at the start means other work shared the machine.
    "loadavg_start": "$LOADAVG_START", "loadavg_end": open("/proc/loadavg").read().split()[:3],
    "machine": {"cpu": cpu, "cores": os.cpu_count(), "mem_gib": round(int(mem) / 2**20, 1),
                "kernel": platform.release(), "os": platform.freedesktop_os_release().get("PRETTY_NAME", "?")},
    "tunnels": "${TUNNELS[*]}".split(),
    "params": {"rounds": $ROUNDS, "duration_s": $DURATION, "conns": $CONNS,
               "h2_streams": $H2_STREAMS, "idle_counts": [$(IFS=,; echo "${IDLE_COUNTS[*]}")],
               "bulk_down_bytes": $BULK_DOWN_BYTES, "bulk_up_bytes": $BULK_UP_BYTES,
               "latency_requests": $LAT_N, "latency_concurrency": $LAT_CONC,
               "rtts_ms": [$(IFS=,; echo "${RTTS_MS[*]}")], "tunnel_cpu": $TUNNEL_CPU, "load_cpu": $LOAD_CPU},
}, indent=1))
EOF
}
