#!/usr/bin/env python3
"""What deploy/kubernetes must keep true beyond schema validity, checked by deploy/check.sh.

Usage: check_manifests.py [RENDERED.yaml ...]  (the `kubectl kustomize` outputs, if any)

- The PodMonitor against a schema of the fields used here (kubernetes-validate has no schemas
  for custom resources), transcribed from the Prometheus Operator API (monitoring.coreos.com/v1).
- The sidecar and the pod agree with spillway.yaml: ports, proxy variables, the queue volume
  under storage.path, the admin token, a termination grace above shutdown_grace, the
  emptyDir's sizeLimit above what the routes' limits can store.
- The Deployment (base) and the StatefulSet (overlay) carry the same spillway container.
"""

import re
import sys
from pathlib import Path

import jsonschema
import yaml

HERE = Path(__file__).resolve().parent
errors = []


def fail(where, msg):
    errors.append(f"{where}: {msg}")


def load(path):
    return [d for d in yaml.safe_load_all(Path(path).read_text()) if d]


UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def seconds(text):
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)", str(text).strip())
    if not m:
        raise ValueError(f"not a duration: {text}")
    return float(m.group(1)) * UNITS[m.group(2)]


SIZES = {"": 1, "B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "KB": 1000, "MB": 10**6,
         "GB": 10**9, "Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "k": 1000, "M": 10**6, "G": 10**9}


def size(text):
    m = re.fullmatch(r"(\d+)\s*([A-Za-z]*)", str(text).strip())
    if not m or m.group(2) not in SIZES:
        raise ValueError(f"not a size: {text}")
    return int(m.group(1)) * SIZES[m.group(2)]


def port(addr):
    return int(str(addr).rsplit(":", 1)[1])


POD_MONITOR_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PodMonitor"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "required": ["selector", "podMetricsEndpoints"],
            "additionalProperties": False,
            "properties": {
                "selector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
                        "matchExpressions": {"type": "array"},
                    },
                },
                "namespaceSelector": {"type": "object"},
                "podMetricsEndpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string"},
                            "scheme": {"enum": ["http", "https"]},
                            "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                            "scrapeTimeout": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                            "honorLabels": {"type": "boolean"},
                            "relabelings": {"type": "array"},
                            "metricRelabelings": {"type": "array"},
                            "authorization": {
                                "type": "object",
                                "additionalProperties": False,
                                "properties": {
                                    "type": {"type": "string"},
                                    "credentials": {
                                        "type": "object",
                                        "required": ["name", "key"],
                                        "additionalProperties": False,
                                        "properties": {
                                            "name": {"type": "string"},
                                            "key": {"type": "string"},
                                            "optional": {"type": "boolean"},
                                        },
                                    },
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}


def check_pod_monitor(pm, pod_labels, sidecar, where):
    try:
        jsonschema.validate(pm, POD_MONITOR_SCHEMA)
    except jsonschema.ValidationError as e:
        fail(where, f"PodMonitor: {e.message} at {list(e.absolute_path)}")
        return
    for k, v in pm["spec"]["selector"].get("matchLabels", {}).items():
        if pod_labels.get(k) != v:
            fail(where, f"PodMonitor selects {k}={v}, which the pod template lacks")
    ports = {p["name"] for p in sidecar.get("ports", [])}
    for ep in pm["spec"]["podMetricsEndpoints"]:
        if ep.get("port") not in ports:
            fail(where, f"PodMonitor scrapes port {ep.get('port')!r}, not a spillway port")
        if ep.get("path", "/metrics") != "/metrics":
            fail(where, "PodMonitor path is not /metrics")


def env_of(container):
    return {e["name"]: e for e in container.get("env", [])}


def check_workload(w, cfg, where):
    spec = w["spec"]["template"]["spec"]
    init = {c["name"]: c for c in spec.get("initContainers", [])}
    sc = init.get("spillway")
    if sc is None:
        fail(where, "no spillway init container")
        return None
    if sc.get("restartPolicy") != "Always":
        fail(where, "spillway is not a native sidecar (restartPolicy: Always)")
    probes = {
        "startupProbe": "/healthz",
        "readinessProbe": "/readyz",
        "livenessProbe": "/healthz",
    }
    for probe, path in probes.items():
        got = sc.get(probe, {}).get("httpGet", {})
        if got.get("path") != path or got.get("port") != "admin":
            fail(where, f"{probe} must get {path} on the admin port, has {got}")
    sec = sc.get("securityContext", {})
    for key, want in (("runAsNonRoot", True), ("readOnlyRootFilesystem", True),
                      ("allowPrivilegeEscalation", False)):
        if sec.get(key) is not want:
            fail(where, f"spillway securityContext.{key} must be {want}")
    if sec.get("capabilities", {}).get("drop") != ["ALL"]:
        fail(where, "spillway must drop ALL capabilities")
    res = sc.get("resources", {})
    for k in ("requests.cpu", "requests.memory", "limits.memory"):
        a, b = k.split(".")
        if b not in res.get(a, {}):
            fail(where, f"spillway resources.{k} missing")
    if "--config" not in " ".join(sc.get("args", [])) and "/etc/spillway/spillway.yaml" not in sc.get("args", []):
        fail(where, "spillway args do not name /etc/spillway/spillway.yaml")

    ports = {p["name"]: p["containerPort"] for p in sc.get("ports", [])}
    if ports.get("proxy") != port(cfg["listen"]):
        fail(where, f"proxy containerPort {ports.get('proxy')} != listen {cfg['listen']}")
    if ports.get("admin") != port(cfg["admin"]["listen"]):
        fail(where, f"admin containerPort {ports.get('admin')} != admin.listen {cfg['admin']['listen']}")
    if not str(cfg["listen"]).startswith("127.0.0.1:"):
        fail(where, "listen must stay on loopback: only the pod's app may use the proxy")
    if not str(cfg["admin"]["listen"]).startswith("127."):
        var = cfg["admin"].get("token_env")
        if not var or var not in env_of(sc):
            fail(where, "admin listens beyond loopback: the token variable must be set")

    grace = spec.get("terminationGracePeriodSeconds", 30)
    need = seconds(cfg.get("shutdown_grace", "25s"))
    if grace < need + 10:
        fail(where, f"terminationGracePeriodSeconds {grace} leaves spillway less than shutdown_grace ({need}s) + 10s after the app")

    mounts = {m["name"]: m["mountPath"] for m in sc.get("volumeMounts", [])}
    store_dir = str(Path(cfg["storage"]["path"]).parent)
    if mounts.get("spillway-queue") != store_dir:
        fail(where, f"the queue volume is mounted at {mounts.get('spillway-queue')}, storage.path is in {store_dir}")
    if mounts.get("spillway-config") != "/etc/spillway":
        fail(where, "the config volume must be mounted at /etc/spillway")

    proxy_url = f"http://127.0.0.1:{port(cfg['listen'])}"
    for c in spec.get("containers", []):
        env = env_of(c)
        for name in ("HTTP_PROXY", "http_proxy"):
            if env.get(name, {}).get("value") != proxy_url:
                fail(where, f"container {c['name']}: {name} must be {proxy_url}")
        np = [env.get(n, {}).get("value") for n in ("NO_PROXY", "no_proxy")]
        if np[0] is None or np[0] != np[1] or "127.0.0.1" not in np[0].split(","):
            fail(where, f"container {c['name']}: NO_PROXY and no_proxy must both be set, equal, and hold 127.0.0.1")
        for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
            if name in env:
                fail(where, f"container {c['name']}: {name} would tunnel https through spillway (no deferral)")
    return sc


def deferrable_bytes(cfg):
    body = size(cfg.get("limits", {}).get("max_body_bytes", "1MiB"))
    total = 0
    for r in cfg.get("routes", []):
        if r.get("deferrable"):
            total += body * int(r.get("queue", {}).get("max_depth", 100000))
    return total


def main(rendered):
    cfg = yaml.safe_load((HERE / "base/spillway.yaml").read_text())
    [dep] = load(HERE / "base/deployment.yaml")
    [sts] = load(HERE / "overlays/statefulset/statefulset.yaml")
    [pm] = load(HERE / "base/podmonitor.yaml")

    sc_dep = check_workload(dep, cfg, "base/deployment.yaml")
    sc_sts = check_workload(sts, cfg, "overlays/statefulset/statefulset.yaml")
    if sc_dep is not None and sc_sts is not None and sc_dep != sc_sts:
        fail("overlays/statefulset/statefulset.yaml", "its spillway container differs from base/deployment.yaml's")
    if dep["spec"]["template"]["spec"].get("containers") != sts["spec"]["template"]["spec"].get("containers"):
        fail("overlays/statefulset/statefulset.yaml", "its app container differs from base/deployment.yaml's")

    vols = {v["name"]: v for v in dep["spec"]["template"]["spec"].get("volumes", [])}
    ed = vols.get("spillway-queue", {}).get("emptyDir")
    if ed is None:
        fail("base/deployment.yaml", "the queue must be an emptyDir")
    else:
        if ed.get("medium") == "Memory":
            fail("base/deployment.yaml", "never a tmpfs queue: it dies with a reboot and counts as memory")
        if "sizeLimit" not in ed:
            fail("base/deployment.yaml", "the queue emptyDir needs a sizeLimit")
        elif deferrable_bytes(cfg) * 2 > size(ed["sizeLimit"]):
            fail("base/deployment.yaml", f"sizeLimit {ed['sizeLimit']} is below twice what the deferrable routes may hold undelivered ({deferrable_bytes(cfg)} bytes)")
    if "spillway-queue" in {v["name"] for v in sts["spec"]["template"]["spec"].get("volumes", [])}:
        fail("overlays/statefulset/statefulset.yaml", "the queue must come from volumeClaimTemplates, not a pod volume")
    vct = {v["metadata"]["name"]: v for v in sts["spec"].get("volumeClaimTemplates", [])}
    claim = vct.get("spillway-queue")
    if claim is None or claim["spec"].get("accessModes") != ["ReadWriteOnce"]:
        fail("overlays/statefulset/statefulset.yaml", "needs a ReadWriteOnce spillway-queue claim template")
    elif deferrable_bytes(cfg) * 2 > size(claim["spec"]["resources"]["requests"]["storage"]):
        fail("overlays/statefulset/statefulset.yaml", "the claim is smaller than twice the routes' undelivered limit")

    if sc_dep is not None:
        check_pod_monitor(pm, dep["spec"]["template"]["metadata"]["labels"], sc_dep, "base/podmonitor.yaml")

    # The rendered outputs: the generated ConfigMap carries the file as is, images resolve.
    for path in rendered:
        docs = load(path)
        kinds = sorted(d["kind"] for d in docs)
        # The nats overlay brings its own config; the others carry base's.
        own = "overlays/nats/spillway.yaml" if "overlays_nats" in Path(path).name else "base/spillway.yaml"
        cms = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "spillway-config"]
        if len(cms) != 1 or cms[0]["data"].get("spillway.yaml") != (HERE / own).read_text():
            fail(path, f"no spillway-config ConfigMap holding {own}")
        if own.startswith("overlays/nats"):
            ncfg = yaml.safe_load((HERE / own).read_text())
            if ncfg.get("storage", {}).get("backend") != "nats":
                fail(own, "storage.backend must be nats")
            for w in docs:
                if w["kind"] != "Deployment":
                    continue
                pod = w["spec"]["template"]["spec"]
                if "spillway-queue" in {v["name"] for v in pod.get("volumes", [])}:
                    fail(path, "a NATS-backed pod needs no local queue volume")
                creds = ncfg["storage"].get("credentials_file")
                mounts = [m["mountPath"] for c in pod["initContainers"] if c["name"] == "spillway" for m in c.get("volumeMounts", [])]
                if creds and not any(creds.startswith(m.rstrip("/") + "/") for m in mounts):
                    fail(path, f"storage.credentials_file {creds} is not under a mounted volume")
        workloads = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]
        if len(workloads) != 1:
            fail(path, f"expected one workload, got {kinds}")
        for w in workloads:
            for c in w["spec"]["template"]["spec"]["initContainers"]:
                if c["name"] == "spillway" and ":" not in c["image"]:
                    fail(path, f"spillway image not resolved by kustomize: {c['image']}")
            if w["kind"] == "StatefulSet" and not any(d["kind"] == "Service" and d["metadata"]["name"] == w["spec"]["serviceName"] for d in docs):
                fail(path, "the StatefulSet's governing Service is missing")

    for e in errors:
        print(e, file=sys.stderr)
    if errors:
        return 1
    print(f"manifests consistent with spillway.yaml ({len(rendered)} rendered outputs checked)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
