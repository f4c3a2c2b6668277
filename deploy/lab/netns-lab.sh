#!/usr/bin/env bash
# A multi-host lab on one machine: N network namespaces ("nodes") on a veth bridge that lives in
# a namespace of its own, addresses 198.18.0.1.. in 198.18.0.0/15 (the benchmarking range).
# Traffic never leaves the machine. Needs root and iproute2.
#
#   netns-lab.sh up   PREFIX [N]   create PREFIX-br and PREFIX-1..PREFIX-N (default N=3);
#                                  node i gets 198.18.0.i/24 on eth0, loopback up
#   netns-lab.sh down PREFIX       delete every namespace of the lab
#   netns-lab.sh link PREFIX I up|down   take node I's link to the bridge up or down
#
# Run a process on node i:  ip netns exec PREFIX-i COMMAND...
set -euo pipefail

cmd=${1:-}
prefix=${2:-}
[ -n "$cmd" ] && [ -n "$prefix" ] || { sed -n '2,12p' "$0"; exit 2; }
[ "$(id -u)" = 0 ] || { echo "netns-lab: needs root" >&2; exit 1; }

case "$cmd" in
  up)
    n=${3:-3}
    br="$prefix-br"
    ip netns add "$br"
    ip -n "$br" link add br0 type bridge
    ip -n "$br" link set br0 up
    ip -n "$br" link set lo up
    for i in $(seq 1 "$n"); do
      ns="$prefix-$i"
      ip netns add "$ns"
      ip link add "mgl$$-$i" type veth peer name "mgr$$-$i"
      ip link set "mgl$$-$i" netns "$ns"
      ip link set "mgr$$-$i" netns "$br"
      ip -n "$ns" link set "mgl$$-$i" name eth0
      ip -n "$br" link set "mgr$$-$i" name "port$i"
      ip -n "$br" link set "port$i" master br0
      ip -n "$br" link set "port$i" up
      ip -n "$ns" addr add "198.18.0.$i/24" dev eth0
      ip -n "$ns" link set eth0 up
      ip -n "$ns" link set lo up
    done
    ;;
  down)
    for ns in $(ip netns list | awk '{print $1}' | grep -E "^$prefix-(br|[0-9]+)$" || true); do
      ip netns pids "$ns" 2>/dev/null | xargs -r kill 2>/dev/null || true
      ip netns del "$ns"
    done
    ;;
  link)
    i=${3:?node index}
    state=${4:?up or down}
    ip -n "$prefix-br" link set "port$i" "$state"
    ;;
  *)
    sed -n '2,12p' "$0"; exit 2 ;;
esac
