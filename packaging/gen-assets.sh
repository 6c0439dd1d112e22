#!/bin/sh
# Writes the files the packages ship beside the binary but generate from it: the man page
# (gzipped, as Debian policy wants) and the shell completions, into target/assets/.
#   packaging/gen-assets.sh BINARY       # e.g. target/release/bgagent
# Run before `cargo deb` and `cargo generate-rpm` (tests/packaging/run.sh does).
set -eu
BIN=${1:?usage: packaging/gen-assets.sh BINARY}
cd "$(dirname "$0")/.."
OUT=target/assets
rm -rf "$OUT"; mkdir -p "$OUT/completions"
"$BIN" man | gzip -9n > "$OUT/bgagent.1.gz"
"$BIN" completions bash > "$OUT/completions/bgagent"
"$BIN" completions zsh > "$OUT/completions/_bgagent"
"$BIN" completions fish > "$OUT/completions/bgagent.fish"
