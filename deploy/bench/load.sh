#!/usr/bin/env bash
# Whole-path load on loopback: starts `meshgate dev`, drives two paths with wrk for a bounded time,
# prints requests/s and latency, stops dev. Needs wrk (apt-get install wrk).
#
#   deploy/bench/load.sh [path/to/meshgate] [seconds] [connections]
#
# Paths measured:
#   north-south: client -> gateway (HTTP) -> mTLS tunnel -> node-a -> demo service   (/api/users/7)
#   east-west:   client -> node-b upstream listener -> mTLS tunnel -> node-a (L7 intentions) -> demo
set -euo pipefail
bin=${1:-target/release/meshgate}
secs=${2:-10}
conns=${3:-16}
base=${MESHGATE_BENCH_PORT_BASE:-26000}
command -v wrk >/dev/null || { echo "load.sh: needs wrk (apt-get install wrk)" >&2; exit 1; }
[ -x "$bin" ] || { echo "load.sh: $bin not found; cargo build --release -p meshgate" >&2; exit 1; }

out=$(mktemp)
"$bin" --log warn dev --port-base "$base" >"$out" 2>/dev/null &
pid=$!
trap 'kill -INT $pid 2>/dev/null || true; wait $pid 2>/dev/null || true; rm -f "$out"' EXIT
for _ in $(seq 1 300); do grep -q '^ready$' "$out" && break; sleep 0.1; done
grep -q '^ready$' "$out" || { echo "load.sh: meshgate dev did not become ready" >&2; cat "$out" >&2; exit 1; }

echo "== north-south: gateway -> tunnel -> agent -> service (${secs}s, ${conns} connections)"
wrk -t2 -c"$conns" -d"${secs}s" --latency "http://127.0.0.1:$((base + 80))/api/users/7" | sed -n '1,20p'
echo
echo "== east-west: upstream listener -> tunnel -> agent (L7 intentions) -> service"
wrk -t2 -c"$conns" -d"${secs}s" --latency "http://127.0.0.1:$((base + 91))/users/7" | sed -n '1,20p'
