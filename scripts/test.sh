#!/usr/bin/env bash
# The test command (README.md): installs what the tests need on a fresh Debian 12 machine
# (Debian packages: nginx, php-fpm, MariaDB, Redis, HAProxy, wrk; moto from PyPI; cargo-deb
# and cargo-generate-rpm from crates.io), then runs every test suite, the packaging test and a
# smoke run of the benchmarks.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-test-deps.sh
cargo build --all-targets
cargo test --all-targets
# The .deb and .rpm, built from the test build and checked file by file; then the .deb
# installed with dpkg in a real systemd inside systemd-nspawn (postinst, the unit, the systemd
# backend, journald, removal and purge).
pkgs=$(tests/packaging/run.sh)
echo "$pkgs" | head -n -2
BGAGENT_DEB=$(echo "$pkgs" | tail -n 2 | head -n 1) tests/systemd/run.sh
# Benchmark smoke mode: proves the benchmark still runs; figures come from full runs by hand.
python3 bench/bench_release.py --smoke --bin target/debug/bgagent
python3 bench/bench_warm_switch.py --smoke --bin target/debug/bgagent --out target/bench-smoke
python3 bench/bench_blue_green.py --smoke --out target/bench-smoke
python3 bench/bench_magento_upgrade.py --smoke --bin target/debug/bgagent --out target/bench-smoke
python3 bench/bench_deploy_path.py --smoke --bin target/debug/bgagent > /dev/null
