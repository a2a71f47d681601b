#!/usr/bin/env bash
# Make sure the tests can get a real ZooKeeper (tests/support/zookeeper.py):
# DKV_TEST_ZK, or a Docker engine (testcontainers), or Debian's zookeeper package,
# which this installs when it is missing and we may (root, apt-get).
set -euo pipefail
if [ -n "${DKV_TEST_ZK:-}" ]; then exit 0; fi
if [ -f /usr/share/java/zookeeper.jar ] && command -v java >/dev/null; then exit 0; fi
if command -v docker >/dev/null && timeout 5 docker info >/dev/null 2>&1; then exit 0; fi
if command -v apt-get >/dev/null; then
    sudo=""
    if [ "$(id -u)" != 0 ]; then
        if sudo -n true 2>/dev/null; then sudo="sudo -n"; else
            echo "ZooKeeper is missing: run 'sudo apt-get install zookeeper' or set DKV_TEST_ZK=host:port" >&2
            exit 1
        fi
    fi
    echo "installing Debian's zookeeper package for the tests ..." >&2
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq zookeeper >/dev/null
    exit 0
fi
echo "ZooKeeper is missing: install it, start a Docker engine, or set DKV_TEST_ZK=host:port" >&2
exit 1
