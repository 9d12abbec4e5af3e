# The two entry points of the README: `make demo` and `make test`.
# Both set up everything they need from nothing but python3 (3.11+), make and a
# Rust toolchain (cargo): `pip install -e .` builds the native data plane with maturin.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: demo test lint unit setup system-deps bench clean rust

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# the native crate: a change to it rebuilds the extension at the next make demo/test
NATIVE := native/Cargo.toml $(wildcard native/Cargo.lock) $(shell find native/src -name "*.rs")

rust:
	@command -v cargo >/dev/null || { echo "make: burrow's data plane is Rust: install a Rust toolchain" \
		"(https://rustup.rs, or Debian's cargo), then run make again" >&2; exit 1; }

$(VENV)/.demo-installed: pyproject.toml $(NATIVE) | rust $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

# the test suite runs the bench's --quick mode too (tests/test_bench.py), so it needs the bench group
$(VENV)/.test-installed: pyproject.toml $(NATIVE) | rust $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test,bench]'
	touch $@

$(VENV)/.bench-installed: pyproject.toml $(NATIVE) | rust $(BIN)/python
	$(BIN)/pip install --quiet -e '.[bench]'
	touch $@

setup: $(VENV)/.test-installed

# what the tests and the bench drive, as COMMAND:DEBIAN-PACKAGE: real clients (curl, wget, openssl, Chromium, h2load
# with nghttpd, certutil, ssh, psql, redis-cli) and their throwaway servers (sshd, PostgreSQL, Redis, nginx with the
# PROXY protocol), testssl.sh on the TLS edge, the trust store `burrow trust` changes, systemd-analyze on deploy/'s
# systemd unit; the bench (and its quick run in the test suite) drives OpenSSH (sshd and ssh -R), HAProxy, iperf3,
# wrk, redis-benchmark and pgbench
SYSTEM_TOOLS := curl:curl wget:wget openssl:openssl ssh:openssh-client /usr/sbin/sshd:openssh-server \
	/usr/sbin/haproxy:haproxy iperf3:iperf3 wrk:wrk testssl:testssl.sh socat:socat chromium:chromium \
	h2load:nghttp2-client /usr/sbin/nghttpd:nghttp2-server certutil:libnss3-tools \
	update-ca-certificates:ca-certificates pg_ctlcluster:postgresql redis-server:redis-server redis-cli:redis-tools \
	/usr/sbin/nginx:nginx systemd-analyze:systemd
system-deps:
	@missing=""; for pair in $(SYSTEM_TOOLS); do \
		command -v "$${pair%%:*}" >/dev/null || missing="$$missing $${pair#*:}"; \
	done; \
	if [ -n "$$missing" ]; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		echo "make: installing Debian packages the tests drive:$$missing$${SUDO:+ (with sudo)}"; \
		$$SUDO apt-get update -qq && \
		$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

# the full benchmark (about 15 minutes): burrow against direct, ssh -R and HAProxy, see bench/README.md;
# BENCH_ARGS="--quick" for a smoke run, "--scenarios 1,2 --profile" for py-spy profiles
bench: system-deps $(VENV)/.bench-installed
	$(BIN)/python -m bench.run $(BENCH_ARGS)

demo: $(VENV)/.demo-installed
	$(BIN)/burrow demo

lint: $(VENV)/.test-installed
	$(BIN)/ruff check src tests bench examples
	$(BIN)/mypy
	cd native && cargo fmt --check
	cd native && PYO3_PYTHON=$(abspath $(BIN)/python) cargo clippy --quiet --all-targets --features python -- -D warnings

test: system-deps lint
	cd native && cargo test --quiet
	$(BIN)/pytest
	# the pure-Python data plane, while it remains selectable: the tests that drive a relay
	BURROW_ENGINE=asyncio $(BIN)/pytest -q -m "not slow" tests/e2e tests/faults tests/relay
	# the pure-Python agent, while it remains selectable: every test that drives an agent
	BURROW_AGENT_ENGINE=asyncio $(BIN)/pytest -q -m "not slow" tests/e2e tests/faults tests/agent

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis native/target src/burrow/_native*.so
