#!/usr/bin/env bash
# The shipped package on a production-shaped Magento node: a real systemd booted inside
# systemd-nspawn (never on the host), the .deb installed with dpkg, the shipped unit with its
# hardening, and CodeDeploy's side played faithfully: the revision unpacked with `tar -xpsf`
# into <deployment-root>/<group-id>/<deployment-id>/deployment-archive, and each lifecycle
# event run as the agent runs it (`su root -c <archive>/scripts/bgagent-hook`, the wrapper the
# package ships, with CodeDeploy's environment and nothing else).
#
# The release is shaped like a built Magento 2 tree: app/etc/config.php, bin/magento,
# generated/, var/, pub/static, pub/media, vendor/ with symlinks inside. The packaged config is
# used with its defaults (permission policy with owner and group, writable dirs 2770, shared
# paths, the systemd backend reloading php8.2-fpm, the health check at
# http://127.0.0.1/health_check.php) and changed only where the test must: the params file and
# the env.php template.
#
# Checks: postinst (group, state dir, enable + start), Type=notify, the socket's group and
# mode, a first and a second deployment through the hooks (modes and owners on disk, shared
# links, vendor symlinks, env.php, php-fpm reloaded through systemctl, nginx serving the new
# release), the journal (identifier, no secret), removal and purge.
#
#   BGAGENT_DEB=path/to/bgagent.deb tests/systemd/run.sh
#
# Without BGAGENT_DEB the .deb is built from target/debug/bgagent with cargo-deb. Needs root.
# The container root is cached in target/nspawn-root (debootstrap, ~2 min once).
set -euo pipefail
cd "$(dirname "$0")/../.."
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
DEB=${BGAGENT_DEB:-}
if [ -z "$DEB" ]; then
  mkdir -p target/pkg-nspawn
  packaging/gen-assets.sh target/debug/bgagent || fail "packaging/gen-assets.sh"
  cargo deb --no-build --no-strip --fast --profile dev -o target/pkg-nspawn/ >target/pkg-nspawn/deb.log 2>&1 \
    || { cat target/pkg-nspawn/deb.log; fail "cargo deb (build target/debug/bgagent first)"; }
  DEB=$(ls -t target/pkg-nspawn/*.deb | head -n 1)
fi
DEB=$(realpath "$DEB")
S=$(mktemp -d)
NSPAWN=""
trap '[ -n "$NSPAWN" ] && { kill -TERM $NSPAWN 2>/dev/null; wait $NSPAWN 2>/dev/null; }; rm -rf "$S"' EXIT

# --- The test's few changes to the packaged config --------------------------------------
mkdir -p "$S/etc"
# The packaged drain ends on evidence: no load balancer probes /ready in here, so a drain
# goes on at once (checked after the second deployment), without a shortened delay.
cp packaging/bgagent.yaml "$S/etc/bgagent.yaml"
grep -q '^drain:' "$S/etc/bgagent.yaml" || fail "packaging/bgagent.yaml has no drain section"
cat >> "$S/etc/bgagent.yaml" <<'YAML'
# --- added by tests/systemd/run.sh ---
params: { source: file, path: /etc/bgagent/params.yaml }
templates:
  - { source: /etc/bgagent/env.php.j2, target: app/etc/env.php, group: www-data }
commands:
  AfterInstall:
    - { argv: [bin/magento, setup:di:compile] }
YAML
# The same with one more command: what SIGHUP (systemctl reload) must take between events.
cp "$S/etc/bgagent.yaml" "$S/etc/bgagent-reloaded.yaml"
printf '  ApplicationStop:\n    - { argv: [echo, config-reloaded] }\n' >> "$S/etc/bgagent-reloaded.yaml"
# An invalid edit: refused by `systemctl reload` and by the daemon, the running config kept.
sed -e 's/^  keep: 5$/  keep: lots/' "$S/etc/bgagent.yaml" > "$S/etc/bgagent-invalid.yaml"
grep -q 'keep: lots' "$S/etc/bgagent-invalid.yaml" || fail "packaging/bgagent.yaml has no release.keep line to break"
# A canary secret: it must reach env.php and nothing else (journal, status).
printf 'db:\n  password: "CANARY-nspawn-5ecret"\nsecure: [db.password]\n' > "$S/etc/params.yaml"
printf "<?php return ['db' => ['connection' => ['default' => ['password' => %s]]]];\n" \
  "{{ params.db.password }}" > "$S/etc/env.php.j2"
# nginx serves current/pub through $realpath_root, as a Magento node does.
cat > "$S/etc/nginx-site" <<'NGINX'
server {
  listen 127.0.0.1:80 default_server;
  root /var/www/magento/current/pub;
  index index.php;
  location ~ \.php$ {
    include /etc/nginx/fastcgi_params;
    fastcgi_param SCRIPT_FILENAME $realpath_root$fastcgi_script_name;
    fastcgi_param DOCUMENT_ROOT $realpath_root;
    fastcgi_pass unix:/run/php/php8.2-fpm.sock;
  }
}
NGINX

# --- A built Magento 2 tree, as the build would bundle it -------------------------------
# $1: directory, $2: release tag (printed by index.php)
magento_tree() {
  local d=$1 tag=$2
  mkdir -p "$d"/{app/etc,bin,generated/code/Magento/Framework,generated/metadata,var/cache,var/view_preprocessed} \
    "$d"/pub/{static/frontend/Magento/luma/en_US/css,media} "$d"/scripts \
    "$d"/vendor/{magento/framework/App,laminas/laminas-cli/bin,bin,composer}
  printf "<?php\nreturn ['modules' => ['Magento_Store' => 1, 'Magento_Theme' => 1]];\n" > "$d/app/etc/config.php"
  # bin/magento as a build leaves it; this stand-in writes to stdout and to stderr.
  printf '#!/usr/bin/env php\n<?php\nrequire __DIR__ . "/../vendor/autoload.php";\necho "Compilation was started.\\n";\nfwrite(STDERR, "Deprecated: a notice on stderr\\n");\necho "Generated code and dependency injection configuration successfully.\\n";\n' > "$d/bin/magento"
  chmod 0644 "$d/bin/magento"   # not executable in the artifact: the policy makes it so
  echo '<?php class Interceptor {}' > "$d/generated/code/Magento/Framework/Interceptor.php"
  echo 'a:0:{}' > "$d/generated/metadata/global.php"
  echo 'compiled' > "$d/var/view_preprocessed/.keep"
  echo "body{}" > "$d/pub/static/frontend/Magento/luma/en_US/css/styles-m.css"
  echo "1700000000" > "$d/pub/static/deployed_version.txt"
  printf '<?php echo "release=%s";\n' "$tag" > "$d/pub/index.php"
  printf '<?php echo "OK";\n' > "$d/pub/health_check.php"
  echo '<?php // composer autoload' > "$d/vendor/autoload.php"
  echo '<?php namespace Magento\Framework\App; class Bootstrap {}' > "$d/vendor/magento/framework/App/Bootstrap.php"
  printf '#!/usr/bin/env php\n<?php echo "laminas";\n' > "$d/vendor/laminas/laminas-cli/bin/laminas"
  chmod 0755 "$d/vendor/laminas/laminas-cli/bin/laminas"
  # composer's relative links: a file link in vendor/bin and a directory link.
  ln -s ../laminas/laminas-cli/bin/laminas "$d/vendor/bin/laminas"
  ln -s ../magento/framework "$d/vendor/composer/framework-link"
  echo "$tag" > "$d/RELEASE_ID"
}
for n in 1 2; do
  rev="$S/rev$n"
  magento_tree "$rev" "r$n"
  # The bundle carries appspec.yml and the wrapper (the package's copies, see below).
  (cd "$rev" && tar -cf "$S/bundle$n.tar" .)
done

systemd-nspawn -D "$R" -b --register=no --keep-unit --private-network --console=pipe \
  --machine=bgtest --volatile=overlay \
  --bind-ro="$DEB:/srv/bgagent.deb" --bind-ro="$S:/srv/t" </dev/null >"$S/console.log" 2>&1 &
NSPAWN=$!
L=""
for _ in $(seq 100); do L=$(pgrep -P $NSPAWN -x systemd || true); [ -n "$L" ] && break; sleep 0.1; done
[ -n "$L" ] || { cat "$S/console.log"; fail "systemd did not start in the container"; }
# A clean environment in the container: nothing of the host's leaks into the commands.
ctr() { nsenter -t "$L" -a env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 "$@"; }
journal() { ctr journalctl -u bgagent.service --no-pager "$@" 2>/dev/null | tail -40; }
for _ in $(seq 100); do
  st=$(ctr systemctl is-system-running 2>/dev/null || true)
  case "$st" in running|degraded) break;; esac; sleep 0.1
done
ctr cp /srv/t/etc/nginx-site /etc/nginx/sites-enabled/default
ctr systemctl restart php8.2-fpm nginx || fail "php-fpm/nginx did not start"

# --- Install -------------------------------------------------------------------------------
ctr dpkg -i /srv/bgagent.deb >"$S/dpkg.log" 2>&1 || { cat "$S/dpkg.log"; fail "dpkg -i"; }
[ "$(ctr systemctl is-enabled bgagent.service)" = enabled ] || fail "the postinst did not enable bgagent.service"
[ "$(ctr systemctl is-active bgagent.service)" = active ] || { journal; fail "the postinst did not start bgagent.service with the packaged config"; }
ctr getent group bgagent >/dev/null || fail "the postinst did not create the bgagent group"
got=$(ctr stat -c "%a %U:%G" /var/lib/bgagent); [ "$got" = "2750 root:bgagent" ] || fail "/var/lib/bgagent is $got, not 2750 root:bgagent"
[ "$(ctr stat -c %a /etc/bgagent/bgagent.yaml)" = 640 ] || fail "/etc/bgagent/bgagent.yaml is not 0640"
# The packaged example config passes its own check.
ctr bgagent --config /etc/bgagent/bgagent.yaml config check >"$S/check.log" 2>&1 || { cat "$S/check.log"; fail "the packaged config fails config check"; }
for f in bgagent.yaml params.yaml env.php.j2; do ctr cp /srv/t/etc/$f /etc/bgagent/$f; done
ctr bgagent config check >"$S/check.log" 2>&1 || { cat "$S/check.log"; fail "the test's config fails config check"; }
ctr systemctl restart bgagent.service || { journal; fail "bgagent.service did not restart"; }
[ "$(ctr systemctl is-active bgagent.service)" = active ] || fail "bgagent.service is not active"
[ "$(ctr systemctl show -p Type --value bgagent.service)" = notify ] || fail "not Type=notify"
ctr test -S /run/bgagent/bgagent.sock || fail "no socket"
[ "$(ctr stat -c %a /run/bgagent/bgagent.sock)" = 660 ] || fail "socket mode is not 0660"
[ "$(ctr stat -c %G /run/bgagent/bgagent.sock)" = bgagent ] || fail "socket group is not bgagent"

# --- CodeDeploy's side ---------------------------------------------------------------------
ROOT=/opt/codedeploy-agent/deployment-root
GROUP=5f0e2c1a-7d4b-4a3e-9c1d-2b8e6f4a9d10
# unpack N DEPLOYMENT_ID: what the agent's Install step does with a tar bundle.
unpack() {
  local a="$ROOT/$GROUP/$2/deployment-archive"
  ctr mkdir -p "$a"
  ctr tar -xpsf "/srv/t/bundle$1.tar" -C "$a" || fail "unpacking bundle $1"
  ctr install -m 0644 /usr/share/bgagent/hooks/appspec.yml "$a/appspec.yml"
  ctr install -m 0755 /usr/share/bgagent/hooks/bgagent-hook "$a/scripts/bgagent-hook"
}
# hook EVENT DEPLOYMENT_ID: the agent's `su root -c <location>` with its environment.
hook() {
  local out="$S/hook-$2-$1.log"
  if ! ctr LIFECYCLE_EVENT="$1" DEPLOYMENT_ID="$2" APPLICATION_NAME=magento \
      DEPLOYMENT_GROUP_NAME=prod DEPLOYMENT_GROUP_ID="$GROUP" \
      BUNDLE_BUCKET=artifacts BUNDLE_KEY="magento/$2.tar" BUNDLE_VERSION=v1 BUNDLE_ETAG=e \
      su root -c "$ROOT/$GROUP/$2/deployment-archive/scripts/bgagent-hook" >"$out" 2>&1; then
    tail -c 3000 "$out"; journal; fail "$1 of $2 failed"
  fi
}
pid_before=$(ctr systemctl show -p MainPID --value php8.2-fpm)
D1=d-NSPAWN0001
unpack 1 $D1
for ev in BeforeInstall AfterInstall ApplicationStart ValidateService; do hook $ev $D1; done
grep -q "switched current to" "$S/hook-$D1-ApplicationStart.log" || { cat "$S/hook-$D1-ApplicationStart.log"; fail "no switch in ApplicationStart's output"; }
grep -q "reloaded php8.2-fpm" "$S/hook-$D1-ApplicationStart.log" || { cat "$S/hook-$D1-ApplicationStart.log"; fail "php8.2-fpm was not reloaded through systemctl"; }
ctr systemctl is-active php8.2-fpm >/dev/null || fail "php8.2-fpm is not active after the reload"
[ "$(ctr curl -s http://127.0.0.1/)" = "release=r1" ] || fail "nginx does not serve release r1"

# The release on disk, as the default permission policy places it.
C=/var/www/magento/current
mode() { ctr stat -c "%a %U:%G" "$C/$1"; }
expect_mode() { local got; got=$(mode "$1"); [ "$got" = "$2" ] || fail "$C/$1 is $got, not $2"; }
expect_mode . "750 root:www-data"
expect_mode app/etc/config.php "640 root:www-data"
expect_mode app/etc/env.php "640 root:www-data"
expect_mode bin/magento "750 root:www-data"
expect_mode generated "2770 root:www-data"
expect_mode generated/code/Magento/Framework "2770 root:www-data"
expect_mode generated/metadata/global.php "660 root:www-data"
expect_mode var "2770 root:www-data"
expect_mode var/view_preprocessed "2770 root:www-data"
expect_mode pub/static "2770 root:www-data"
expect_mode pub/static/frontend/Magento/luma/en_US/css/styles-m.css "660 root:www-data"
expect_mode vendor/magento/framework/App/Bootstrap.php "640 root:www-data"
[ "$(ctr readlink $C/vendor/bin/laminas)" = ../laminas/laminas-cli/bin/laminas ] || fail "vendor/bin/laminas is not the artifact's relative link"
[ "$(ctr readlink $C/vendor/composer/framework-link)" = ../magento/framework ] || fail "vendor/composer/framework-link is not the artifact's relative link"
for p in pub/media var/log var/session var/report var/export; do
  l=$(ctr readlink "$C/$p") || fail "shared path $p is not a link"
  case "$l" in */shared/$p) ;; *) fail "shared path $p links to $l";; esac
  got=$(ctr stat -L -c "%a %U:%G" "$C/$p"); [ "$got" = "2770 root:www-data" ] || fail "shared $p is $got, not 2770 root:www-data"
done
ctr grep -q CANARY-nspawn-5ecret $C/app/etc/env.php || fail "the secret did not reach env.php"

# bin/magento's output (stdout and stderr) reached the hook as it ran, tagged, at INFO.
h="$S/hook-$D1-AfterInstall.log"
grep -q 'INFO  \[magento\] Compilation was started.' "$h" || { cat "$h"; fail "bin/magento's stdout did not reach the hook"; }
grep -q 'INFO  \[magento stderr\] Deprecated: a notice on stderr' "$h" || { cat "$h"; fail "bin/magento's stderr did not reach the hook, tagged, at INFO"; }

# --- SIGHUP: systemctl reload re-reads the config between events ---------------------------
mainpid=$(ctr systemctl show -p MainPID --value bgagent.service)
ctr cp /srv/t/etc/bgagent-invalid.yaml /etc/bgagent/bgagent.yaml
if ctr systemctl reload bgagent.service >/dev/null 2>&1; then fail "systemctl reload took an invalid config"; fi
# Straight to the daemon too (kill -HUP): it refuses the config itself, with its errors.
ctr kill -HUP "$mainpid"
refused=""
for _ in $(seq 50); do
  ctr journalctl -u bgagent.service --no-pager -o cat > "$S/journal.txt" 2>/dev/null || true
  if grep -q "config is refused, bgagent keeps running" "$S/journal.txt"; then refused=1; break; fi
  sleep 0.1
done
[ -n "$refused" ] || { tail -20 "$S/journal.txt"; fail "the daemon did not refuse the invalid config on SIGHUP"; }
grep -q "release.keep" "$S/journal.txt" || { tail -20 "$S/journal.txt"; fail "the refusal does not name the invalid key"; }
[ "$(ctr systemctl show -p MainPID --value bgagent.service)" = "$mainpid" ] || fail "the daemon restarted on SIGHUP"
ctr cp /srv/t/etc/bgagent-reloaded.yaml /etc/bgagent/bgagent.yaml
ctr systemctl reload bgagent.service || { journal; fail "systemctl reload of a valid config failed"; }
reloaded=""
for _ in $(seq 50); do
  ctr journalctl -u bgagent.service --no-pager -o cat > "$S/journal.txt" 2>/dev/null || true
  if grep -q "config reloaded from /etc/bgagent/bgagent.yaml" "$S/journal.txt"; then reloaded=1; break; fi
  sleep 0.1
done
[ -n "$reloaded" ] || { tail -20 "$S/journal.txt"; fail "the daemon did not take the valid config on reload"; }

# --- A second deployment: drain, install, switch, traffic ---------------------------------
D2=d-NSPAWN0002
unpack 2 $D2
for ev in ApplicationStop BeforeInstall AfterInstall ApplicationStart ValidateService BeforeAllowTraffic AfterAllowTraffic; do hook $ev $D2; done
grep -q '\[echo\] config-reloaded' "$S/hook-$D2-ApplicationStop.log" || { cat "$S/hook-$D2-ApplicationStop.log"; fail "the reloaded config's command did not run"; }
grep -q 'no load balancer was probing /ready' "$S/hook-$D2-ApplicationStop.log" || { cat "$S/hook-$D2-ApplicationStop.log"; fail "the drain does not say it went on because nobody probes /ready"; }
[ "$(ctr curl -s http://127.0.0.1/)" = "release=r2" ] || fail "nginx does not serve release r2"
pid_after=$(ctr systemctl show -p MainPID --value php8.2-fpm)
[ "$pid_before" = "$pid_after" ] || fail "php8.2-fpm's main process changed ($pid_before -> $pid_after): restarted, not reloaded"
# php-fpm -t's notice is INFO, not a warning.
if grep -q 'WARN  \[php-fpm8.2' "$S"/hook-*.log; then grep 'WARN  \[php-fpm8.2' "$S"/hook-*.log | head -3; fail "php-fpm -t's notices are warnings"; fi

st=$(ctr bgagent status --json) || fail "status failed"
grep -q "\"daemon\": \"running\"" <<<"$st" || { echo "$st"; fail "status does not see the daemon"; }
R2=$(ctr readlink /var/www/magento/current); R2=${R2##*/}
# The load balancer's port (0.0.0.0:9100) answers /ready and /live only; /status and /metrics
# are on loopback.
[ "$(ctr curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:9100/ready)" = 200 ] || fail "/ready is not 200 after the deployment"
[ "$(ctr curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:9100/status)" = 404 ] || fail "the load balancer's port serves /status"
ctr curl -s http://127.0.0.1:9101/metrics > "$S/metrics.txt" || fail "no /metrics on 127.0.0.1:9101"
grep -q "^bgagent_current_release{release=\"$R2\",deployment_id=\"$D2\"} 1" "$S/metrics.txt" || { cat "$S/metrics.txt"; fail "/metrics does not name the current release"; }
grep -q "^bgagent_last_deployment{deployment_id=\"$D2\",status=\"succeeded\"} 1" "$S/metrics.txt" || { cat "$S/metrics.txt"; fail "/metrics does not name the last deployment"; }

# --- journald: every line of an event carries its fields ---------------------------------
found=""
for _ in $(seq 50); do  # journald may take a moment to index the entries
  # To a file first: with pipefail, `| tee | grep -q` fails when grep exits before tee is done.
  ctr journalctl DEPLOYMENT_ID=$D2 -o json --no-pager > "$S/journal-d2.json" || true
  if grep -q 'AfterAllowTraffic succeeded' "$S/journal-d2.json"; then found=1; break; fi
  sleep 0.1
done
[ -n "$found" ] || { head -c 1500 "$S/journal-d2.json"; fail "journalctl DEPLOYMENT_ID=$D2 does not find the deployment's lines"; }
ctr journalctl -u bgagent.service -o json --no-pager > "$S/journal.json" || true
python3 - "$S/journal.json" "$D2" "$R2" <<'PY' || fail "journald fields (above)"
import json, sys
path, dep, rel = sys.argv[1:]
entries = [json.loads(l) for l in open(path) if l.strip()]
mine = [e for e in entries if e.get("SYSLOG_IDENTIFIER") == "bgagent"]
assert mine, "no entries from bgagent"
bad = [k for e in mine for k in e if k.startswith("F_")]
assert not bad, f"fields with tracing-journald's F_ prefix: {sorted(set(bad))}"
of_d2 = [e for e in mine if e.get("DEPLOYMENT_ID") == dep]
events = {e.get("LIFECYCLE_EVENT") for e in of_d2}
want = {"ApplicationStop", "BeforeInstall", "AfterInstall", "ApplicationStart", "ValidateService",
        "BeforeAllowTraffic", "AfterAllowTraffic"}
assert want <= events, f"events with DEPLOYMENT_ID={dep}: {sorted(e for e in events if e)}"
# Every line between an event's start and its result carries the fields, command output too.
inside, missing = None, []
for e in mine:
    m = e.get("MESSAGE", "")
    if m.endswith(f"starts for deployment {dep}"):
        inside = m.split()[0]
    if inside and (e.get("DEPLOYMENT_ID") != dep or e.get("LIFECYCLE_EVENT") != inside):
        missing.append(m)
    if inside and (m.startswith(f"{inside} succeeded") or m.startswith(f"{inside} FAILED")):
        inside = None
assert not missing, f"lines of an event without its fields: {missing[:5]}"
out = [e for e in of_d2 if e.get("MESSAGE", "").startswith("[magento")]
assert out, "bin/magento's output is not in the journal with the deployment's fields"
assert all(e.get("LIFECYCLE_EVENT") == "AfterInstall" and e.get("RELEASE_ID") == rel for e in out), out[:2]
start = [e for e in of_d2 if e.get("LIFECYCLE_EVENT") == "ApplicationStart"]
assert start and all(e.get("RELEASE_ID") == rel for e in start), "ApplicationStart lines without RELEASE_ID"
PY
if grep -q CANARY-nspawn-5ecret "$S/journal.json"; then fail "the secret reached the journal"; fi
if grep -q CANARY-nspawn-5ecret <<<"$st"; then fail "the secret reached status"; fi
if grep -q CANARY-nspawn-5ecret "$S"/hook-*.log; then fail "the secret reached a hook's output"; fi

# --- Members of the socket group: status, releases, rollback (not root) -------------------
got=$(ctr stat -c "%a %U:%G" /etc/bgagent/bgagent.yaml); [ "$got" = "640 root:bgagent" ] || fail "/etc/bgagent/bgagent.yaml is $got, not 640 root:bgagent"
ctr useradd --create-home --groups bgagent deployer
member() { ctr setpriv --reuid=deployer --regid=deployer --init-groups "$@"; }
[ "$(member id -un)" = deployer ] || fail "setpriv does not switch to deployer"
out=$(member bgagent status --json 2>&1) || { echo "$out"; fail "a member of bgagent cannot run bgagent status"; }
grep -q "\"$D2\"" <<<"$out" || { echo "$out"; fail "a member's status does not show $D2"; }
out=$(member bgagent releases 2>&1) || { echo "$out"; fail "a member of bgagent cannot run bgagent releases"; }
grep -q "\* $R2" <<<"$out" || { echo "$out"; fail "a member's releases does not mark $R2 current"; }
out=$(member bgagent rollback 2>&1) || { echo "$out"; fail "a member of bgagent cannot run bgagent rollback"; }
[ "$(ctr curl -s http://127.0.0.1/)" = "release=r1" ] || fail "the member's rollback did not bring release r1 back"
# While the daemon is down, status reads the state file: readable by the group.
ctr systemctl stop bgagent.service
got=$(ctr stat -c "%a %G" /var/lib/bgagent/state.json); [ "$got" = "640 bgagent" ] || fail "state.json is $got, not 640 group bgagent"
out=$(member bgagent status --json 2>&1) || { echo "$out"; fail "a member cannot read the state while the daemon is down"; }
grep -q '"daemon": "not_running"' <<<"$out" || { echo "$out"; fail "status without the daemon does not say so"; }
if out=$(ctr setpriv --reuid=nobody --regid=nogroup --clear-groups bgagent status 2>&1); then fail "a user outside the group read the status: $out"; fi

# --- The watchdog: a hung daemon is restarted and reports the state right ----------------
# (WatchdogSec shortened for the test, as a drop-in the way an operator would.)
ctr mkdir -p /etc/systemd/system/bgagent.service.d
ctr sh -c 'printf "[Service]\nWatchdogSec=3s\n" > /etc/systemd/system/bgagent.service.d/watchdog.conf'
ctr systemctl daemon-reload
ctr systemctl start bgagent.service || { journal; fail "bgagent.service did not start again"; }
hung=$(ctr systemctl show -p MainPID --value bgagent.service)
restarts=$(ctr systemctl show -p NRestarts --value bgagent.service)
ctr kill -STOP "$hung"
back=""
for _ in $(seq 300); do  # a bounded count of polls, not a timing assertion
  p=$(ctr systemctl show -p MainPID --value bgagent.service)
  if [ "$p" != "$hung" ] && [ "$p" != 0 ] && [ "$(ctr systemctl is-active bgagent.service)" = active ]; then back=1; break; fi
  sleep 0.1
done
[ -n "$back" ] || { journal; fail "systemd did not restart the hung (SIGSTOPped) daemon"; }
[ "$(ctr systemctl show -p NRestarts --value bgagent.service)" = $((restarts + 1)) ] || fail "NRestarts did not count the watchdog restart"
ctr journalctl -u bgagent.service --no-pager > "$S/journal.txt" 2>/dev/null || true
grep -qi "watchdog timeout" "$S/journal.txt" || { tail -20 "$S/journal.txt"; fail "the journal does not say the watchdog fired"; }
ctr bgagent status --json > "$S/status.json" || fail "status after the watchdog restart failed"
python3 - "$S/status.json" "$D2" "$R2" <<'PY' || { cat "$S/status.json"; fail "the restarted daemon's status (above)"; }
import json, sys
st = json.load(open(sys.argv[1]))
assert st["daemon"] == "running", st["daemon"]
assert st["last_deployment"]["id"] == sys.argv[2], st["last_deployment"]["id"]
assert st["last_deployment"]["status"] == "succeeded", st["last_deployment"]["status"]
assert st["current_release"]["id"] != sys.argv[3], "current is not the rolled-back-to release"
assert st["last_switch"]["reason"] == "rollback", st["last_switch"]
PY
ctr rm /etc/systemd/system/bgagent.service.d/watchdog.conf
ctr systemctl daemon-reload

# --- Removal -------------------------------------------------------------------------------
ctr dpkg -r bgagent >"$S/dpkg.log" 2>&1 || { cat "$S/dpkg.log"; fail "dpkg -r"; }
st=$(ctr systemctl is-active bgagent.service || true)
[ "$st" != active ] || fail "bgagent.service still runs after dpkg -r"
ctr test -f /etc/bgagent/bgagent.yaml || fail "dpkg -r removed the config (only purge may)"
ctr test -d /var/lib/bgagent || fail "dpkg -r removed the state"
[ "$(ctr curl -s http://127.0.0.1/)" = "release=r1" ] || fail "removing the package stopped the site"
ctr dpkg --purge bgagent >"$S/dpkg.log" 2>&1 || { cat "$S/dpkg.log"; fail "dpkg --purge"; }
ctr test ! -e /var/lib/bgagent || fail "dpkg --purge left /var/lib/bgagent"
ctr test ! -e /etc/bgagent/bgagent.yaml || fail "dpkg --purge left the config"
echo "systemd test: package installed, two Magento-shaped deployments through the hooks, reload, group members, watchdog, removed and purged"
echo "systemd test: 1 passed, 0 failed"
