#!/usr/bin/env bash
# Transcoding cost on loopback: the same order, as JSON, through two gateway routes of
# `meshgate dev`, driven by wrk in interleaved rounds (so a busy machine weighs on both alike):
#
#   plain:      client -> gateway -> tunnel -> node-a -> REST demo service (JSON)   /api/orders/1001
#   transcoded: client -> gateway (JSON -> gRPC) -> tunnel -> node-a -> demo gRPC    /v1/orders/1001
#
#   deploy/bench/transcode.sh [path/to/meshgate] [rounds] [seconds per round] [connections]
#
# Prints each round's requests/s, the medians and their ratio (target: transcoded >= 0.8x plain),
# and the load average before and after. Needs wrk (apt-get install wrk).
set -euo pipefail
bin=${1:-target/release/meshgate}
rounds=${2:-5}
secs=${3:-5}
conns=${4:-16}
base=${MESHGATE_BENCH_PORT_BASE:-27000}
command -v wrk >/dev/null || { echo "transcode.sh: needs wrk (apt-get install wrk)" >&2; exit 1; }
[ -x "$bin" ] || { echo "transcode.sh: $bin not found; cargo build --release -p meshgate" >&2; exit 1; }

out=$(mktemp)
"$bin" --log warn dev --port-base "$base" >"$out" 2>/dev/null &
pid=$!
trap 'kill -INT $pid 2>/dev/null || true; wait $pid 2>/dev/null || true; rm -f "$out"' EXIT
for _ in $(seq 1 300); do grep -q '^ready$' "$out" && break; sleep 0.1; done
grep -q '^ready$' "$out" || { echo "transcode.sh: meshgate dev did not become ready" >&2; cat "$out" >&2; exit 1; }

gw="http://127.0.0.1:$((base + 80))"
a=$(curl -s "$gw/api/orders/1001" | wc -c)
b=$(curl -s "$gw/v1/orders/1001" | wc -c)
echo "payload: plain $a bytes, transcoded $b bytes; $rounds rounds of ${secs}s, $conns connections, 2 wrk threads"
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
rps() { wrk -t2 -c"$conns" -d"${secs}s" "$1" | awk '/Requests\/sec/ {print $2}'; }
plain=()
trans=()
for i in $(seq 1 "$rounds"); do
  p=$(rps "$gw/api/orders/1001")
  t=$(rps "$gw/v1/orders/1001")
  plain+=("$p")
  trans+=("$t")
  echo "round $i: plain $p req/s, transcoded $t req/s"
done
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
mp=$(median "${plain[@]}")
mt=$(median "${trans[@]}")
echo "median: plain $mp req/s, transcoded $mt req/s, ratio $(awk -v t="$mt" -v p="$mp" 'BEGIN {printf "%.2f", t / p}') (target >= 0.80)"
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
