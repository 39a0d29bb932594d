#!/usr/bin/env bash
# Instructions Redis spends on one limiter script call, counted by callgrind: repeatable
# to the instruction whatever else the machine is doing, unlike req/s on a shared VM.
# Runs redis-server under valgrind twice (N and 2N pipelined EVALSHA calls on one
# bucket) and prints the difference divided by N, so start-up and shutdown cancel out.
#
#   scripts/limiter_callgrind.sh            # every kind of call, N=2000
#   N=4000 scripts/limiter_callgrind.sh tokens
#
# Kinds: requests (the request bucket alone), tokens (with token limits, as
# scripts/bench.sh's 'tokens' row: no batch of settlements), tokens+batch (a batch
# riding along, applied: about one call per client in flight carries one).
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-2000}
command -v valgrind >/dev/null || { echo "needs valgrind (apt-get install valgrind)" >&2; exit 1; }
. scripts/processes.sh

calls() { # kind count sha
  python3 - "$@" <<'PY'
import sys
kind, n, sha = sys.argv[1], int(sys.argv[2]), sys.argv[3]
out = sys.stdout.buffer
limits = [1000000000, 1.0, 1]
tokens = limits + [300, 1000000000000, 1000000000000000, "day"]
for i in range(1, n + 1):
    args = {"requests": limits, "tokens": tokens,
            "tokens+batch": tokens + ["a1b2c3d4e5f60718", 1796000000000000 + i, 250, 20400, 250]}[kind]
    words = [str(w).encode() for w in ["EVALSHA", sha, 1, "ratelimit:v1:{callgrind}"] + args]
    out.write(b"*%d\r\n" % len(words))
    for w in words:
        out.write(b"$%d\r\n%s\r\n" % (len(w), w))
PY
}

total() { # kind count -> instructions of the whole redis-server run
  local port out
  port=$(free_port)
  out="$WORK/callgrind.$port"
  valgrind --tool=callgrind --callgrind-out-file="$out" redis-server --port "$port" \
    --bind 127.0.0.1 --save "" --appendonly no --dir "$WORK" >/dev/null 2>&1 &
  local pid=$!
  for _ in $(seq 1 200); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.1; done
  local sha
  sha=$(redis-cli -p "$port" -x script load < src/ratelimit/token_bucket.lua)
  calls "$1" "$2" "$sha" | redis-cli -p "$port" --pipe >/dev/null
  redis-cli -p "$port" shutdown nosave >/dev/null 2>&1 || true
  wait "$pid" || true
  grep -E '^(summary|totals):' "$out" | head -1 | awk '{print $2}'
}

for kind in "${@:-requests tokens tokens+batch}"; do
  for k in $kind; do
    a=$(total "$k" "$N"); b=$(total "$k" $((2 * N)))
    echo "$k: $(( (b - a) / N )) instructions a call"
  done
done
