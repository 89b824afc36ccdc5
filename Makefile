# kproxy — the two commands a newcomer needs are `make demo` and `make test`; both run `make setup`
# first, which installs everything on a fresh Debian machine (idempotent, seconds when done).
SHELL := /bin/bash
CARGO ?= cargo
export CARGO_TERM_COLOR ?= never

.PHONY: all setup build demo demo-down test test-kernels lint unit bench clean lab-up lab-down

all: build

setup:
	@bash xtask/setup.sh

build: setup
	@echo "[make] building kproxy (the first build compiles the eBPF object and all crates: a few minutes)"
	$(CARGO) build --all-targets

demo: build
	$(CARGO) xtask demo $(if $(KEEP),--keep,)

demo-down: setup
	$(CARGO) xtask demo-down

# clippy runs twice: on the host crates, and on the eBPF crate for the BPF target (nightly, as
# the agent's build script builds it), which the workspace's default members leave out.
lint: setup
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings
	$(CARGO) +nightly clippy -p kproxy-ebpf --target bpfel-unknown-none -Z build-std=core --release -- -D warnings

# Host unit tests, BPF_PROG_TEST_RUN packet tests and namespace end-to-end tests (root), then the
# kernel matrix: every program through the verifier of every kernel of xtask/kernels.list
# (booted with qemu), the packet tests that build no namespace on each, and the agent
# end-to-end tests on the oldest. The whole TEST_RUN suite on those kernels takes about an hour
# per kernel under emulation: `make test-kernels` runs it.
test: build lint
	@set -o pipefail; $(CARGO) test --no-fail-fast 2>&1 | tee target/test.log; rc=$$?; \
	  $(CARGO) xtask kernels --pure-testrun 2>&1 | tee -a target/test.log; krc=$$?; \
	  bash xtask/summary.sh target/test.log; [ $$rc -eq 0 ] && [ $$krc -eq 0 ]

# The kernel matrix alone; KERNELS=5.10,6.1 runs a subset; VERIFIER=1 only loads the programs
# with each kernel's verifier (minutes, for a datapath change in progress).
test-kernels: build
	$(CARGO) xtask kernels $(if $(KERNELS),--kernels $(KERNELS),) $(if $(VERIFIER),--verifier-only,)

bench: build
	$(CARGO) xtask bench $(if $(QUICK),--quick,)

lab-up: build
	$(CARGO) xtask lab up

lab-down:
	$(CARGO) xtask lab down

clean:
	$(CARGO) clean
