# The two commands: `make run` and `make test`. Everything lives in .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARGS ?= --listen 127.0.0.1:5353 --log-format text

.PHONY: run test test-deps lint typecheck unit integration native clean

# The editable install itself compiles nothing (SIDECAR_BUILD_PURE=1); `native` then compiles the
# query path's modules in place with mypyc (setup.py, docs/architecture.md#compiled-modules),
# again whenever a source changes: a compiled module shadows its .py until it is built again.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	SIDECAR_BUILD_PURE=1 $(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

NATIVE := $(VENV)/.native
$(NATIVE): $(STAMP) setup.py $(shell find sidecar -name '*.py')
	$(BIN)/python setup.py --quiet build_ext --inplace --parallel 2 >$(VENV)/native.log 2>&1 \
		|| { cat $(VENV)/native.log; exit 1; }
	find sidecar -name '*.so' -exec touch {} +
	touch $(NATIVE)

native: $(NATIVE)

run: $(NATIVE)
	$(BIN)/dns-sidecar $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check sidecar tests fuzz setup.py
	$(BIN)/ruff format --check sidecar tests fuzz setup.py

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(NATIVE)
	$(BIN)/pytest -m "not integration" -q

integration: $(NATIVE)
	$(BIN)/pytest -m integration -q

# The Debian packages the tests run (nsd as the upstream; dig, kdig, drill as clients; promtool;
# ip and unshare for network namespaces, nft for the faults in them; gcc for `native`):
# installed as root with apt-get when missing, else `make test` stops at once naming them.
TEST_DEPS := nsd=nsd dig=dnsutils kdig=knot-dnsutils drill=ldnsutils promtool=prometheus \
	ip=iproute2 unshare=util-linux nft=nftables gcc=gcc

test-deps:
	bash .ci/install-deps.sh test $(TEST_DEPS)

test: test-deps $(NATIVE) lint typecheck
	$(BIN)/lint-imports --no-cache
	$(BIN)/pytest -q

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build
	find sidecar -name '*.so' -delete

# Hostile input, longer than CI runs it (CONTRIBUTING.md, Tests). Neither is part of `make test`, which
# runs the same fuzz harness for 20 s. `make fuzz` keeps its corpus in fuzz/corpus; a crash is
# saved as crash-* and fails the run. `make soak`: 10 minutes of valid and hostile traffic at
# 3000 datagrams/s against a sidecar in front of NSD on loopback; RSS and answers checked.
.PHONY: fuzz soak
FUZZ_SECONDS ?= 300
SOAK_SECONDS ?= 600
SOAK_QPS ?= 3000

fuzz: $(STAMP)
	$(BIN)/python fuzz/fuzz_wire.py fuzz/corpus -max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=1024

soak: $(STAMP)
	$(BIN)/python -m tests.soak --seconds $(SOAK_SECONDS) --qps $(SOAK_QPS)

# The benchmark against dnsmasq and Unbound (bench/README.md); not part of `make test` or CI.
# Installs dnsperf, nsd, dnsmasq and unbound from Debian when missing; into .venv the sidecar
# with the bench extra (matplotlib, py-spy) only, not the test extra, to keep a fresh machine fast.
.PHONY: bench bench-quick
BENCH_STAMP := $(VENV)/.bench-installed
BENCH_ARGS ?=

# The sidecar runs on Debian's python3.11, optimised as the image's interpreter is (bench/image.py):
# its venv module comes in python3.11-venv, installed when that import fails (the package has no
# command of its own, so install-deps.sh never finds it and installs it).
BENCH_DEPS := bash .ci/install-deps.sh bench dnsperf=dnsperf nsd=nsd dnsmasq=dnsmasq-base unbound=unbound taskset=util-linux
BENCH_VENV_DEP := /usr/bin/python3.11 -c 'import ensurepip, venv' 2>/dev/null || bash .ci/install-deps.sh bench python3.11-venv=python3.11-venv

$(BENCH_STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	SIDECAR_BUILD_PURE=1 $(BIN)/pip install --quiet -e '.[bench]'
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BENCH_DEPS)
	$(BENCH_VENV_DEP)
	$(BIN)/python -m bench.run $(BENCH_ARGS)

bench-quick: $(BENCH_STAMP)
	$(BENCH_DEPS)
	$(BENCH_VENV_DEP)
	$(BIN)/python -m bench.run --quick --out bench/results/quick $(BENCH_ARGS)

# A fleet of 50 sidecars polling Cloud Map (moto) through a throttling shim, 2 minutes
# (bench/README.md#fleet): aggregate calls against the bucket, the busiest second, the fleet
# size per account. Uses the test extra (moto, boto3, dnslib, dnspython).
.PHONY: bench-fleet
BENCH_FLEET_ARGS ?=

bench-fleet: $(STAMP)
	$(BIN)/python -m bench.fleet $(BENCH_FLEET_ARGS)

# What the application sees when a backend dies or slows down (bench/discovery/README.md):
# three DNS setups side by side in network namespaces, about 2 minutes; needs root. Installs nsd,
# dnsmasq-base and iproute2 from Debian when missing; into .venv only what the run imports (the
# bench extra and dnspython, not the test extra), so that a fresh machine stays under 5 minutes.
.PHONY: bench-discovery
BENCH_DISCOVERY_STAMP := $(VENV)/.bench-discovery-installed
BENCH_DISCOVERY_ARGS ?=

$(BENCH_DISCOVERY_STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	SIDECAR_BUILD_PURE=1 $(BIN)/pip install --quiet -e '.[bench]' 'dnspython>=2.6'
	touch $(BENCH_DISCOVERY_STAMP)

bench-discovery: $(BENCH_DISCOVERY_STAMP)
	bash .ci/install-deps.sh bench-discovery nsd=nsd dnsmasq=dnsmasq-base ip=iproute2
	$(BIN)/python -m bench.discovery $(BENCH_DISCOVERY_ARGS)
