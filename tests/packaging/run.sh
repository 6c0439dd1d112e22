#!/usr/bin/env bash
# Builds the .deb and the .rpm from an already built binary and checks what they hold: every
# file at its path with its mode, the config marked as a conffile / %config(noreplace), and the
# maintainer scripts (postinst = %post, prerm = %preun, postrm = %postun) present and valid sh.
# The .deb is then installed in a real systemd by tests/systemd/run.sh (BGAGENT_DEB).
#
#   tests/packaging/run.sh [PROFILE]      # PROFILE: dev (default, the test build) or release
#
# Prints the paths of the two packages on its last two lines. Needs cargo-deb and
# cargo-generate-rpm (scripts/install-test-deps.sh installs them) and rpm (Debian's package).
set -euo pipefail
cd "$(dirname "$0")/../.."
PROFILE=${1:-dev}
OUT=target/pkg
fail() { echo "packaging test: FAIL: $*" >&2; exit 1; }
rm -rf "$OUT"; mkdir -p "$OUT"
case "$PROFILE" in dev) BIN=target/debug/bgagent;; *) BIN=target/$PROFILE/bgagent;; esac
[ -x "$BIN" ] || fail "$BIN is not built (cargo build --profile $PROFILE)"

# The man page and shell completions are generated from the binary being packaged.
packaging/gen-assets.sh "$BIN" || fail "packaging/gen-assets.sh $BIN"
cargo deb --no-build --no-strip --fast --profile "$PROFILE" -o "$OUT/" >"$OUT/deb.log" 2>&1 \
  || { cat "$OUT/deb.log"; fail "cargo deb"; }
# The test build's binary is large (debug info): its payload is stored uncompressed, which
# takes seconds instead of minutes; a release build keeps the default (zstd).
compress=(); [ "$PROFILE" = dev ] && compress=(--payload-compress none)
cargo generate-rpm --profile "$PROFILE" "${compress[@]}" -o "$OUT/" >"$OUT/rpm.log" 2>&1 \
  || { cat "$OUT/rpm.log"; fail "cargo generate-rpm"; }
DEB=$(ls "$OUT"/*.deb); RPM=$(ls "$OUT"/*.rpm)

# Both packages carry the binary that was built, byte for byte.
x=$(mktemp -d); trap 'rm -rf "$x"' EXIT
dpkg-deb -x "$DEB" "$x/deb"
cmp -s "$BIN" "$x/deb/usr/bin/bgagent" || fail "the .deb's /usr/bin/bgagent is not $BIN"
rpm -K "$RPM" >/dev/null 2>&1 || fail "the .rpm's digests do not check out (rpm -K)"
# Debian's rpm2cpio 4.18 exits 1 on packages that rpm -K accepts; what counts is that cpio
# unpacks its output and the files compare below.
rpm2cpio "$RPM" > "$x/rpm.cpio" || true
(mkdir -p "$x/rpm" && cd "$x/rpm" && cpio -idm --quiet < "$x/rpm.cpio") || fail "cpio of the .rpm"
cmp -s "$BIN" "$x/rpm/usr/bin/bgagent" || fail "the .rpm's /usr/bin/bgagent is not $BIN"

# path mode, for both (the unit under /lib on Debian, /usr/lib on RPM systems)
expect=(
  "usr/bin/bgagent 755"
  "SYSTEMD/bgagent.service 644"
  "usr/lib/sysusers.d/bgagent.conf 644"
  "usr/lib/tmpfiles.d/bgagent.conf 644"
  "etc/bgagent/bgagent.yaml 640"
  "usr/share/bgagent/hooks/appspec.yml 644"
  "usr/share/bgagent/hooks/bgagent-hook 755"
  "usr/share/bgagent/templates/env.php.j2 644"
  "usr/share/doc/bgagent/config.md 644"
  "usr/share/man/man1/bgagent.1.gz 644"
  "usr/share/bash-completion/completions/bgagent 644"
  "ZSH/_bgagent 644"
  "usr/share/fish/vendor_completions.d/bgagent.fish 644"
)
for kind in deb rpm; do
  # The distributions' paths differ for the unit and for zsh's completions.
  unitdir=lib/systemd/system; [ $kind = rpm ] && unitdir=usr/lib/systemd/system
  zshdir=usr/share/zsh/vendor-completions; [ $kind = rpm ] && zshdir=usr/share/zsh/site-functions
  for e in "${expect[@]}"; do
    p=${e% *}; p=${p/SYSTEMD/$unitdir}; p=${p/ZSH/$zshdir}; m=${e#* }
    [ -f "$x/$kind/$p" ] || fail "the .$kind has no /$p"
    got=$(stat -c %a "$x/$kind/$p")
    [ "$got" = "$m" ] || fail "the .$kind installs /$p with mode $got, not $m"
  done
done

# The man page is the binary's own, and reads as one; the completions know the subcommands.
for kind in deb rpm; do
  gzip -dc "$x/$kind/usr/share/man/man1/bgagent.1.gz" > "$x/bgagent.1" || fail "the .$kind's man page is not gzip"
  grep -q '^\.TH bgagent 1' "$x/bgagent.1" || fail "the .$kind's man page has no .TH header"
  grep -q 'codedeploy\|CodeDeploy' "$x/bgagent.1" || fail "the .$kind's man page lacks the description"
  grep -q 'rollback' "$x/$kind/usr/share/bash-completion/completions/bgagent" || fail "the .$kind's bash completion lacks the subcommands"
done
cmp -s "$x/bgagent.1" <("$BIN" man) || fail "the packaged man page is not what $BIN prints"
if command -v bash >/dev/null; then
  bash -n "$x/deb/usr/share/bash-completion/completions/bgagent" || fail "the bash completion is not valid bash"
fi

# The config is the operator's: never overwritten by an upgrade.
# (grep reads captured output, not a pipe: with pipefail, `cmd | grep -q` fails when grep
# exits before cmd has written everything)
conf=$(dpkg-deb -I "$DEB" conffiles)
grep -qx /etc/bgagent/bgagent.yaml <<<"$conf" || fail "bgagent.yaml is not a conffile in the .deb"
conf=$(rpm -qp --configfiles "$RPM" 2>/dev/null)
grep -qx /etc/bgagent/bgagent.yaml <<<"$conf" || fail "bgagent.yaml is not %config in the .rpm"

# Maintainer scripts: the same files, in both packages, valid sh.
for s in postinst prerm postrm; do
  dpkg-deb --ctrl-tarfile "$DEB" | tar -xO "./$s" > "$x/deb-$s" 2>/dev/null || fail "the .deb has no $s"
  cmp -s "packaging/$s" "$x/deb-$s" || fail "the .deb's $s is not packaging/$s"
  sh -n "packaging/$s" || fail "packaging/$s is not valid sh"
done
scripts=$(rpm -qp --scripts "$RPM" 2>/dev/null)
for pair in "postinstall:systemd-sysusers" "preuninstall:disable --now" "postuninstall:daemon-reload"; do
  grep -q "^${pair%%:*} scriptlet" <<<"$scripts" || fail "the .rpm has no ${pair%%:*} scriptlet"
  grep -q -- "${pair#*:}" <<<"$scripts" || fail "the .rpm's ${pair%%:*} scriptlet lacks '${pair#*:}'"
done
echo "packaging test: .deb and .rpm checked"
echo "$DEB"
echo "$RPM"
