#!/usr/bin/env bash
# Creates or updates the project's Python virtualenv (.venv) with tests/requirements.txt,
# then prints the absolute path of the venv's python on stdout:
#
#     PY=$(scripts/python-env.sh)        # quiet: only errors, on stderr
#     scripts/python-env.sh -v           # show what it does
#
# Idempotent and fast: a stamp file in the venv holds the hash of the requirements and of
# the interpreter; when it matches, nothing is installed. PYTHON=/path/to/python3 picks the
# interpreter the venv is made from (default: python3.11, else python3).
set -euo pipefail

verbose=0
case "${1:-}" in
    -v|--verbose) verbose=1 ;;
    "") ;;
    *) echo "usage: $0 [-v]" >&2; exit 2 ;;
esac

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="$root/.venv"
requirements="$root/tests/requirements.txt"
stamp="$venv/.requirements.sha256"
venv_python="$venv/bin/python"

log() { if [ "$verbose" = 1 ]; then echo "python-env: $*" >&2; fi; }
die() { echo "python-env: error: $*" >&2; exit 1; }

# Runs a command, showing its output only with -v or when it fails.
run() {
    if [ "$verbose" = 1 ]; then
        "$@" >&2 || die "command failed: $*"
    else
        local out
        out=$("$@" 2>&1) || { echo "$out" >&2; die "command failed: $*"; }
    fi
}

pick_base_python() {
    if [ -n "${PYTHON:-}" ]; then echo "$PYTHON"; return; fi
    local candidate
    for candidate in python3.11 python3; do
        if command -v "$candidate" >/dev/null 2>&1; then command -v "$candidate"; return; fi
    done
    die "no python3 found (install python3.11 with pip and venv, or set PYTHON)"
}

[ -f "$requirements" ] || die "missing $requirements"

# One installer at a time (tests and CI may call this concurrently).
mkdir -p "$root/.work"
exec 9>"$root/.work/python-env.lock"
if command -v flock >/dev/null 2>&1; then flock 9; fi

base_python=$(pick_base_python)
"$base_python" -c 'import sys; sys.exit(sys.version_info < (3, 9))' 2>/dev/null \
    || die "$base_python is missing or older than Python 3.9"

# The venv is reused only if its interpreter still runs (a moved or upgraded base python
# leaves a dead venv behind).
if [ -x "$venv_python" ] && ! "$venv_python" -c '' 2>/dev/null; then
    log "removing broken virtualenv $venv"
    rm -rf "$venv"
fi
if [ ! -x "$venv_python" ]; then
    log "creating virtualenv $venv from $base_python"
    if ! "$base_python" -m venv "$venv" >/dev/null 2>&1; then
        # Debian ships ensurepip apart (python3-venv): make the venv bare and let the
        # interpreter's own pip bootstrap pip into it from PyPI.
        log "no ensurepip; bootstrapping pip into the virtualenv with $base_python -m pip"
        rm -rf "$venv"
        run "$base_python" -m venv --without-pip "$venv"
        "$base_python" -m pip --version >/dev/null 2>&1 \
            || die "$base_python has neither ensurepip (python3-venv) nor pip (python3-pip)"
        run "$base_python" -m pip --python "$venv_python" install --disable-pip-version-check -q pip
    fi
fi

want=$( { cat "$requirements"; "$venv_python" -c 'import sys; print(sys.version)'; } | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    log "requirements already installed"
else
    log "installing $requirements"
    rm -f "$stamp"
    run "$venv_python" -m pip install --disable-pip-version-check --no-input -q -r "$requirements"
    "$venv_python" -c 'import chdb, clickhouse_connect, pytest' 2>/dev/null \
        || die "packages installed but cannot be imported by $venv_python"
    echo "$want" > "$stamp"
fi

echo "$venv_python"
