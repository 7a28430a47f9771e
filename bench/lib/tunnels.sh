# shellcheck shell=bash
# shellcheck disable=SC2034 # ALL_TUNNELS and SPAWN_T0 are read by run.sh and workloads.sh
# The tunnels under test. Each one listens on its own loopback port, speaks plaintext
# downstream and mTLS to the same gateway listener with the same PKI (the two baselines
# excepted). `start_tunnel NAME UPSTREAM_PORT` starts one on the tunnel core and sets
# TUNNEL_PID (empty for direct), TUNNEL_PORT and SPAWN_T0 (for the start-up figure).

ALL_TUNNELS=(runnel envoy-tcp envoy-http haproxy stunnel nginx plain direct)

# tunnel_port NAME -- the downstream port of a tunnel.
tunnel_port() {
    case $1 in
        runnel) echo $((PORT_BASE + 20)) ;;
        envoy-tcp) echo $((PORT_BASE + 21)) ;;
        envoy-http) echo $((PORT_BASE + 22)) ;;
        haproxy) echo $((PORT_BASE + 23)) ;;
        stunnel) echo $((PORT_BASE + 24)) ;;
        nginx) echo $((PORT_BASE + 25)) ;;
        plain) echo $((PORT_BASE + 26)) ;;
        direct) echo "$BACKEND_PORT" ;;
        *) die "unknown tunnel $1" ;;
    esac
}

# tunnel_upstream NAME DELAYED(0|1) -- the gateway port a tunnel connects to.
tunnel_upstream() {
    if [[ $1 == plain ]]; then
        (($2)) && echo "$GW_PLAIN_DELAY_PORT" || echo "$GW_PLAIN_PORT"
    else
        (($2)) && echo "$GW_TLS_DELAY_PORT" || echo "$GW_TLS_PORT"
    fi
}

start_tunnel() {
    local name=$1
    TUNNEL_PORT=$(tunnel_port "$name")
    TUNNEL_PID=
    SPAWN_T0=$EPOCHREALTIME
    export TUNNEL_PORT UP_PORT=$2 TUNNEL_ADMIN_PORT=$((PORT_BASE + 30))
    [[ $name == direct ]] && return 0
    port_free "$TUNNEL_PORT" || die "port $TUNNEL_PORT (for $name) is already in use"
    local conf=$WORK/run/tunnel-$name
    case $name in
        runnel)
            # env -i: runnel refuses unknown RUNNEL_* variables, so pass exactly its own.
            spawn "$name" "$TUNNEL_CPU" env -i PATH="$PATH" \
                RUNNEL_LISTEN="127.0.0.1:$TUNNEL_PORT" RUNNEL_UPSTREAM="127.0.0.1:$UP_PORT" \
                RUNNEL_SERVER_NAME="$GATEWAY_NAME" RUNNEL_TLS_CA_FILE="$CA_PEM" \
                RUNNEL_TLS_CERT_FILE="$CLIENT_CERT" RUNNEL_TLS_KEY_FILE="$CLIENT_KEY" \
                RUNNEL_METRICS_ADDR="127.0.0.1:$TUNNEL_ADMIN_PORT" RUNNEL_WORKERS=1 \
                RUNNEL_LOG=info RUNNEL_LOG_FORMAT=json "$RUNNEL_BIN"
            ;;
        envoy-tcp | envoy-http)
            render "$BENCH_DIR/configs/tunnel-$name.yaml.tmpl" "$conf.yaml"
            spawn "$name" "$TUNNEL_CPU" "$ENVOY_BIN" -c "$conf.yaml" --concurrency 1 \
                --disable-hot-restart --log-level warn
            ;;
        haproxy | plain)
            render "$BENCH_DIR/configs/tunnel-$name.cfg.tmpl" "$conf.cfg"
            spawn "$name" "$TUNNEL_CPU" haproxy -db -f "$conf.cfg"
            ;;
        stunnel)
            render "$BENCH_DIR/configs/tunnel-stunnel.conf.tmpl" "$conf.conf"
            spawn "$name" "$TUNNEL_CPU" "$STUNNEL_BIN" "$conf.conf"
            ;;
        nginx)
            render "$BENCH_DIR/configs/tunnel-nginx.conf.tmpl" "$conf.conf"
            spawn "$name" "$TUNNEL_CPU" nginx -e stderr -p "$WORK/run" -c "$conf.conf"
            ;;
        *) die "unknown tunnel $name" ;;
    esac
    TUNNEL_PID=$SPAWN_PID
}

stop_tunnel() {
    [[ -n $TUNNEL_PID ]] || return 0 # direct: nothing of ours to stop
    stop_pid "$TUNNEL_PID"
    TUNNEL_PID=
    # The next tunnel may reuse ports; make sure this one's listener is gone.
    local i
    for ((i = 0; i < 100; i++)); do
        port_free "$TUNNEL_PORT" && return 0
        sleep 0.05
    done
    die "port $TUNNEL_PORT still in use after stopping its tunnel"
}
