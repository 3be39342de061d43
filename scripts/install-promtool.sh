#!/usr/bin/env bash
# Install Debian's prometheus (promtool) for the alert rules test (tests/test_alerts.py), only if it is missing.
# Quiet on success; any failure stops CI with apt's own message.
set -euo pipefail
if [ -x /usr/bin/promtool ]; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if ! command -v sudo >/dev/null 2>&1; then
        echo "install-promtool: /usr/bin/promtool is missing and this user cannot run apt-get (no root, no sudo)" >&2
        exit 1
    fi
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
if [ ! -x /usr/bin/promtool ]; then
    echo "install-promtool: apt-get finished but /usr/bin/promtool is still missing" >&2
    exit 1
fi
