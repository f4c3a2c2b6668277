#!/usr/bin/env bash
# routes-10k.sh [ROUNDS] — the gateway path (mg-gw of ../shared/bench) with one route and with
# 10,000, in alternating rounds so a busy machine weighs on both alike.
#
#   BENCH=path/to/shared/bench (default ../shared/bench), MG=target/release/meshgate
#
# Each round is one peers.sh run of the `mg-gw` shape (wrk -c50 and -c1; see peers.sh). For the
# 10,000-route rounds, MG is a wrapper that adds 9,999 host-qualified prefix routes
# (`api.example` /svcN, never matched by the load) in front of the shape's catch-all route, so
# every request is looked up in the full table and lands on the last route. Prints each round's
# c50 requests/s, the medians and their ratio (target: 10,000 routes >= 0.9x one route).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
BENCH="$(realpath "${BENCH:-$HERE/../../../shared/bench}")"
MG="$(realpath "${MG:-target/release/meshgate}")"
ROUNDS=${1:-3}
[ -x "$MG" ] || { echo "routes-10k.sh: no meshgate at $MG (cargo build --release -p meshgate)" >&2; exit 2; }
[ -x "$BENCH/peers.sh" ] || { echo "routes-10k.sh: no peers.sh in $BENCH (set BENCH)" >&2; exit 2; }
RUN=$(mktemp -d); trap 'rm -rf "$RUN"' EXIT
cat >"$RUN/mg-10k" <<EOF
#!/usr/bin/env bash
# meshgate, but a gateway's config gets 9,999 more routes first
prev=""
for a in "\$@"; do
  if [ "\$prev" = "--config" ] && grep -q '^routes:' "\$a" && grep -q 'identity: gateway' "\$a"; then
    python3 - "\$a" <<'PY'
import sys
p = sys.argv[1]
extra = "".join(
    f"  - {{ name: r{i}, match: {{ hosts: [api.example], path: {{ prefix: /svc{i} }} }}, backend: {{ service: backend }} }}\n"
    for i in range(9999))
s = open(p).read()
open(p, "w").write(s.replace("routes:\n", "routes:\n" + extra, 1))
PY
  fi
  prev=\$a
done
exec "$MG" "\$@"
EOF
chmod +x "$RUN/mg-10k"
round() { # MG-binary -> c50 rps
  RUN_DIR="$RUN/r" MG="$1" RUNS=1 LOADS=c50 PROTO=http SUT_HEADER="" SUT_SCHEME=http SUT_NAME=mg-gw \
    SUT_PORT=18090 SUT_CMD="$BENCH/sut-meshgate.sh gw" "$BENCH/peers.sh" mg-gw 2>"$RUN/log" |
    awk '/^config=mg-gw /{for (i = 1; i <= NF; i++) if ($i ~ /^rps=/) print substr($i, 5)}'
}
mkdir -p "$RUN/r"
one=(); many=()
for i in $(seq 1 "$ROUNDS"); do
  a=$(round "$MG"); b=$(round "$RUN/mg-10k")
  [ -n "$a" ] && [ -n "$b" ] || { echo "routes-10k.sh: a round failed:" >&2; tail -20 "$RUN/log" >&2; exit 1; }
  one+=("$a"); many+=("$b")
  echo "round $i: 1 route $a req/s, 10,000 routes $b req/s"
done
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
m1=$(median "${one[@]}"); m2=$(median "${many[@]}")
echo "median: 1 route $m1 req/s, 10,000 routes $m2 req/s, ratio $(awk -v a="$m2" -v b="$m1" 'BEGIN {printf "%.2f", a / b}') (target >= 0.90)"
