#!/usr/bin/env bash
# Set up everything the tests and the demo need on a Debian 12 machine:
# the Debian packages in requirements/apt.txt and a pinned virtualenv (.venv)
# from requirements/dev.txt. Safe to run again: it only does what is missing.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"

log() { printf '[bootstrap %s] %s\n' "$(date +%H:%M:%S)" "$*"; }

need_root() {
    if [ "$(id -u)" -ne 0 ]; then
        echo "bootstrap: must run as root (it installs Debian packages and later builds images)" >&2
        exit 1
    fi
}

apt_packages() {
    grep -vE '^\s*(#|$)' requirements/apt.txt
}

install_apt() {
    local missing=()
    local pkg
    for pkg in $(apt_packages); do
        if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
            missing+=("$pkg")
        fi
    done
    if [ "${#missing[@]}" -eq 0 ]; then
        log "Debian packages: all present"
        return
    fi
    need_root
    log "Debian packages: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
}

pick_python() {
    # ansible-core 2.19 runs on Python 3.11 (Debian 12's python3).
    # A virtualenv's own python is no base for a new .venv: look past .venv/bin
    # (test.sh puts it first on PATH) and skip any interpreter inside a venv.
    local cand found search_path
    search_path=$(printf '%s\n' "$PATH" | tr ':' '\n' | grep -vx "$PWD/.venv/bin" | paste -sd:)
    for cand in "${STIEFEL_PYTHON:-}" python3.11 python3; do
        [ -n "$cand" ] || continue
        found=$(PATH=$search_path command -v "$cand") || continue
        if "$found" -c 'import sys, venv; sys.exit(0 if sys.version_info[:2] >= (3, 11) and sys.prefix == sys.base_prefix else 1)' 2>/dev/null; then
            echo "$found"
            return
        fi
    done
    echo "bootstrap: no Python >= 3.11 with venv found" >&2
    exit 1
}

install_venv() {
    local stamp=.venv/.stiefel-requirements
    local want
    want=$(sha256sum requirements/dev.txt | cut -d' ' -f1)
    if [ -x .venv/bin/python ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
        log "virtualenv: up to date (.venv)"
        return
    fi
    if [ -x .venv/bin/python ] && .venv/bin/python -c 'import pip' 2>/dev/null; then
        # Update in place: removing .venv first would pull it from under every
        # process still running from it (other shells' tests, a molecule run).
        log "virtualenv: updating .venv to requirements/dev.txt"
    else
        local py
        py=$(pick_python)
        log "virtualenv: creating .venv with $py"
        rm -rf .venv
        "$py" -m venv .venv
        .venv/bin/python -m pip install -q --upgrade pip
    fi
    .venv/bin/python -m pip install -q -r requirements/dev.txt
    echo "$want" > "$stamp"
    log "virtualenv: ready ($(.venv/bin/ansible --version | sed -n 1p))"
}

install_apt
install_venv
