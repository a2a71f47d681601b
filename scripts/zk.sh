#!/usr/bin/env bash
# Start, stop or check the ZooKeeper that dkv's cluster mode uses (`make zk-up`, `make cluster`).
#
#   scripts/zk.sh up | down | status
#
# With a Docker engine: the `zookeeper` service of docker-compose.yml.
# Without one: Debian's zookeeper package run as a background process on
# 127.0.0.1:$ZK_PORT, with its config, data, log and pid file under $ZK_DIR
# (the package is installed by scripts/ensure-zookeeper.sh when it is missing
# and we may: root or password-less sudo, and apt-get).
#
# Environment: ZK_PORT (default 2181), ZK_DIR (default .dkv-zk/ in the repo),
# ZK_START_TIMEOUT seconds to wait for the server to answer (default 60).
# Exit status: 0 done / running; 3 `status` found nothing running; 1 error.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
port="${ZK_PORT:-2181}"
dir="${ZK_DIR:-$root/.dkv-zk}"
pidfile="$dir/zookeeper.pid"
logfile="$dir/zookeeper.log"
jar=/usr/share/java/zookeeper.jar
start_timeout="${ZK_START_TIMEOUT:-60}"
where="127.0.0.1:$port"

say() { echo "zk.sh: $*"; }
die() { echo "zk.sh: $*" >&2; exit 1; }

# True when a ZooKeeper answers on $where. `ruok` may be refused by a server
# whose 4lw whitelist lacks it; that refusal still proves a ZooKeeper is there.
zk_answers() {
    local reply
    # shellcheck disable=SC2016  # $0 is expanded by the inner bash (it is the port)
    reply="$(timeout 3 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$0" || exit 1; printf ruok >&3; cat <&3' \
        "$port" 2>/dev/null)" || true
    [[ "$reply" == imok* || "$reply" == *whitelist* ]]
}

docker_engine() { command -v docker >/dev/null && timeout 5 docker info >/dev/null 2>&1; }

compose() {
    if docker compose version >/dev/null 2>&1; then
        docker compose "$@"
    elif command -v docker-compose >/dev/null; then
        docker-compose "$@"
    else
        die "a Docker engine answers but neither 'docker compose' nor 'docker-compose' is installed"
    fi
}

# The pid of the local ZooKeeper this script started, if it still runs (prints it).
local_pid() {
    local pid
    [ -f "$pidfile" ] || return 1
    pid="$(cat "$pidfile" 2>/dev/null)" || return 1
    [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q ZooKeeperServerMain || return 1
    echo "$pid"
}

# The id of the running compose `zookeeper` container, if any (prints it).
docker_container() {
    local id
    docker_engine || return 1
    id="$(compose ps -q zookeeper 2>/dev/null | head -n1)"
    [ -n "$id" ] && [ "$(docker inspect -f '{{.State.Running}}' "$id" 2>/dev/null)" = true ] || return 1
    echo "$id"
}

wait_answers() {  # wait_answers WHAT [PID]: poll until ZooKeeper answers, the pid dies, or the deadline
    local what="$1" pid="${2:-}" deadline=$((SECONDS + start_timeout))
    until zk_answers; do
        if [ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null; then
            tail -n 20 "$logfile" >&2 2>/dev/null || true
            die "$what exited before it answered; see $logfile"
        fi
        if [ "$SECONDS" -ge "$deadline" ]; then
            die "$what did not answer on $where within ${start_timeout}s${pid:+; see $logfile}"
        fi
        sleep 0.2
    done
}

local_up() {
    if [ ! -f "$jar" ] || ! command -v java >/dev/null; then
        say "no Docker engine and no local ZooKeeper: installing Debian's zookeeper package ..."
        # ensure-zookeeper.sh is a no-op when DKV_TEST_ZK is set; here we need the package itself.
        DKV_TEST_ZK='' "$root/scripts/ensure-zookeeper.sh"
        if [ ! -f "$jar" ] || ! command -v java >/dev/null; then die "ZooKeeper is still missing ($jar, java)"; fi
    fi
    mkdir -p "$dir/data"
    cat >"$dir/zoo.cfg" <<EOF
# written by scripts/zk.sh; a standalone ZooKeeper for dkv development
tickTime=2000
dataDir=$dir/data
clientPort=$port
clientPortAddress=127.0.0.1
admin.enableServer=false
4lw.commands.whitelist=ruok,srvr,stat,mntr,conf
EOF
    # setsid: its own session, so a Ctrl-C meant for `make cluster` does not stop it.
    setsid java -Xmx256m -cp "$jar" org.apache.zookeeper.server.ZooKeeperServerMain "$dir/zoo.cfg" \
        </dev/null >"$logfile" 2>&1 &
    local pid=$!
    echo "$pid" >"$pidfile"
    wait_answers "local ZooKeeper (pid $pid)" "$pid"
    say "ZooKeeper runs locally on $where (pid $pid; data $dir/data, log $logfile)"
}

local_down() {
    local pid="$1" deadline=$((SECONDS + 10))
    kill -TERM "$pid" 2>/dev/null || true
    while kill -0 "$pid" 2>/dev/null; do
        if [ "$SECONDS" -ge "$deadline" ]; then kill -KILL "$pid" 2>/dev/null || true; break; fi
        sleep 0.1
    done
    rm -f "$pidfile"
    say "stopped the local ZooKeeper (pid $pid); its data stays in $dir/data"
}

cmd_up() {
    local pid
    if pid="$(local_pid)"; then
        say "already running locally on $where (pid $pid; data $dir/data)"; return 0
    fi
    if zk_answers; then
        if docker_container >/dev/null; then
            say "already running in Docker (compose service zookeeper) on $where"
        else
            say "a ZooKeeper already answers on $where (not started by zk.sh); nothing to do"
        fi
        return 0
    fi
    rm -f "$pidfile"  # stale
    if docker_engine; then
        compose up -d zookeeper
        wait_answers "ZooKeeper container"
        say "ZooKeeper runs in Docker (compose service zookeeper) on $where"
    else
        local_up
    fi
}

cmd_down() {
    local pid stopped=""
    if pid="$(local_pid)"; then
        local_down "$pid"; stopped=1
    fi
    rm -f "$pidfile"
    if docker_container >/dev/null; then
        compose down  # the compose project's containers and network; named volumes stay
        say "stopped the Docker ZooKeeper (docker-compose.yml)"; stopped=1
    fi
    [ -n "$stopped" ] || say "no ZooKeeper started by zk.sh is running (nothing to stop)"
}

cmd_status() {  # reads only; changes nothing
    local pid
    if pid="$(local_pid)"; then
        if zk_answers; then
            say "running locally on $where (pid $pid; data $dir/data, log $logfile)"; return 0
        fi
        say "local ZooKeeper (pid $pid) does not answer on $where yet; see $logfile"; return 1
    fi
    if docker_container >/dev/null; then
        if zk_answers; then say "running in Docker (compose service zookeeper) on $where"; return 0; fi
        say "the Docker ZooKeeper runs but does not answer on $where yet"; return 1
    fi
    if zk_answers; then
        say "a ZooKeeper answers on $where (not started by zk.sh)"; return 0
    fi
    if [ -f "$pidfile" ]; then
        say "not running on $where (stale pid file $pidfile); start it with: make zk-up"
    else
        say "not running on $where; start it with: make zk-up"
    fi
    return 3
}

case "${1:-}" in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    *) echo "usage: scripts/zk.sh up|down|status   (env: ZK_PORT, ZK_DIR, ZK_START_TIMEOUT)" >&2; exit 2 ;;
esac
