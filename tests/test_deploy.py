"""deploy/: Kubernetes manifests valid against the schemas, references that resolve,
the embedded relay config loading, and an image definition that keeps its promises."""

from __future__ import annotations

import posixpath
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from relay import config as relay_config

kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="pip install kubernetes-validate (ships its schemas)")

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
BASE = DEPLOY / "kubernetes" / "base"
SIDECAR = DEPLOY / "kubernetes" / "examples" / "sidecar.yaml"
K8S_VERSION = "1.30.0"  # native sidecars (1.29+) and everything else used here


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]


def manifest_files() -> list[Path]:
    return sorted(p for p in (DEPLOY / "kubernetes").rglob("*.yaml")
                  if p.name != "kustomization.yaml")


def base_objects() -> list[dict]:
    kust = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    return [d for f in kust["resources"] for d in docs(BASE / f)]


def find(objs: list[dict], kind: str, name: str | None = None) -> dict:
    hits = [o for o in objs if o["kind"] == kind and (name is None or
                                                      o["metadata"]["name"] == name)]
    assert len(hits) == 1, f"expected one {kind} {name or ''}, found {len(hits)}"
    return hits[0]


def pod_spec(obj: dict) -> dict:
    return obj["spec"]["template"]["spec"]


def containers(obj: dict) -> list[dict]:
    spec = pod_spec(obj)
    return spec.get("containers", []) + [c for c in spec.get("initContainers", [])
                                         if c.get("restartPolicy") == "Always"]


# --- schema validation ------------------------------------------------------------------

def all_docs() -> list[tuple[str, dict]]:
    return [(f"{p.relative_to(DEPLOY)}#{i}", d) for p in manifest_files()
            for i, d in enumerate(docs(p))]


@pytest.mark.parametrize("where,obj", all_docs(), ids=[w for w, _ in all_docs()])
def test_manifest_validates(where: str, obj: dict) -> None:
    if obj["apiVersion"].startswith("monitoring.coreos.com/"):
        check_servicemonitor(obj)  # a CRD: no schema in kubernetes-validate
        return
    # strict: unknown fields (a typo such as `livenesProbe`) are errors too
    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_validation_catches_mistakes() -> None:
    sts = find(base_objects(), "StatefulSet")
    broken = yaml.safe_load(yaml.safe_dump(sts))
    pod_spec(broken)["containers"][0]["livenesProbe"] = pod_spec(broken)["containers"][0].pop(
        "livenessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)
    broken = yaml.safe_load(yaml.safe_dump(sts))
    pod_spec(broken)["containers"][0]["ports"][0]["containerPort"] = "2525"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def check_servicemonitor(sm: dict) -> None:
    """A structural check of the Prometheus Operator's ServiceMonitor (CRD)."""
    assert sm["apiVersion"] == "monitoring.coreos.com/v1" and sm["kind"] == "ServiceMonitor"
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", sm["metadata"]["name"])
    spec = sm["spec"]
    assert set(spec) <= {"jobLabel", "selector", "endpoints", "namespaceSelector",
                         "targetLabels", "podTargetLabels", "sampleLimit"}
    assert spec["selector"]["matchLabels"]
    for ep in spec["endpoints"]:
        assert set(ep) <= {"port", "path", "interval", "scrapeTimeout", "scheme",
                           "honorLabels", "relabelings", "metricRelabelings"}
        assert isinstance(ep["port"], str) and ep["path"].startswith("/")
        for k in ("interval", "scrapeTimeout"):
            if k in ep:
                assert re.fullmatch(r"\d+(ms|s|m|h)", ep[k]), ep[k]


# --- kustomize --------------------------------------------------------------------------

def test_kustomization_lists_existing_files_and_nothing_is_left_out() -> None:
    kust = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    assert kust["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kust["kind"] == "Kustomization"
    listed = kust["resources"]
    for f in listed:
        assert (BASE / f).is_file(), f"kustomization lists missing {f}"
    on_disk = {p.name for p in BASE.glob("*.yaml")} - {"kustomization.yaml"}
    assert on_disk == set(listed), "files in base/ that the kustomization does not list"
    # the `images:` rewrite must hit an image the manifests use
    names = {c["image"] for o in base_objects() if o["kind"] == "StatefulSet"
             for c in containers(o)}
    assert {i["name"] for i in kust.get("images", [])} <= names


def test_kustomize_build() -> None:
    kubectl = shutil.which("kubectl")
    kustomize = shutil.which("kustomize")
    if kustomize:
        cmd = [kustomize, "build", str(BASE)]
    elif kubectl:
        cmd = [kubectl, "kustomize", str(BASE)]
    else:
        pytest.skip("neither kustomize nor kubectl installed")
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    built = [d for d in yaml.safe_load_all(res.stdout) if d]
    assert sorted((o["kind"], o["metadata"]["name"]) for o in built) == sorted(
        (o["kind"], o["metadata"]["name"]) for o in base_objects())
    [sts] = [o for o in built if o["kind"] == "StatefulSet"]
    assert pod_spec(sts)["containers"][0]["image"] == "ghcr.io/example/relay:0.1.0"


# --- references inside the base -----------------------------------------------------------

def test_services_select_the_pods_and_name_real_ports() -> None:
    objs = base_objects()
    sts = find(objs, "StatefulSet")
    labels = sts["spec"]["template"]["metadata"]["labels"]
    assert sts["spec"]["selector"]["matchLabels"].items() <= labels.items()
    ports = {p["name"]: p["containerPort"] for c in containers(sts) for p in c["ports"]}
    services = [o for o in objs if o["kind"] == "Service"]
    for svc in services:
        assert svc["spec"]["selector"].items() <= labels.items(), svc["metadata"]["name"]
        for p in svc["spec"]["ports"]:
            assert p["targetPort"] in ports or p["targetPort"] in ports.values()
    headless = find(objs, "Service", sts["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    main = find(objs, "Service", "relay")
    assert {(p["port"], ports[p["targetPort"]]) for p in main["spec"]["ports"]} == {
        (25, 2525), (587, 2587), (143, 1143), (110, 1110)}
    metrics_svc = find(objs, "Service", "relay-metrics")
    assert [(p["port"], ports[p["targetPort"]]) for p in metrics_svc["spec"]["ports"]] == [
        (9325, 9325)]
    # not-ready pods must still be scraped: that is when relay_ready says why
    assert metrics_svc["spec"]["publishNotReadyAddresses"] is True


def test_servicemonitor_finds_the_metrics_service_and_names_job_relay() -> None:
    objs = base_objects()
    sm = find(objs, "ServiceMonitor")
    [svc] = [s for s in objs if s["kind"] == "Service" and
             sm["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()]
    assert {p["name"] for p in svc["spec"]["ports"]} >= {e["port"] for e in sm["spec"]["endpoints"]}
    # alerts.yml and the dashboard select job="relay"
    assert svc["metadata"]["labels"][sm["spec"]["jobLabel"]] == "relay"
    assert 'job="relay"' in (DEPLOY / "prometheus" / "alerts.yml").read_text()


def test_pdb_selects_the_pods() -> None:
    objs = base_objects()
    labels = find(objs, "StatefulSet")["spec"]["template"]["metadata"]["labels"]
    pdb = find(objs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()


def check_volumes(obj: dict, objs: list[dict]) -> None:
    spec = pod_spec(obj)
    vols = {v["name"]: v for v in spec.get("volumes", [])}
    claims = {t["metadata"]["name"] for t in obj["spec"].get("volumeClaimTemplates", [])}
    for c in containers(obj):
        for m in c.get("volumeMounts", []):
            assert m["name"] in vols or m["name"] in claims, m["name"]
        paths = [m["mountPath"] for m in c.get("volumeMounts", [])]
        for a in paths:
            for b in paths:
                # a mount nested in a read-only ConfigMap/Secret volume cannot be created
                assert a == b or not b.startswith(a.rstrip("/") + "/"), (a, b)
    for v in vols.values():
        if "configMap" in v:
            find(objs, "ConfigMap", v["configMap"]["name"])
        if "secret" in v:
            find(objs, "Secret", v["secret"]["secretName"])
        if "persistentVolumeClaim" in v:
            find(objs, "PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"])


def test_volumes_resolve() -> None:
    objs = base_objects()
    check_volumes(find(objs, "StatefulSet"), objs)
    side = docs(SIDECAR)
    check_volumes(find(side, "Deployment"), side)


def test_statefulset_behaviour() -> None:
    sts = find(base_objects(), "StatefulSet")
    spec = pod_spec(sts)
    [c] = spec["containers"]
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["resources"]["requests"] and c["resources"]["limits"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] != 0
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    # the drain needs time: preStop plus the sessions after SIGTERM
    assert spec["terminationGracePeriodSeconds"] >= 120
    cmd = c["lifecycle"]["preStop"]["exec"]["command"]
    assert cmd[:4] == ["relay", "queue", "drain", "--to"]
    host, port = cmd[4].rsplit(":", 1)
    svc = find(base_objects(), "Service", host)
    assert int(port) in {p["port"] for p in svc["spec"]["ports"] if p["name"] == "smtp"}
    [tpl] = sts["spec"]["volumeClaimTemplates"]
    assert tpl["spec"]["accessModes"] == ["ReadWriteOnce"]
    quarantine = find(base_objects(), "PersistentVolumeClaim", "relay-quarantine")
    assert quarantine["spec"]["accessModes"] == ["ReadWriteMany"]


# --- the relay config in the ConfigMaps ------------------------------------------------------

def materialise(obj: dict, objs: list[dict], container: dict, tmp: Path) -> dict[str, Path]:
    """Lay the container's ConfigMap/Secret mounts out under tmp, as the kubelet would:
    mountPath -> directory holding exactly the keys of that ConfigMap or Secret."""
    vols = {v["name"]: v for v in pod_spec(obj).get("volumes", [])}
    out: dict[str, Path] = {}
    for m in container.get("volumeMounts", []):
        v = vols.get(m["name"])
        d = tmp / m["mountPath"].lstrip("/")
        d.mkdir(parents=True, exist_ok=True)
        out[m["mountPath"]] = d
        if v is None:
            continue
        if "configMap" in v:
            data = find(objs, "ConfigMap", v["configMap"]["name"]).get("data", {})
        elif "secret" in v:
            s = find(objs, "Secret", v["secret"]["secretName"])
            data = {**s.get("stringData", {}), **s.get("data", {})}
        else:
            continue
        for key, text in data.items():
            (d / key).write_text(text)
    return out


def load_pod_config(obj: dict, objs: list[dict], tmp: Path) -> tuple[Any, dict, dict]:
    [c] = [c for c in containers(obj) if any(e["name"] == "RELAY_CONFIG"
                                              for e in c.get("env", []))]
    env = {e["name"]: e["value"] for e in c["env"] if "value" in e}
    mounts = materialise(obj, objs, c, tmp)
    cfg_path = tmp / env["RELAY_CONFIG"].lstrip("/")
    assert cfg_path.is_file(), f"RELAY_CONFIG {env['RELAY_CONFIG']} is in no mounted volume"
    text = cfg_path.read_text()
    # Point the absolute paths at the laid-out tree: a file the config names must be a
    # key of a mounted Secret/ConfigMap, or relay.config.load refuses it.
    alts = "|".join(re.escape(m) for m in sorted(mounts, key=len, reverse=True))
    text = re.sub(rf"(?<=[\s\"'])({alts})(?=[/\"'\s])", lambda m: str(mounts[m.group(1)]), text)
    cfg_path.write_text(text)
    cfg = relay_config.load(cfg_path, environ={})
    return cfg, mounts, c


def under(path: str, mounts: dict[str, Path]) -> bool:
    return any(path.startswith(str(d) + "/") for d in mounts.values())


def test_base_config_loads_and_matches_the_pod(tmp_path: Path) -> None:
    objs = base_objects()
    sts = find(objs, "StatefulSet")
    cfg, mounts, c = load_pod_config(sts, objs, tmp_path)
    ports = {p["containerPort"] for p in c["ports"]}
    by_name = {p["name"]: p["containerPort"] for p in c["ports"]}
    # inside the pod: every interface, on the ports the container declares
    for lst in cfg.listeners:
        assert lst.address.host == "0.0.0.0" and lst.address.port in ports, lst
    assert {lst.role: lst.address.port for lst in cfg.listeners} == {
        "mta": by_name["smtp"], "submission": by_name["submission"]}
    assert cfg.http.address.host == "0.0.0.0" and cfg.http.address.port == by_name["metrics"]
    assert cfg.quarantine.imap_address.port == by_name["imap"]
    assert cfg.quarantine.pop3_address.port == by_name["pop3"]
    # the spool on the per-pod claim, the quarantine on the shared one
    spool_mount = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert Path(cfg.spool.path) == mounts[spool_mount["spool"]]
    assert Path(cfg.quarantine.path) == mounts[spool_mount["quarantine"]]
    # TLS and DKIM keys come from the Secrets (the files exist only if a Secret has them)
    assert Path(cfg.tls.cert_file).is_file() and under(cfg.tls.cert_file, mounts)
    assert Path(cfg.quarantine.users_file).is_file()
    [dkim] = [f for f in cfg.filters if f.name == "dkim"]
    from filters.dkim import DKIMOptions
    opts = relay_config.parse_section(DKIMOptions, dkim.options, "filters[1].options")
    for key in opts.sign:
        assert Path(key.key_file).is_file(), key.key_file
    # mynetworks never makes an open relay (load() refuses /0; check for the pod range too)
    assert all(n.net.prefixlen >= 8 for n in cfg.access.mynetworks)


def test_config_check_bites(tmp_path: Path) -> None:
    # A config naming a file no Secret provides must fail, or the test above means little.
    objs = yaml.safe_load(yaml.safe_dump(base_objects()))
    cm = find(objs, "ConfigMap", "relay-config")
    cm["data"]["relay.yaml"] = cm["data"]["relay.yaml"].replace("tls/tls.crt", "tls/cert.pem")
    with pytest.raises(relay_config.ConfigError, match="tls.cert_file"):
        load_pod_config(find(objs, "StatefulSet"), objs, tmp_path)


def test_sidecar(tmp_path: Path) -> None:
    side = docs(SIDECAR)
    dep = find(side, "Deployment")
    cfg, mounts, relay_c = load_pod_config(dep, side, tmp_path)
    # SMTP only on loopback, only loopback may relay; delivery via the central relay
    assert [(lst.address.host, lst.address.port) for lst in cfg.listeners] == [
        ("127.0.0.1", 2525)]
    assert [str(n) for n in cfg.access.mynetworks] == ["127.0.0.0/8", "::1/128"]
    assert cfg.delivery.relayhost == ("[relay]:25",)
    assert relay_c["restartPolicy"] == "Always"  # native sidecar: up before the app
    assert relay_c["lifecycle"]["preStop"]["exec"]["command"][:4] == [
        "relay", "queue", "drain", "--to"]
    # the probes reach the HTTP listener from the kubelet (pod IP, not loopback)
    assert cfg.http.address.host == "0.0.0.0"
    assert {p["containerPort"] for p in relay_c["ports"]} == {cfg.http.address.port}
    [app] = pod_spec(dep)["containers"]
    env = {e["name"]: e.get("value") for e in app.get("env", [])}
    assert (env["SMTP_HOST"], int(env["SMTP_PORT"])) == ("localhost", 2525)


# --- the image ----------------------------------------------------------------------------

def dockerfile() -> list[tuple[str, str]]:
    text = (DEPLOY / "Dockerfile").read_text()
    text = re.sub(r"\\\n", " ", text)
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile() -> None:
    ins = dockerfile()
    froms = [r for w, r in ins if w == "FROM"]
    assert froms and all(f.split()[0] == "python:3.11-slim" for f in froms)
    final = ins[max(i for i, (w, _) in enumerate(ins) if w == "FROM"):]
    users = [r for w, r in final if w == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert any(w == "VOLUME" and "/var/spool/relay" in r for w, r in final)
    [entry] = [r for w, r in final if w == "ENTRYPOINT"]
    entry_argv = yaml.safe_load(entry)  # exec form (a JSON array): signals reach tini
    assert isinstance(entry_argv, list) and posixpath.basename(entry_argv[0]) == "tini"
    assert any(w == "RUN" and "tini" in r for w, r in final)
    [health] = [r for w, r in final if w == "HEALTHCHECK"]
    assert "/healthz" in health and "9325" in health
    # the HEALTHCHECK uses the port the relay's http listener has by default
    assert relay_config.HTTPConfig().address.port == 9325
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    for w, r in ins:
        if w == "COPY" and "--from" not in r:
            for src in r.split()[:-1]:
                assert f"!{src.rstrip('/')}/" in ignore or f"!{src}" in ignore, src


def test_readme_covers_scaling_metrics_and_probes() -> None:
    text = (DEPLOY / "README.md").read_text().lower()
    for word in ("scaling out", "readwritemany", "own queue", "/metrics", "/healthz",
                 "/readyz", "queue drain", "servicemonitor", "sidecar"):
        assert word in text, word


def test_commands_parse_with_the_relay_cli() -> None:
    # The image's CMD, the pods' args and the preStop hooks must be commands the
    # relay's CLI really has (parsed, not run).
    from relay.cli import build_parser
    parser = build_parser()
    argvs = []
    final = dockerfile()
    [entry] = [yaml.safe_load(r) for w, r in final if w == "ENTRYPOINT"]
    [cmd] = [yaml.safe_load(r) for w, r in final if w == "CMD"]
    assert entry[-1] == "relay"
    argvs.append(cmd)
    for obj in [find(base_objects(), "StatefulSet"), find(docs(SIDECAR), "Deployment")]:
        for c in containers(obj):
            if "relay" in c["image"]:
                argvs.append(c["args"])
                hook = c["lifecycle"]["preStop"]["exec"]["command"]
                assert hook[0] == "relay"
                argvs.append(hook[1:])
    assert len(argvs) == 5
    for argv in argvs:
        args = parser.parse_args(argv)
        assert args.cmd in ("serve", "queue"), argv
    with pytest.raises(SystemExit):
        parser.parse_args(["run"])
