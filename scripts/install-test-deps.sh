#!/usr/bin/env bash
# Installs what the tests and benchmarks need on a fresh Debian 12 machine, idempotently: a
# second run only checks and prints one line.
#   Debian packages: nginx, php-fpm, php-cli (mysqli, redis), MariaDB, Redis, HAProxy, wrk, hey,
#                    curl, rpm and cpio (package inspection), xfsprogs (a reflink filesystem
#                    for tests/reflink_xfs.rs), python3-venv, python3-matplotlib
#   crates.io:       cargo-deb and cargo-generate-rpm (the .deb and .rpm), pinned
#   PyPI:            moto (the SSM Parameter Store stand-in) with boto3, in a venv at
#                    $BGAGENT_MOTO_VENV, default <repo>/target/venv-moto: the testbed crate
#                    (crates/testbed) looks in the same place.
# Installing needs root; checking does not.
set -euo pipefail
cd "$(dirname "$0")/.."

pkgs=(nginx php-fpm php-cli php-mysql php-redis redis-server mariadb-server mariadb-client
      haproxy wrk hey curl procps rpm rpm2cpio cpio xfsprogs e2fsprogs python3-venv python3-matplotlib)
missing=()
for p in "${pkgs[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "error: missing Debian packages (${missing[*]}); run $0 as root to install them" >&2
    exit 1
  fi
  echo "installing Debian packages: ${missing[*]}"
  apt-get update -qq || { echo "error: apt-get update failed (network or sources.list?)" >&2; exit 1; }
  # policy-rc.d on build machines keeps apt from starting these services; tests start their own.
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" \
    >/dev/null || { echo "error: apt-get install ${missing[*]} failed" >&2; exit 1; }
fi
for bin in nginx mariadbd mariadb-install-db mariadb redis-server haproxy php kill; do
  command -v "$bin" >/dev/null 2>&1 || [ -x "/usr/sbin/$bin" ] || {
    echo "error: $bin is still missing after installing packages" >&2; exit 1; }
done
ls /usr/sbin/php-fpm* >/dev/null 2>&1 || { echo "error: no /usr/sbin/php-fpm* binary" >&2; exit 1; }

venv="${BGAGENT_MOTO_VENV:-$PWD/target/venv-moto}"
if ! { [ -x "$venv/bin/moto_server" ] && "$venv/bin/python" -c 'import moto, boto3, flask_cors' 2>/dev/null; }; then
  echo "installing moto into $venv"
  mkdir -p "$(dirname "$venv")"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check 'moto[ssm]' flask flask-cors boto3 \
    || { echo "error: pip install of moto into $venv failed (PyPI reachable?)" >&2; exit 1; }
fi
# The packagers, pinned: their output is checked file by file (tests/packaging/run.sh).
installed=$(cargo install --list)
for tool in cargo-deb@3.8.0 cargo-generate-rpm@0.21.1; do
  name=${tool%@*}; want=${tool#*@}
  if ! grep -qx "$name v$want:" <<<"$installed"; then
    echo "installing $tool from crates.io"
    cargo install --locked --quiet "$tool" || { echo "error: cargo install $tool failed" >&2; exit 1; }
  fi
done
echo "test dependencies are installed (moto venv: $venv)"
