#!/usr/bin/env bash
# Benchmark: builds in release mode, starts its own redis-server, mock-llm and gateway on
# free loopback ports, drives them with wrk, stops everything it started and prints one
# table. Figures are for comparing within one run; the machine is shared by all four.
#
#   scripts/bench.sh            # 5 s per scenario
#   DURATION=10 scripts/bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-5}
. scripts/processes.sh

need() { command -v "$1" >/dev/null 2>&1; }
if ! need wrk || ! need redis-server; then
  echo "installing wrk and redis-server from Debian's packages" >&2
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk redis-server >/dev/null
fi

echo "building (release)..." >&2
cargo build --release --quiet --bins --example bound_relay

REDIS_PORT=$(free_port); MOCK_PORT=$(free_port); GW_PORT=$(free_port)
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no --dir "$WORK" \
  >/dev/null 2>&1 & REDIS_PID=$!; PIDS+=("$REDIS_PID")
./target/release/mock-llm --port "$MOCK_PORT" >/dev/null 2>&1 & MOCK_PID=$!; PIDS+=("$MOCK_PID")
wait_port "$REDIS_PORT"; wait_port "$MOCK_PORT"

# 10,000 keys (too long for one environment variable, so a config file); one key has a
# tiny tier for the 429 scenario. Every other key is effectively unlimited: a bucket of a
# billion tokens that no run empties. It refills at 1 token/s, as real tiers refill at a
# few per second, so a bucket in use stays in Redis as it would in production. (With a
# refill as fast as its use, every bucket expired 1 ms after each request, and the 10,000
# keys row measured Redis recreating a bucket for nearly every request: 120,006 expired
# keys in 134,389 requests, ~3 us more Redis CPU per request.)
python3 - "$WORK/gateway.toml" <<'PY'
import sys
keys = ",".join(f"sk-bench-{i:05d}" for i in range(10000))
open(sys.argv[1], "w").write(
    f'api_keys = "{keys},sk-bench-limited"\n'
    'rate_limiter_capacity = 1000000000\n'
    'rate_limiter_refill_rate = 1.0\n'
    'rate_limiter_tiers = "tiny:1:0.001"\n'
    'api_key_tiers = "sk-bench-limited=tiny,sk-bench-00006=metered"\n'
    'max_body_bytes = 1048576\n'
    # The 'tokens' row's key: the same roomy bucket with token limits on (a tokens-per-
    # minute bucket and a daily budget no run spends), in the same process as the 'miss'
    # row, so the two rows differ only by the token limits.
    '[tiers.metered]\ncapacity = 1000000000\nrefill_rate = 1.0\n'
    'tokens_per_minute = 1000000000000\ntoken_budget = 1000000000000000\n')
PY
GATEWAY_CONFIG="$WORK/gateway.toml" HOST=127.0.0.1 PORT=$GW_PORT \
  REDIS_URL="redis://127.0.0.1:$REDIS_PORT/0" OLLAMA_BASE_URL="http://127.0.0.1:$MOCK_PORT" \
  CACHE_TTL_SECONDS=600 LOG_LEVEL=${LOG_LEVEL:-info} ./target/release/llm-gateway >"$WORK/gateway.log" 2>&1 & GW_PID=$!
PIDS+=("$GW_PID")
wait_port "$GW_PORT"

# A second gateway, the same settings with a registry of four providers (every kind, all
# on the mock): its 'registry' row is the 'miss' row's requests, routed by the registry.
REG_PORT=$(free_port)
cp "$WORK/gateway.toml" "$WORK/registry.toml"
for kind in ollama openai anthropic gemini; do
  printf '[providers.%s]\nkind = "%s"\nbase_url = "http://127.0.0.1:%s"\n' "$kind" "$kind" "$MOCK_PORT"
  [ "$kind" = gemini ] && printf 'api_key_env = "BENCH_GEMINI_KEY"\n'
  printf '[routes."%s-model"]\ntargets = [{ provider = "%s", model = "m" }]\n' "$kind" "$kind"
done >>"$WORK/registry.toml"
printf '[routes.default]\ntargets = [{ provider = "ollama", model = "llama3.1" }]\n' >>"$WORK/registry.toml"
BENCH_GEMINI_KEY=gm-bench GATEWAY_CONFIG="$WORK/registry.toml" HOST=127.0.0.1 PORT=$REG_PORT \
  REDIS_URL="redis://127.0.0.1:$REDIS_PORT/0" CACHE_TTL_SECONDS=600 LOG_LEVEL=${LOG_LEVEL:-info} \
  ./target/release/llm-gateway >"$WORK/registry.log" 2>&1 & REG_PID=$!
PIDS+=("$REG_PID")
wait_port "$REG_PORT"

# Two more, the first gateway's settings with traces configured (CONTRACT §15), exported
# to the mock's OTLP sink: sampling 0 ('trace0' rows: spans made but never recorded) and
# sampling 1 ('trace1': every span recorded and exported). Their 'miss' requests compare
# with the first gateway's 'miss' row.
start_traced() { # port sampler log
  GATEWAY_CONFIG="$WORK/gateway.toml" HOST=127.0.0.1 PORT=$1 \
    REDIS_URL="redis://127.0.0.1:$REDIS_PORT/0" OLLAMA_BASE_URL="http://127.0.0.1:$MOCK_PORT" \
    CACHE_TTL_SECONDS=600 LOG_LEVEL=${LOG_LEVEL:-info} \
    OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:$MOCK_PORT" OTEL_TRACES_SAMPLER=$2 \
    ./target/release/llm-gateway >"$WORK/$3" 2>&1 &
}
TRACE0_PORT=$(free_port); start_traced "$TRACE0_PORT" always_off trace0.log; TRACE0_PID=$!
TRACE1_PORT=$(free_port); start_traced "$TRACE1_PORT" always_on trace1.log; TRACE1_PID=$!
PIDS+=("$TRACE0_PID" "$TRACE1_PID")
wait_port "$TRACE0_PORT"; wait_port "$TRACE1_PORT"

# The bound for one connection: a relay that only makes the round trips a miss needs
# (examples/bound_relay.rs), against the same Redis script and mock.
SCRIPT_SHA=$(redis-cli -p "$REDIS_PORT" script load "$(cat src/ratelimit/token_bucket.lua)")
RELAY_PORT=$(free_port)
./target/release/examples/bound_relay "$RELAY_PORT" "$REDIS_PORT" "$MOCK_PORT" "$SCRIPT_SHA" \
  >/dev/null 2>"$WORK/relay.log" & RELAY_PID=$!; PIDS+=("$RELAY_PID")
wait_port "$RELAY_PORT"

# wrk scripts: each prints "RESULT <requests> <seconds> <p50 us> <p99 us> <non-2xx> <socket errors>"
# when done. No response() hook: it would make wrk itself the bottleneck.
cat >"$WORK/common.lua" <<'LUA'
counter = 0
threads = 0
-- A tag per run and thread, so "unique" bodies never repeat across runs (wrk's Lua
-- random numbers are not seeded).
function init(args) run_tag = args[1] or "" end
function setup(thread) threads = threads + 1; thread:set("id", tostring(threads)) end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT %d %.3f %d %d %d %d\n", summary.requests, summary.duration / 1e6,
    latency:percentile(50), latency:percentile(99), e.status, e.connect + e.read + e.write + e.timeout))
end
LUA
scenario_lua() { # name key body-kind expected-status path [dialect: original|openai]
  local name=$1 key=$2 kind=$3 dialect=${6:-original}
  {
    cat "$WORK/common.lua"
    cat <<LUA
local key = "$key"
local kind = "$kind"
local pad = string.rep("x", 65536)
-- The 10,000 keys are formatted once, so picking one costs wrk no more per request than
-- the fixed key does (wrk shares the cores with what it measures).
local keys = {}
if key == "RANDOM" then for i = 0, 9999 do keys[i + 1] = string.format("sk-bench-%05d", i) end end
request = function()
  counter = counter + 1
  local api_key = key
  if key == "RANDOM" then api_key = keys[math.random(1, 10000)] end
  local content
  if kind == "fixed" then content = "the same question every time"
  elseif kind == "big" then content = run_tag .. id .. "-" .. counter .. pad
  else content = "question " .. run_tag .. id .. "-" .. counter end
  if "$dialect" == "openai" then
    -- The same question through the OpenAI door: a model, a bearer key.
    local body = '{"model":"llama3.1","messages":[{"role":"user","content":"' .. content .. '"}],"max_tokens":64}'
    return wrk.format("POST", "$5", {["Authorization"] = "Bearer " .. api_key, ["Content-Type"] = "application/json"}, body)
  end
  local body = '{"messages":[{"role":"user","content":"' .. content .. '"}],"max_tokens":64}'
  return wrk.format("POST", "$5", {["X-API-Key"] = api_key, ["Content-Type"] = "application/json"}, body)
end
LUA
  } >"$WORK/$name.lua"
}
scenario_lua floor   none             vary  200 /api/chat
scenario_lua bound   sk-bench-00001   vary  200 /api/v1/chat
scenario_lua miss    sk-bench-00001   vary  200 /api/v1/chat
scenario_lua hit     sk-bench-00002   fixed 200 /api/v1/chat
scenario_lua limited sk-bench-limited vary  429 /api/v1/chat
scenario_lua keys10k RANDOM           vary  200 /api/v1/chat
scenario_lua body64k sk-bench-00003   big   200 /api/v1/chat
scenario_lua openai  sk-bench-00004   vary  200 /v1/chat/completions openai
scenario_lua registry sk-bench-00005  vary  200 /api/v1/chat
scenario_lua tokens  sk-bench-00006   vary  200 /api/v1/chat
scenario_lua trace0  sk-bench-00007   vary  200 /api/v1/chat
scenario_lua trace1  sk-bench-00008   vary  200 /api/v1/chat
# The floor speaks Ollama directly: give its body a model.
sed -i 's/"max_tokens":64}/"max_tokens":64,"model":"m","stream":false}/' "$WORK/floor.lua"

# Commands the gateway sends (INFO commandstats also counts what runs inside the Lua
# scripts - TIME, HMGET, HSET, HGET, HDEL, PEXPIRE, PEXPIREAT, PTTL - and our own INFO calls;
# those are left out).
redis_calls() {
  redis-cli -p "$REDIS_PORT" info commandstats | tr -d '\r' |
    awk -F'[:=,]' '/^cmdstat_/ && $1 !~ /^cmdstat_(info|time|hmget|hset|hget|hdel|pexpire|pexpireat|pttl)$/ { n += $3 } END { print n + 0 }'
}
rss_kb() { awk '/VmRSS/ { print $2 }' "/proc/$GW_PID/status"; }
peak_kb() { awk '/VmHWM/ { print $2 }' "/proc/$1/status"; }
reset_peak() { echo 5 >"/proc/$1/clear_refs" 2>/dev/null || true; }
# CPU time (user + system, in clock ticks) a process has used so far: per-request CPU of
# each process shows where a scenario's cost goes on the shared cores.
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
TICK_US=$((1000000 / $(getconf CLK_TCK)))

IDLE_KB=$(rss_kb)
# Warm up: connections, script cache, the cached entry of the hit scenario.
wrk -t1 -c4 -d1s -s "$WORK/hit.lua" "http://127.0.0.1:$GW_PORT" >/dev/null 2>&1 || true

ROWS=()
run() { # scenario connections url [pid in the "gateway" columns, default the gateway]
  local name=$1 conns=$2 url=$3 threads=1 pid=${4:-$GW_PID}
  [ "$conns" -gt 1 ] && threads=2
  reset_peak "$pid"
  local before after out
  before=$(redis_calls)
  local gw0 rd0 mk0
  gw0=$(cpu_ticks "$pid"); rd0=$(cpu_ticks "$REDIS_PID"); mk0=$(cpu_ticks "$MOCK_PID")
  out=$(wrk -t"$threads" -c"$conns" -d"${DURATION}s" --timeout 10s -s "$WORK/$name.lua" "$url" \
    -- "$name-$conns-$RANDOM$RANDOM-" | grep '^RESULT')
  after=$(redis_calls)
  local cpu="$(($(cpu_ticks "$pid") - gw0)) $(($(cpu_ticks "$REDIS_PID") - rd0)) $(($(cpu_ticks "$MOCK_PID") - mk0))"
  # Redis' own INFO and cluster chatter are excluded; what is left is per request.
  ROWS+=("$name $conns $out $((after - before)) $(peak_kb "$pid") $cpu")
}

for conns in 1 64; do
  run floor "$conns" "http://127.0.0.1:$MOCK_PORT"
  [ "$conns" = 1 ] && run bound 1 "http://127.0.0.1:$RELAY_PORT" "$RELAY_PID"
  for name in miss tokens openai hit limited keys10k body64k; do
    run "$name" "$conns" "http://127.0.0.1:$GW_PORT"
  done
  run registry "$conns" "http://127.0.0.1:$REG_PORT" "$REG_PID"
  run trace0 "$conns" "http://127.0.0.1:$TRACE0_PORT" "$TRACE0_PID"
  run trace1 "$conns" "http://127.0.0.1:$TRACE1_PORT" "$TRACE1_PID"
done
FINAL_KB=$(rss_kb)

# Traces configured with sampling 0, and token limits on, against both off, alternated
# in mirrored rounds (off, tokens, traces, traces, tokens, off) so that the VM's speed,
# drifting by a tenth within a minute on a shared VM, falls on every side alike: a
# change that is linear over a round cancels out exactly. req/s at 64 connections of
# the 'miss' requests, summed over the rounds; each round's own ratio too, to show the
# spread. A round's ratio swings by ~9% (one standard deviation, 28 rounds of 3 s rows
# on a 2-core VM with 20% steal), so the rounds are eight (~3% on the sum) and not four.
AB_ROUNDS=${AB_ROUNDS:-8}
ab_rps() { # scenario url -> req/s
  wrk -t2 -c64 -d"${AB_SECONDS:-3}s" --timeout 10s -s "$WORK/$1.lua" "$2" -- "ab-$1-$RANDOM$RANDOM-" |
    awk '/^RESULT/ { printf "%.0f", $2 / $3 }'
}
AB_OFF=0; AB_ON=0; AB_TOKENS=0; AB_TOKEN_ROUNDS=""; AB_TRACE_ROUNDS=""
for _ in $(seq 1 "$AB_ROUNDS"); do
  off=$(ab_rps miss "http://127.0.0.1:$GW_PORT")
  # Token limits on: the same gateway process as 'miss'.
  tokens=$(ab_rps tokens "http://127.0.0.1:$GW_PORT")
  on=$(ab_rps trace0 "http://127.0.0.1:$TRACE0_PORT")
  on=$((on + $(ab_rps trace0 "http://127.0.0.1:$TRACE0_PORT")))
  tokens=$((tokens + $(ab_rps tokens "http://127.0.0.1:$GW_PORT")))
  off=$((off + $(ab_rps miss "http://127.0.0.1:$GW_PORT")))
  AB_OFF=$((AB_OFF + off)); AB_ON=$((AB_ON + on)); AB_TOKENS=$((AB_TOKENS + tokens))
  AB_TOKEN_ROUNDS="$AB_TOKEN_ROUNDS $(awk -v a="$tokens" -v b="$off" 'BEGIN { printf "%.3f", a / b }')"
  AB_TRACE_ROUNDS="$AB_TRACE_ROUNDS $(awk -v a="$on" -v b="$off" 'BEGIN { printf "%.3f", a / b }')"
done

# Reference round trips on the same loopback, one connection: a bare PING, and the
# limiter script alone. The one-connection rows cannot beat these by construction.
rtt_p50() { # redis-benchmark arguments; prints the p50 in microseconds
  redis-benchmark -p "$REDIS_PORT" -c 1 -n 20000 "$@" 2>/dev/null |
    awk '/latency summary/ { getline; getline; printf "%.0f", $3 * 1000; exit }'
}
PING_P50=$(rtt_p50 -t ping)
EVALSHA_P50=$(rtt_p50 evalsha "$SCRIPT_SHA" 1 ratelimit:bench-reference 1000000000 1000000000 1)

echo
echo "llm-gateway benchmark: $(nproc) cores, $(date -u +%Y-%m-%dT%H:%MZ), ${DURATION}s per row, wrk on loopback"
printf '%-9s %5s %10s %9s %9s %8s %12s %10s %9s %8s %7s %9s\n' \
  scenario conns "req/s" "p50(us)" "p99(us)" "x floor" "p50-floor" "redis cmd/r" "peakRSS" "non-2xx" "sockerr" \
  "cpu us/r gateway+redis+mock"
declare -A FLOOR_RPS FLOOR_P50
for row in "${ROWS[@]}"; do
  read -r name conns _ requests seconds p50 p99 non2xx sockerr calls peak gw_t rd_t mk_t <<<"$row"
  rps=$(awk -v r="$requests" -v s="$seconds" 'BEGIN { printf "%.0f", r / s }')
  if [ "$name" = floor ]; then FLOOR_RPS[$conns]=$rps; FLOOR_P50[$conns]=$p50; fi
  [ "$name" = bound ] && BOUND_P50=$p50
  [ "$name" = miss ] && [ "$conns" = 1 ] && MISS_P50=$p50
  [ "$name" = openai ] && [ "$conns" = 1 ] && OPENAI_P50=$p50
  [ "$name" = miss ] && [ "$conns" = 64 ] && MISS_RPS=$rps
  [ "$name" = openai ] && [ "$conns" = 64 ] && OPENAI_RPS=$rps
  [ "$name" = registry ] && [ "$conns" = 1 ] && REGISTRY_P50=$p50
  [ "$name" = registry ] && [ "$conns" = 64 ] && REGISTRY_RPS=$rps
  [ "$name" = tokens ] && [ "$conns" = 1 ] && TOKENS_P50=$p50
  [ "$name" = tokens ] && [ "$conns" = 64 ] && TOKENS_RPS=$rps
  [ "$name" = trace0 ] && [ "$conns" = 1 ] && TRACE0_P50=$p50
  [ "$name" = trace0 ] && [ "$conns" = 64 ] && TRACE0_RPS=$rps
  [ "$name" = trace1 ] && [ "$conns" = 1 ] && TRACE1_P50=$p50
  [ "$name" = trace1 ] && [ "$conns" = 64 ] && TRACE1_RPS=$rps
  ratio=$(awk -v a="$rps" -v b="${FLOOR_RPS[$conns]}" 'BEGIN { printf "%.2f", a / b }')
  delta=$((p50 - ${FLOOR_P50[$conns]}))
  per=$(awk -v c="$calls" -v r="$requests" 'BEGIN { printf "%.2f", (r > 0 ? c / r : 0) }')
  [ "$name" = floor ] && per="-"
  us() { awk -v t="$1" -v r="$requests" -v u="$TICK_US" 'BEGIN { printf "%.0f", (r > 0 ? t * u / r : 0) }'; }
  cpu="$(us "$gw_t")+$(us "$rd_t")+$(us "$mk_t")"
  printf '%-9s %5s %10s %9s %9s %8s %12s %10s %6sMiB %8s %7s %9s\n' \
    "$name" "$conns" "$rps" "$p50" "$p99" "$ratio" "$delta" "$per" "$((peak / 1024))" "$non2xx" "$sockerr" "  $cpu"
done
echo "gateway RSS: idle $((IDLE_KB / 1024)) MiB before the run, $((FINAL_KB / 1024)) MiB after it"
echo "bound, 1 connection: a relay doing only a miss's round trips (Redis pipeline, upstream call) is" \
  "$((BOUND_P50 - FLOOR_P50[1])) us over the floor's p50; the gateway's miss $((MISS_P50 - FLOOR_P50[1])) us," \
  "so its own work adds $((MISS_P50 - BOUND_P50)) us"
echo "OpenAI door vs original door, a miss: req/s at 64 connections $(awk -v a="$OPENAI_RPS" -v b="$MISS_RPS" 'BEGIN { printf "%.3f", a / b }')" \
  "of the original's; p50 at 1 connection $OPENAI_P50 us against $MISS_P50 us"
echo "a 4-provider registry vs the default one, a miss: req/s at 64 connections $(awk -v a="$REGISTRY_RPS" -v b="$MISS_RPS" 'BEGIN { printf "%.3f", a / b }')" \
  "of the default's; p50 at 1 connection $REGISTRY_P50 us against $MISS_P50 us"
echo "token limits on vs off, a miss: req/s at 64 connections $(awk -v a="$TOKENS_RPS" -v b="$MISS_RPS" 'BEGIN { printf "%.3f", a / b }')" \
  "of the same gateway's 'miss' row (target >= 0.95); p50 at 1 connection $TOKENS_P50 us against $MISS_P50 us"
echo "traces configured, sampling 0 vs off, a miss: req/s at 64 connections $(awk -v a="$TRACE0_RPS" -v b="$MISS_RPS" 'BEGIN { printf "%.3f", a / b }')" \
  "of the 'miss' row (target >= 0.97); p50 at 1 connection $TRACE0_P50 us against $MISS_P50 us"
echo "token limits on vs off, alternated over $AB_ROUNDS mirrored rounds on the same gateway: req/s at 64 connections $(awk -v a="$AB_TOKENS" -v b="$AB_OFF" 'BEGIN { printf "%.3f", a / b }')" \
  "($((AB_TOKENS / (2 * AB_ROUNDS))) against $((AB_OFF / (2 * AB_ROUNDS))) a row; rounds:$AB_TOKEN_ROUNDS; target >= 0.95)"
echo "traces configured, sampling 0 vs off, alternated over $AB_ROUNDS mirrored rounds: req/s at 64 connections $(awk -v a="$AB_ON" -v b="$AB_OFF" 'BEGIN { printf "%.3f", a / b }')" \
  "($((AB_ON / (2 * AB_ROUNDS))) against $((AB_OFF / (2 * AB_ROUNDS))) a row; rounds:$AB_TRACE_ROUNDS; target >= 0.97)"
echo "traces, sampling 1 (every span recorded and exported) vs off: req/s at 64 connections $(awk -v a="$TRACE1_RPS" -v b="$MISS_RPS" 'BEGIN { printf "%.3f", a / b }')" \
  "of the 'miss' row; p50 at 1 connection $TRACE1_P50 us against $MISS_P50 us"
echo "reference, 1 connection: a bare Redis round trip p50 ${PING_P50} us (PING), the limiter script alone ${EVALSHA_P50} us (EVALSHA)"
echo "cpu us/r: CPU time each process spent per request in that row (the cores also run wrk);"
echo "  $(nproc) cores give $(nproc) million CPU-us per second, so req/s <= $(nproc)e6 / (the four processes' sum)"
echo "non-2xx: should be 0 in every row but 'limited', where every answer is a 429 (1 token per 1000 s)"
