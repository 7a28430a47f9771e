# shellcheck shell=bash
# Shell helpers shared by tests/run.sh and tests/fuzz/run.sh (sourced, not run).

log() { printf '==> %s\n' "$*" >&2; }

# Runs a command as root: directly when we are root, else through sudo if there is one.
as_root() {
    if [[ $(id -u) == 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null; then
        sudo "$@"
    else
        return 1
    fi
}
