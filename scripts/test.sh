#!/usr/bin/env bash
# The test command (README.md): installs what the tests need on a fresh Debian 12 machine
# (Debian packages: nginx, php-fpm, MariaDB, Redis, HAProxy, wrk; moto from PyPI), then runs
# every test suite and a smoke run of the benchmarks.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-test-deps.sh
cargo build --all-targets
cargo test --all-targets
# The unit and the systemd backend against a real systemd inside systemd-nspawn.
tests/systemd/run.sh
# Benchmark smoke mode: proves the benchmark still runs; figures come from full runs by hand.
python3 bench/bench_release.py --smoke --bin target/debug/bgagent
