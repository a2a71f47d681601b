#!/usr/bin/env bash
# Make sure an etcd server binary is available for benchmarks/vs_etcd.py
# (`make bench-vs-etcd`): ETCD_BIN, or `etcd` on PATH, or Debian's etcd-server
# package, which this installs when it is missing and we may (root or
# password-less sudo, and apt-get). Prints the binary's path on success.
set -euo pipefail
if [ -n "${ETCD_BIN:-}" ]; then
    [ -x "$ETCD_BIN" ] || { echo "ETCD_BIN=$ETCD_BIN is not an executable" >&2; exit 1; }
    echo "$ETCD_BIN"; exit 0
fi
if command -v etcd >/dev/null; then command -v etcd; exit 0; fi
if command -v apt-get >/dev/null; then
    sudo=""
    if [ "$(id -u)" != 0 ]; then
        if sudo -n true 2>/dev/null; then sudo="sudo -n"; else
            echo "etcd is missing: run 'sudo apt-get install etcd-server' or set ETCD_BIN=/path/to/etcd" >&2
            exit 1
        fi
    fi
    echo "installing Debian's etcd-server package for the benchmark ..." >&2
    $sudo apt-get update -qq >&2
    # policy-rc.d-free containers may try to start the packaged service; we never use it.
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends etcd-server >/dev/null
    # The package's own service (if an init system started it) listens on 2379/2380; stop it so
    # only the benchmark's members run.
    if command -v systemctl >/dev/null && systemctl is-active --quiet etcd 2>/dev/null; then
        $sudo systemctl stop etcd >&2 || true
    fi
    command -v etcd >/dev/null || { echo "etcd-server installed but no etcd on PATH" >&2; exit 1; }
    command -v etcd; exit 0
fi
echo "etcd is missing: install etcd-server (Debian) or set ETCD_BIN=/path/to/etcd" >&2
exit 1
