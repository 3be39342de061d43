#!/usr/bin/env bash
# Install a Debian package that a test needs, only if the program it gives is missing:
#   scripts/install-debian.sh /usr/bin/chromium chromium      (tests/test_demo.py)
#   scripts/install-debian.sh /usr/bin/promtool prometheus    (tests/test_alerts.py)
# Quiet on success; any failure stops CI with apt's own message.
set -euo pipefail
if [ "$#" -ne 2 ]; then
    echo "usage: install-debian.sh PROGRAM PACKAGE" >&2
    exit 2
fi
program=$1
package=$2
if [ -x "$program" ]; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if ! command -v sudo >/dev/null 2>&1; then
        echo "install-debian: $program is missing and this user cannot run apt-get (no root, no sudo)" >&2
        exit 1
    fi
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "$package" >/dev/null
if [ ! -x "$program" ]; then
    echo "install-debian: apt-get installed $package but $program is still missing" >&2
    exit 1
fi
