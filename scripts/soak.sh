#!/usr/bin/env bash
# The long soak: the same test CI runs for 10 s (tests/it/soak.rs), here for a minute
# by default. Loopback only; it starts and stops everything itself:
# its own redis-server (restarted twice and frozen once), mock-llm failing, hanging and
# resetting connections at random, and the real gateway binary, ending with SIGTERM
# under load. Prints requests, statuses, worst latency, counters and RSS.
#
#   scripts/soak.sh            # 60 s
#   SOAK_SECONDS=300 scripts/soak.sh
set -euo pipefail
cd "$(dirname "$0")/.."
command -v redis-server >/dev/null || {
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
}
export SOAK_SECONDS=${SOAK_SECONDS:-60}
cargo test --test it soak:: -- --nocapture 2>&1 | grep -E "soak|SIGTERM|test result|panicked|assert"
