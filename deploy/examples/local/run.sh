#!/bin/sh
# A CA, three node agents and a gateway on one host (127.0.0.1), as separate processes with
# the configs of this directory: a real deployment in miniature.
#
#   deploy/examples/local/run.sh [STATE_DIR]        (default: ./meshgate-local)
#
# It copies the configs into STATE_DIR, creates the CA there (once), writes the CA fingerprint
# into the copies, makes a join token for each node that has not joined yet, validates every
# config, starts the demo service twice (users on node-1 and node-2), the CA, the agents and the
# gateway, waits until all are ready, prints what to try, and stops everything on Ctrl-C or
# SIGTERM. Run it again with the same STATE_DIR and the nodes restart from their certificates.
#
# Environment: MESHGATE (the binary, default `meshgate` on PATH), PORT_BLOCK (the thousands of
# every port, default 25: ports 25000-25999).
set -eu

here=$(cd "$(dirname "$0")" && pwd)
state=${1:-./meshgate-local}
mg=${MESHGATE:-meshgate}
block=${PORT_BLOCK:-25}

if ! command -v "$mg" >/dev/null 2>&1; then
    echo "run.sh: cannot find $mg: build it (cargo build --release) and set MESHGATE=target/release/meshgate, or install it with cargo install --path cli" >&2
    exit 1
fi
case $block in
    [1-5][0-9] | 6[0-4]) ;;
    *) echo "run.sh: PORT_BLOCK=$block must be 10..64 (ports \${PORT_BLOCK}000-\${PORT_BLOCK}999)" >&2; exit 1 ;;
esac

mkdir -p "$state/logs"
cd "$state"

# configs, moved to the port block
for f in ca.yaml node-1.yaml node-2.yaml node-3.yaml gateway.yaml; do
    sed -e "s/127\.0\.0\.1:25\([0-9][0-9][0-9]\)/127.0.0.1:${block}\1/g" \
        -e "s/port: 25\([0-9][0-9][0-9]\)/port: ${block}\1/g" "$here/$f" > "$f"
done

# the CA, once
if [ ! -f ca/root.crt ]; then
    "$mg" -q ca init --trust-domain mesh.example --data-dir ca > /dev/null
fi
fp=$("$mg" ca fingerprint --data-dir ca)
zero=sha256:0000000000000000000000000000000000000000000000000000000000000000
for f in node-1.yaml node-2.yaml node-3.yaml gateway.yaml; do
    sed "s/$zero/$fp/" "$f" > "$f.tmp" && mv "$f.tmp" "$f"
done

# a join token for every node that holds no certificate yet (mode 0600)
token() { # node services
    if [ ! -f "$1/node.crt" ]; then
        (umask 077 && "$mg" -q ca token create --data-dir ca --node "$1" --services "$2" --ttl 10m > "$1.token")
    fi
}
token node-1 users
token node-2 users
token node-3 web
token gateway gateway

"$mg" config validate ca.yaml node-1.yaml node-2.yaml node-3.yaml gateway.yaml

pids=""
start() { # name command...
    name=$1
    shift
    "$@" > "logs/$name.log" 2>&1 &
    pids="$pids $!"
}
stop() {
    trap - INT TERM EXIT
    for p in $pids; do kill -TERM "$p" 2>/dev/null || true; done
    for p in $pids; do wait "$p" 2>/dev/null || true; done
    echo "stopped"
}
trap 'stop; exit 0' INT TERM
trap stop EXIT

start users-1 "$mg" demo --listen "127.0.0.1:${block}181" --instance node-1
start users-2 "$mg" demo --listen "127.0.0.1:${block}281" --instance node-2
start ca "$mg" ca serve --config ca.yaml
start node-1 "$mg" agent --config node-1.yaml
start node-2 "$mg" agent --config node-2.yaml
start node-3 "$mg" agent --config node-3.yaml
start gateway "$mg" gateway --config gateway.yaml

# ready when every admin API says so (30 s at most); the agents keep trying until the CA is up
for admin in 100 200 300 001; do
    n=0
    until "$mg" -q status --admin "127.0.0.1:${block}$admin" > /dev/null 2>&1; do
        n=$((n + 1))
        if [ "$n" -gt 150 ]; then
            echo "run.sh: 127.0.0.1:${block}$admin is not ready after 30s; see $state/logs/" >&2
            "$mg" status --admin "127.0.0.1:${block}$admin" >&2 || true
            exit 1
        fi
        sleep 0.2
    done
done

cat <<EOF
meshgate on one host: a CA, node-1 and node-2 (users), node-3 (web) and a gateway; state and logs in $state

  curl -s http://127.0.0.1:${block}080/api/users/7          # through the gateway to node-1 or node-2
  curl -s http://127.0.0.1:${block}391/users/7              # east-west: web's upstream listener on node-3
  $mg status --admin 127.0.0.1:${block}300                  # node-3: ready, certificates
  $mg routes --admin 127.0.0.1:${block}001                  # the gateway's routes
  $mg endpoints users --admin 127.0.0.1:${block}300         # users as node-3 sees it
ready
EOF

# until Ctrl-C or SIGTERM (or a process dies)
while :; do
    for p in $pids; do
        if ! kill -0 "$p" 2>/dev/null; then
            echo "run.sh: a process exited; see $state/logs/" >&2
            exit 1
        fi
    done
    sleep 1 &
    wait $! || true
done
