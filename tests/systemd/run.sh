#!/usr/bin/env bash
# The unit and the systemd backend against a real systemd, booted inside systemd-nspawn (never
# on the host). Checks: Type=notify makes the unit active only after READY; the daemon answers
# `bgagent status` over its socket; a deployment through the daemon config-tests and reloads
# php8.2-fpm with systemctl; the log reaches the journal with bgagent's identifier.
# With BGAGENT_DEB=path/to/bgagent.deb the package is installed with dpkg inside the container
# (its postinst creates the group, enables and starts the unit) and removed and purged at the
# end; without it, the binary and unit files are bind-mounted.
# Needs root. The container root is cached in target/nspawn-root (debootstrap, ~2 min once).
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${BGAGENT_BIN:-target/debug/bgagent}
R=target/nspawn-root
fail() { echo "systemd test: FAIL: $*" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || { echo "systemd test: skipped (needs root)"; exit 0; }
for p in systemd-container debootstrap; do
  dpkg -s "$p" >/dev/null 2>&1 || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$p" >/dev/null
done
if [ ! -x "$R/usr/bin/systemctl" ]; then
  rm -rf "$R"
  debootstrap --variant=minbase \
    --include=systemd,systemd-sysv,dbus,nginx-light,php8.2-fpm,procps,curl,iproute2 \
    bookworm "$R" >/tmp/bgagent-debootstrap.log 2>&1 || { tail -20 /tmp/bgagent-debootstrap.log; fail "debootstrap"; }
fi
S=$(mktemp -d)
trap 'kill -TERM $NSPAWN 2>/dev/null; wait $NSPAWN 2>/dev/null; rm -rf "$S"' EXIT
mkdir -p "$S/etc" "$S/release/pub"
cat > "$S/etc/bgagent.yaml" <<'YAML'
app_root: /var/www/app
app: { kind: php, name: nspawn }
release: { shared_paths: [] }
permissions: { owner: root, group: www-data }
params: { source: file, path: /etc/bgagent/params.yaml }
templates: [ { source: /etc/bgagent/env.php.j2, target: app/etc/env.php, group: www-data } ]
services:
  backend: systemd
  list:
    - { name: php8.2-fpm, kind: php-fpm, test: [php-fpm8.2, -t] }
    - { name: nginx, kind: nginx }
YAML
echo '<?php echo "hello from nspawn";' > "$S/release/pub/index.php"
# A canary secret: it must reach env.php and nothing else (journal, status).
printf 'db:\n  password: "CANARY-nspawn-5ecret"\nsecure: [db.password]\n' > "$S/etc/params.yaml"
printf '<?php return [%s];\n' "'password' => {{ params.db.password }}" > "$S/etc/env.php.j2"
DEB=${BGAGENT_DEB:-}
if [ -n "$DEB" ]; then
  DEB=$(realpath "$DEB")
  install_binds=(--bind-ro="$DEB:/srv/bgagent.deb" --bind-ro="$S/etc/bgagent.yaml:/srv/test-bgagent.yaml")
else
  install_binds=(
    --bind-ro="$PWD/$BIN:/usr/bin/bgagent"
    --bind-ro="$PWD/systemd/bgagent.service:/etc/systemd/system/bgagent.service"
    --bind-ro="$PWD/systemd/bgagent.sysusers:/usr/lib/sysusers.d/bgagent.conf"
    --bind-ro="$PWD/systemd/bgagent.tmpfiles:/usr/lib/tmpfiles.d/bgagent.conf"
    --bind-ro="$S/etc/bgagent.yaml:/etc/bgagent/bgagent.yaml"
  )
fi
systemd-nspawn -D "$R" -b --register=no --keep-unit --private-network --console=pipe \
  --machine=bgtest --volatile=overlay \
  "${install_binds[@]}" \
  --bind-ro="$S/etc/params.yaml:/etc/bgagent/params.yaml" \
  --bind-ro="$S/etc/env.php.j2:/etc/bgagent/env.php.j2" \
  --bind-ro="$S/release:/srv/release" </dev/null >"$S/console.log" 2>&1 &
NSPAWN=$!
L=""
for _ in $(seq 100); do L=$(pgrep -P $NSPAWN -x systemd || true); [ -n "$L" ] && break; sleep 0.1; done
[ -n "$L" ] || { cat "$S/console.log"; fail "systemd did not start in the container"; }
ctr() { nsenter -t "$L" -a "$@"; }
for _ in $(seq 100); do
  st=$(ctr systemctl is-system-running 2>/dev/null || true)
  case "$st" in running|degraded) break;; esac; sleep 0.1
done
ctr systemctl start php8.2-fpm nginx || fail "php-fpm/nginx did not start"
if [ -n "$DEB" ]; then
  ctr dpkg -i /srv/bgagent.deb >"$S/dpkg.log" 2>&1 || { cat "$S/dpkg.log"; fail "dpkg -i"; }
  [ "$(ctr systemctl is-enabled bgagent.service)" = enabled ] || fail "the postinst did not enable bgagent.service"
  [ "$(ctr systemctl is-active bgagent.service)" = active ] || { ctr journalctl -u bgagent --no-pager | tail -20; fail "the postinst did not start bgagent.service with the packaged config"; }
  ctr getent group bgagent >/dev/null || fail "the postinst did not create the bgagent group"
  got=$(ctr stat -c "%a %U:%G" /var/lib/bgagent); [ "$got" = "750 root:bgagent" ] || fail "/var/lib/bgagent is $got, not 750 root:bgagent"
  [ "$(ctr stat -c %a /etc/bgagent/bgagent.yaml)" = 640 ] || fail "/etc/bgagent/bgagent.yaml is not 0640"
  # The packaged example config passes its own check.
  ctr bgagent --config /etc/bgagent/bgagent.yaml config check >"$S/check.log" 2>&1 || { cat "$S/check.log"; fail "the packaged config fails config check"; }
  ctr cp /srv/test-bgagent.yaml /etc/bgagent/bgagent.yaml
  ctr systemctl restart bgagent.service || { ctr journalctl -u bgagent --no-pager | tail -20; fail "bgagent.service did not restart"; }
else
  ctr systemd-sysusers >/dev/null 2>&1 || true
  ctr systemctl start bgagent.service || { ctr journalctl -u bgagent --no-pager | tail -20; fail "bgagent.service did not start"; }
fi
[ "$(ctr systemctl is-active bgagent.service)" = active ] || fail "bgagent.service is not active"
[ "$(ctr systemctl show -p Type --value bgagent.service)" = notify ] || fail "not Type=notify"
ctr test -S /run/bgagent/bgagent.sock || fail "no socket"
[ "$(ctr stat -c %a /run/bgagent/bgagent.sock)" = 660 ] || fail "socket mode is not 0660"
[ "$(ctr stat -c %G /run/bgagent/bgagent.sock)" = bgagent ] || fail "socket group is not bgagent"
pid_before=$(ctr systemctl show -p MainPID --value php8.2-fpm)
out=$(ctr bgagent deploy /srv/release 2>&1) || { echo "$out"; fail "deploy through the daemon failed"; }
grep -q "switched current to" <<<"$out" || { echo "$out"; fail "no switch in the deploy output"; }
grep -q "reloaded php8.2-fpm" <<<"$out" || { echo "$out"; fail "php8.2-fpm was not reloaded through systemctl"; }
ctr systemctl is-active php8.2-fpm >/dev/null || fail "php8.2-fpm is not active after the reload"
st=$(ctr bgagent status --json) || fail "status failed"
grep -q "\"daemon\": \"running\"" <<<"$st" || { echo "$st"; fail "status does not see the daemon"; }
found=""
for _ in $(seq 50); do  # journald may take a moment to index the entries
  # To a file first: with pipefail, `| tee | grep -q` fails when grep exits before tee is done.
  ctr journalctl -u bgagent.service -o json --no-pager > "$S/journal.json" || true
  if grep -q '"SYSLOG_IDENTIFIER":"bgagent"' "$S/journal.json"; then found=1; break; fi
  sleep 0.1
done
[ -n "$found" ] || { head -c 1500 "$S/journal.json"; fail "no journald entries from bgagent"; }
ctr grep -q CANARY-nspawn-5ecret /var/www/app/current/app/etc/env.php || fail "the secret did not reach env.php"
[ "$(ctr stat -c %a /var/www/app/current/app/etc/env.php)" = 640 ] || fail "env.php is not 0640"
if grep -q CANARY-nspawn-5ecret "$S/journal.json"; then fail "the secret reached the journal"; fi
if grep -q CANARY-nspawn-5ecret <<<"$st"; then fail "the secret reached status"; fi
if [ -n "$DEB" ]; then
  ctr dpkg -r bgagent >"$S/dpkg.log" 2>&1 || { cat "$S/dpkg.log"; fail "dpkg -r"; }
  st=$(ctr systemctl is-active bgagent.service || true)
  [ "$st" != active ] || fail "bgagent.service still runs after dpkg -r"
  ctr test -f /etc/bgagent/bgagent.yaml || fail "dpkg -r removed the config (only purge may)"
  ctr test -d /var/lib/bgagent || fail "dpkg -r removed the state"
  ctr dpkg --purge bgagent >"$S/dpkg.log" 2>&1 || { cat "$S/dpkg.log"; fail "dpkg --purge"; }
  ctr test ! -e /var/lib/bgagent || fail "dpkg --purge left /var/lib/bgagent"
  ctr test ! -e /etc/bgagent/bgagent.yaml || fail "dpkg --purge left the config"
  echo "systemd test: package installed, served a deployment, removed and purged"
else
  ctr systemctl stop bgagent.service || fail "stop"
fi
echo "systemd test: 1 passed, 0 failed"
