#!/usr/bin/env bash
# Create the virtualenv at $1, installing Debian's python3-venv first if venv is missing.
set -euo pipefail
venv="$1"
python="${PYTHON:-python3}"
if [ -x "$venv/bin/python" ]; then exit 0; fi
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "dkv needs Python >= 3.11; $python is $("$python" --version 2>&1)" >&2; exit 1
fi
if ! "$python" -m venv "$venv" 2>/dev/null; then
    rm -rf "$venv"
    if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
        echo "installing python3-venv (Debian) ..." >&2
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
        "$python" -m venv "$venv"
    else
        echo "cannot create a virtualenv: install python3-venv (apt-get install python3-venv)" >&2; exit 1
    fi
fi
