#!/usr/bin/env bash
# Instructions the gateway itself spends on one request, counted by callgrind: a miss
# without token limits and the same with them (scripts/bench.sh's 'miss' and 'tokens'
# keys), repeatable whatever else the machine is doing. For each key the release gateway
# runs under valgrind twice (N and 2N sequential misses on one keep-alive connection,
# after 20 to warm up) against its own redis-server and mock-llm; the difference divided
# by N leaves start-up out. (Redis's side: scripts/limiter_callgrind.sh.)
#
#   scripts/gateway_callgrind.sh          # N=200
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-200}
command -v valgrind >/dev/null || { echo "needs valgrind (apt-get install valgrind)" >&2; exit 1; }
cargo build --release --quiet --bins
. scripts/processes.sh

REDIS_PORT=$(free_port); MOCK_PORT=$(free_port)
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no --dir "$WORK" \
  >/dev/null 2>&1 & PIDS+=($!)
./target/release/mock-llm --port "$MOCK_PORT" >/dev/null 2>&1 & PIDS+=($!)
wait_port "$REDIS_PORT"; wait_port "$MOCK_PORT"
cat >"$WORK/gateway.toml" <<'TOML'
api_keys = "sk-miss,sk-tokens"
rate_limiter_capacity = 1000000000
rate_limiter_refill_rate = 1.0
api_key_tiers = "sk-tokens=metered"
[tiers.metered]
capacity = 1000000000
refill_rate = 1.0
tokens_per_minute = 1000000000000
token_budget = 1000000000000000
TOML

send() { # port key count tag: sequential misses on one keep-alive connection
  python3 - "$@" <<'PY'
import http.client, json, sys
port, key, n, tag = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
for i in range(n):
    body = json.dumps({"messages": [{"role": "user", "content": f"callgrind {tag} {i}"}], "max_tokens": 64})
    conn.request("POST", "/api/v1/chat", body=body, headers={"X-API-Key": key, "Content-Type": "application/json"})
    answer = conn.getresponse()
    answer.read()
    if answer.status != 200:
        sys.exit(f"status {answer.status}")
PY
}

total() { # key count -> instructions of the whole gateway run
  local port out pid
  port=$(free_port); out="$WORK/callgrind.$port"
  GATEWAY_CONFIG="$WORK/gateway.toml" HOST=127.0.0.1 PORT=$port \
    REDIS_URL="redis://127.0.0.1:$REDIS_PORT/0" OLLAMA_BASE_URL="http://127.0.0.1:$MOCK_PORT" \
    CACHE_TTL_SECONDS=600 LOG_LEVEL=warn \
    valgrind --tool=callgrind --callgrind-out-file="$out" ./target/release/llm-gateway \
    >/dev/null 2>&1 & pid=$!
  wait_port "$port" 60
  send "$port" "$1" 20 "warm-$port"
  send "$port" "$1" "$2" "run-$port"
  kill -TERM "$pid"; wait "$pid" || true
  grep -E '^(summary|totals):' "$out" | head -1 | awk '{print $2}'
}

for key in sk-miss sk-tokens; do
  a=$(total "$key" "$N"); b=$(total "$key" $((2 * N)))
  echo "$key: $(( (b - a) / N )) instructions a request in the gateway"
done
