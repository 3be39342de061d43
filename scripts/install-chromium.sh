#!/usr/bin/env bash
# Install Debian's chromium for the browser test (tests/test_demo.py), only if it is missing.
# Quiet on success; any failure stops CI with apt's own message.
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if ! command -v sudo >/dev/null 2>&1; then
        echo "install-chromium: /usr/bin/chromium is missing and this user cannot run apt-get (no root, no sudo)" >&2
        exit 1
    fi
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null
if [ ! -x /usr/bin/chromium ]; then
    echo "install-chromium: apt-get finished but /usr/bin/chromium is still missing" >&2
    exit 1
fi
