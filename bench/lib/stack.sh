# shellcheck shell=bash
# The fixed part of the path: the nginx backend and the Envoy gateway, started once per
# run on the load core, and the NFQUEUE delayer for workload 7.

make_bodies() {
    local www=$WORK/www
    mkdir -p "$www" "$BODY_TEMP"
    # Incompressible bodies, made once per work directory (the 1 GiB one takes seconds).
    # AES-CTR keystream: random-looking and fast; head closing the pipe ends openssl.
    [[ -s $www/1k ]] || head -c 1024 /dev/urandom >"$www/1k"
    [[ -s $www/64k ]] || head -c 65536 /dev/urandom >"$www/64k"
    if [[ ! -s $www/1g || $(stat -c %s "$www/1g") != "$BULK_DOWN_BYTES" ]]; then
        log "making a $((BULK_DOWN_BYTES >> 20)) MiB random body"
        openssl enc -aes-128-ctr -nosalt -pass pass:runnel-bench -in /dev/zero 2>/dev/null \
            | head -c "$BULK_DOWN_BYTES" >"$www/1g" || true
        [[ $(stat -c %s "$www/1g") == "$BULK_DOWN_BYTES" ]] || die "cannot make $www/1g"
    fi
    if [[ ! -s $WORK/upload.bin || $(stat -c %s "$WORK/upload.bin") != "$BULK_UP_BYTES" ]]; then
        openssl enc -aes-128-ctr -nosalt -pass pass:runnel-upload -in /dev/zero 2>/dev/null \
            | head -c "$BULK_UP_BYTES" >"$WORK/upload.bin" || true
        [[ $(stat -c %s "$WORK/upload.bin") == "$BULK_UP_BYTES" ]] || die "cannot make upload.bin"
    fi
}

start_backend() {
    render "$BENCH_DIR/configs/backend-nginx.conf.tmpl" "$WORK/run/backend-nginx.conf"
    spawn backend "$LOAD_CPU" nginx -e stderr -p "$WORK/run" -c "$WORK/run/backend-nginx.conf"
    BACKEND_PID=$SPAWN_PID
    wait_port 127.0.0.1 "$BACKEND_PORT" "$BACKEND_PID" 20 \
        || die "backend nginx did not start (see $WORK/logs/backend.log)"
}

start_gateway() {
    render "$BENCH_DIR/configs/gateway-envoy.yaml.tmpl" "$WORK/run/gateway-envoy.yaml"
    spawn gateway "$LOAD_CPU" "$ENVOY_BIN" -c "$WORK/run/gateway-envoy.yaml" --concurrency 1 \
        --disable-hot-restart --log-level warn
    GATEWAY_PID=$SPAWN_PID
    wait_port 127.0.0.1 "$GW_TLS_PORT" "$GATEWAY_PID" 30 \
        || die "gateway Envoy did not start (see $WORK/logs/gateway.log)"
    local code
    code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 \
        --cacert "$CA_PEM" --cert "$CLIENT_CERT" --key "$CLIENT_KEY" \
        --resolve "$GATEWAY_NAME:$GW_TLS_PORT:127.0.0.1" "https://$GATEWAY_NAME:$GW_TLS_PORT/1k")
    [[ $code == 200 ]] || die "gateway check over mTLS answered $code, not 200"
}

# delay_on ONE_WAY_MS -- queue the gateway's *_delay ports on lo to the delayer.
delay_on() {
    local port dir rule
    spawn "delayer" "$LOAD_CPU" python3 "$BENCH_DIR/lib/delayer.py" "$NFQUEUE_NUM" "$1"
    DELAYER_PID=$SPAWN_PID
    local i
    for ((i = 0; i < 200; i++)); do
        grep -q "delayer ready" "$WORK/logs/delayer.log" 2>/dev/null && break
        kill -0 "$DELAYER_PID" 2>/dev/null || return 1
        sleep 0.05
    done
    for port in "$GW_TLS_DELAY_PORT" "$GW_PLAIN_DELAY_PORT"; do
        for dir in --dport --sport; do
            rule="OUTPUT -o lo -p tcp $dir $port -j NFQUEUE --queue-num $NFQUEUE_NUM --queue-bypass"
            # shellcheck disable=SC2086
            iptables -I $rule || return 1
            IPTABLES_RULES+=("$rule")
        done
    done
}

delay_off() {
    local rule
    for rule in "${IPTABLES_RULES[@]}"; do
        # shellcheck disable=SC2086
        iptables -D $rule 2>/dev/null || true
    done
    IPTABLES_RULES=()
    stop_pid "${DELAYER_PID:-}"
    DELAYER_PID=
    : >"$WORK/logs/delayer.log"
}

# delay_check -- the measured RTT of a TCP connect to the delayed port, in ms.
delay_check() {
    python3 - "$GW_PLAIN_DELAY_PORT" <<'EOF'
import socket, sys, time
best = 1e9
for _ in range(5):
    t = time.perf_counter()
    socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5).close()
    best = min(best, (time.perf_counter() - t) * 1e3)
print(f"{best:.2f}")
EOF
}
