#!/usr/bin/env bash
# Installs what the tests need on a fresh Debian 12 machine, idempotently (a second run only
# checks): nginx, php-fpm, php-cli, MariaDB, Redis, HAProxy, wrk from Debian's packages, and
# moto (the SSM Parameter Store stand-in) from PyPI into target/venv-moto.
set -euo pipefail
cd "$(dirname "$0")/.."

pkgs=(nginx php-fpm php-cli php-mysql php-redis redis-server mariadb-server mariadb-client
      haproxy wrk curl python3-venv)
missing=()
for p in "${pkgs[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "error: missing Debian packages (${missing[*]}); run this script as root to install them" >&2
    exit 1
  fi
  echo "installing: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

venv=target/venv-moto
if [ ! -x "$venv/bin/moto_server" ]; then
  echo "installing moto into $venv"
  mkdir -p target
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q 'moto[ssm]' flask flask-cors boto3
fi
echo "test dependencies are installed"
