# Everyday targets. `make run` and `make test` do all set-up themselves.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
ARGS   ?=
PYTEST_ARGS ?=

.PHONY: help install lint run test test-soak bench zookeeper clean

## help: this list of targets
help:
	@awk '/^## [a-z-]+:/ { sub(/^## /, ""); split($$0, a, ": "); printf "  %-15s %s\n", a[1], substr($$0, length(a[1]) + 3); next } \
	     /^##  / { sub(/^## +/, ""); printf "  %-15s %s\n", "", $$0 }' $(MAKEFILE_LIST)

## install: the virtualenv .venv with dkv (editable) and the test tools; redone when pyproject.toml changes
install: $(STAMP)

# pip's and setuptools' output (its "Editable installation" banner shows even with --quiet) goes
# to $(INSTALL_LOG), printed only if the install fails.
INSTALL_LOG := $(VENV)/install.log
QUIETLY = > $(INSTALL_LOG) 2>&1 || { cat $(INSTALL_LOG); echo "install failed (log: $(INSTALL_LOG))" >&2; exit 1; }

$(STAMP): pyproject.toml
	@PYTHON=$(PYTHON) scripts/bootstrap-venv.sh $(VENV)
	@echo "installing dkv and its dependencies into $(VENV) ..."
	@{ $(PY) -m pip install --quiet --upgrade pip && $(PY) -m pip install --quiet -e '.[test]'; } $(QUIETLY)
	@touch $(STAMP)

## run: a standalone node on 127.0.0.1:7000 (data in dkv-data/); ARGS="--port 7001" to change
run: install
	$(VENV)/bin/dkv serve $(ARGS)

## lint: ruff (lint rules, import order, formatting) and mypy over dkv/, as configured in pyproject.toml;
##       `$(VENV)/bin/ruff format dkv tests benchmarks examples scripts` fixes the formatting
lint: install
	$(VENV)/bin/ruff check dkv tests benchmarks examples scripts
	$(VENV)/bin/ruff format --check dkv tests benchmarks examples scripts
	$(PY) -m mypy dkv

## test: lint, then the whole suite (installs a local ZooKeeper when needed and possible)
test: install zookeeper lint
	$(PY) -m pytest -q $(PYTEST_ARGS)

## test-soak: the long fault scenarios too (e.g. twenty kill -9 failovers in a row, ten nemesis seeds)
test-soak: install zookeeper
	DKV_SOAK=1 $(PY) -m pytest -q tests/test_failover.py tests/test_nemesis.py $(PYTEST_ARGS)

## zookeeper: make sure the tests can get a ZooKeeper (Docker engine, local install, or DKV_TEST_ZK)
zookeeper:
	scripts/ensure-zookeeper.sh

## bench: dkv bench against a fresh node (1 and 32 clients) and the bare zerorpc echo baseline
bench: install
	scripts/bench.sh

## clean: remove the virtualenv and build leftovers
clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

.PHONY: zk-up zk-down cluster bench-cluster bench-vs-etcd

## zk-up: a ZooKeeper on 127.0.0.1:2181 (Docker Compose if an engine answers, else Debian's package; data in .dkv-zk/)
zk-up:
	scripts/zk.sh up

## zk-down: stop the ZooKeeper that zk-up started
zk-down:
	scripts/zk.sh down

## cluster: a local cluster (2 shards x 3 nodes, ports 7101-7106) in the foreground; Ctrl-C stops it.
##          ARGS="--fresh --shards 3" to change (see examples/cluster/README.md)
cluster: install zk-up
	$(PY) examples/cluster/run.py $(ARGS)

## bench-cluster: write throughput of a 1x3 cluster (write_quorum 2) beside a standalone node
bench-cluster: install zk-up
	$(PY) benchmarks/cluster_bench.py $(ARGS)

BENCH_STAMP := $(VENV)/.bench-stamp

$(BENCH_STAMP): pyproject.toml $(STAMP)
	@$(PY) -m pip install --quiet -e '.[test,bench]' $(QUIETLY)
	@touch $(BENCH_STAMP)

## bench-vs-etcd: dkv (1x3 cluster, write_quorum 2; and standalone) against a 3-member etcd, same load,
##                one after the other; prints a table and the dkv/etcd ratios (installs etcd-server if
##                missing). ARGS="--runs 3" for medians of 3, "--profile DIR" for py-spy profiles
bench-vs-etcd: $(BENCH_STAMP) zk-up
	scripts/ensure-etcd.sh >/dev/null
	$(PY) benchmarks/vs_etcd.py $(ARGS)
