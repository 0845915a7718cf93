#!/usr/bin/env bash
# Makes sure a headless-capable Chromium is installed (Debian's `chromium` package) and prints the
# path of its binary. Installs it with apt-get when missing. Fails (never skips) when it cannot.
set -euo pipefail

find_chromium() {
    for name in chromium chromium-browser; do
        if command -v "$name" >/dev/null 2>&1; then
            command -v "$name"
            return 0
        fi
    done
    return 1
}

if ! find_chromium >/dev/null; then
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "ensure-chromium: chromium is not installed and apt-get is not available" >&2
        exit 1
    fi
    sudo=""
    if [ "$(id -u)" != "0" ]; then
        command -v sudo >/dev/null 2>&1 || { echo "ensure-chromium: need root or sudo to install chromium" >&2; exit 1; }
        sudo="sudo"
    fi
    echo "ensure-chromium: installing chromium with apt-get" >&2
    # Only one apt-get may run at a time: wait for the dpkg lock instead of failing at once.
    export DEBIAN_FRONTEND=noninteractive
    if ! $sudo apt-get install -y -o DPkg::Lock::Timeout=600 --no-install-recommends chromium >&2; then
        $sudo apt-get update -o DPkg::Lock::Timeout=600 >&2
        $sudo apt-get install -y -o DPkg::Lock::Timeout=600 --no-install-recommends chromium >&2
    fi
fi

path=$(find_chromium) || { echo "ensure-chromium: chromium is still missing after installing it" >&2; exit 1; }
"$path" --version >&2
echo "$path"
