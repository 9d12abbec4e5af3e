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

# the end-to-end tests drive real curl and openssl clients, and testssl.sh scans the TLS edge; the bench (and its quick run in
# the test suite) drives OpenSSH (sshd and ssh -R), HAProxy, iperf3 and wrk
SYSTEM_PACKAGES := curl wget openssl openssh-server openssh-client haproxy iperf3 wrk testssl.sh socat
system-deps:
	@if ! command -v curl >/dev/null || ! command -v wget >/dev/null || ! command -v openssl >/dev/null || ! command -v ssh >/dev/null \
			|| [ ! -x /usr/sbin/sshd ] || [ ! -x /usr/sbin/haproxy ] || ! command -v iperf3 >/dev/null \
			|| ! command -v wrk >/dev/null || ! command -v testssl >/dev/null || ! command -v socat >/dev/null; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		echo "make: installing Debian packages the tests drive: $(SYSTEM_PACKAGES)$${SUDO:+ (with sudo)}"; \
		$$SUDO apt-get update -qq && \
		$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SYSTEM_PACKAGES); \
	fi

# the full benchmark (about 15 minutes): burrow against direct, ssh -R and HAProxy, see bench/README.md;
# BENCH_ARGS="--quick" for a smoke run, "--scenarios 1,2 --profile" for py-spy profiles
bench: system-deps $(VENV)/.bench-installed
	$(BIN)/python -m bench.run $(BENCH_ARGS)

demo: $(VENV)/.demo-installed
	$(BIN)/burrow demo

lint: $(VENV)/.test-installed
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy
	cd native && cargo fmt --check
	cd native && PYO3_PYTHON=$(abspath $(BIN)/python) cargo clippy --quiet --all-targets --features python -- -D warnings

test: system-deps lint
	cd native && cargo test --quiet
	$(BIN)/pytest
	# the pure-Python data plane, while it remains selectable: the tests that drive a relay
	BURROW_ENGINE=asyncio $(BIN)/pytest -q -m "not slow" tests/e2e tests/faults tests/relay

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis native/target src/burrow/_native*.so
