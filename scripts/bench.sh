#!/usr/bin/env bash
# Benchmark a fresh standalone node at 1 and 32 clients, then the bare zerorpc echo baseline.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
OPS="${OPS:-20000}"
port="${PORT:-7390}"
data="$(mktemp -d)"
.venv/bin/dkv serve --port "$port" --data-dir "$data" --log-level WARNING &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$data"' EXIT
$PY - "$port" <<'PYEOF'
import sys, time, dkv
deadline = time.monotonic() + 30
while True:
    try:
        dkv.Client(f"127.0.0.1:{sys.argv[1]}", timeout=0.5).info(); break
    except dkv.errors.DKVError:
        if time.monotonic() > deadline: raise
PYEOF
for clients in 1 32; do
    n=$(( clients == 1 ? OPS / 4 : OPS ))
    echo "== dkv bench, $clients client(s), 1:1 set:get"
    .venv/bin/dkv bench "127.0.0.1:$port" --clients "$clients" --ops "$n" --value-size 100 --ratio 1:1 --no-progress
    echo "== zerorpc echo baseline, $clients client(s)"
    $PY benchmarks/zerorpc_echo.py --clients "$clients" --ops "$n" --value-size 100
done
