#!/usr/bin/env bash
# The main job on the embedded default (an SQLite file and a JSON lines file,
# no servers): builds omnibox and runs `omnibox demo`, which migrates a new
# database, enqueues sample events, publishes them with the relay to a file,
# consumes that file into the inbox (twice: the second pass stores nothing),
# processes the inbox rows with a small handler, and prints the status.
#
#   scripts/demo.sh            # works in target/demo (recreated each run)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/build-deps.sh
cargo build --quiet --bin omnibox
rm -rf target/demo
exec target/debug/omnibox demo --dir target/demo "$@"
