"""deploy/kubernetes: the base with every combination of components renders, every object is valid against the
Kubernetes and the Prometheus Operator schemas, the base holds nothing a bare cluster lacks, and the invariants
that keep it working hold (each check is also run on a deliberately broken copy, which it must reject)."""

from __future__ import annotations

import copy
import functools
import itertools
import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jsonschema_rs
import kubernetes_validate
import pytest
import yaml

from app.config import Settings, setting_variables
from app.memory import CGROUP_LIMIT_SHARE
from app.metrics import Metrics
from app.openapi import openapi_document
from app.schemas import Limits
from app.version import __version__
from loadtest.kubernetes import KubeLoader, dockerfile_instruction
from loadtest.kubernetes import render as compose  # the base with components
from loadtest.kubernetes import render_dir as render  # a kustomization directory

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy" / "kubernetes"
COMPONENTS = ("monitoring", "autoscaling", "network-policy", "kubernetes-alerts", "model-download")
"""The optional parts an overlay adds to the base (deploy/kubernetes/components)."""
COMBINATIONS = [c for n in range(len(COMPONENTS) + 1) for c in itertools.combinations(COMPONENTS, n)]
EXAMPLE = DEPLOY / "overlays" / "example"
SETTINGS_MAP = "embedding-service-config"
KUBERNETES_VERSIONS = ("1.30", "1.37")  # the oldest and newest the validator knows that we support
Objects = list[dict[str, Any]]


@pytest.fixture(
    scope="module",
    params=[*COMBINATIONS, "example"],
    ids=lambda c: "+".join(("base", *c)) if c != "example" else "overlays/example",
)
def objects(request: pytest.FixtureRequest) -> Objects:
    return render(EXAMPLE) if request.param == "example" else compose(request.param)


def one(objects: Objects, kind: str) -> dict[str, Any]:
    (found,) = (o for o in objects if o["kind"] == kind)
    return found


def named(objects: Objects, kind: str, name: str) -> dict[str, Any]:
    (found,) = (o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name)
    return found


def maybe(objects: Objects, kind: str) -> dict[str, Any] | None:
    """The one object of ``kind``, or None where no component added it."""
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) <= 1, f"more than one {kind}"
    return found[0] if found else None


def container(objects: Objects) -> dict[str, Any]:
    (main,) = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    return main


def settings_map(objects: Objects) -> dict[str, Any]:
    """The generated ConfigMap of EMBEDDING_* settings (its name carries a content hash)."""
    (found,) = (o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith(SETTINGS_MAP))
    return found


def dashboard_map(objects: Objects) -> dict[str, Any]:
    (found,) = (
        o for o in objects if o["kind"] == "ConfigMap" and "grafana_dashboard" in o["metadata"].get("labels", {})
    )
    return found


def pod_spec(objects: Objects) -> dict[str, Any]:
    spec: dict[str, Any] = one(objects, "Deployment")["spec"]["template"]["spec"]
    return spec


def settings_of(objects: Objects) -> tuple[Settings, set[str]]:
    """The service's settings as the pods get them, and the keys among them that are not settings."""
    data = settings_map(objects)["data"]
    return Settings.from_env(data), set(data) - setting_variables()


# --- schemas ----------------------------------------------------------------------------------------------


@functools.cache
def crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    schemas = {}
    for path in (DEPLOY / "crds").glob("*.yaml"):
        crd = yaml.load(path.read_text(), Loader=KubeLoader)
        for version in crd["spec"]["versions"]:
            api = f"{crd['spec']['group']}/{version['name']}"
            schemas[(api, crd["spec"]["names"]["kind"])] = version["schema"]["openAPIV3Schema"]
    return schemas


def unknown_fields(value: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Fields a structural schema does not declare: the API server would drop them (or refuse, strict)."""
    found: list[str] = []
    if isinstance(value, dict) and "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
        for key, item in value.items():
            if key not in schema["properties"]:
                found.append(f"{path}.{key}")
            else:
                found += unknown_fields(item, schema["properties"][key], f"{path}.{key}")
    elif isinstance(value, dict) and isinstance(schema.get("additionalProperties"), dict):
        for key, item in value.items():
            found += unknown_fields(item, schema["additionalProperties"], f"{path}.{key}")
    elif isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            found += unknown_fields(item, schema["items"], f"{path}[{i}]")
    return found


def schema_errors(obj: dict[str, Any]) -> list[str]:
    return list(_schema_errors(json.dumps(obj, sort_keys=True)))


@functools.cache
def _schema_errors(text: str) -> tuple[str, ...]:
    """Each distinct object validated once: the base's objects are the same in every combination."""
    obj = json.loads(text)
    crds = crd_schemas()
    key = (obj["apiVersion"], obj["kind"])
    if key in crds:
        schema = crds[key]
        errors = [e.message for e in jsonschema_rs.validator_for(schema).iter_errors(obj)]
        return (*errors, *(f"unknown field {f}" for f in unknown_fields(obj, schema)))
    errors = []
    for version in KUBERNETES_VERSIONS:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as error:
            errors.append(f"{version}: {error.message}")
    return tuple(errors)


def test_every_object_is_valid_against_its_schema(objects: Objects) -> None:
    assert {o["kind"] for o in objects} >= {
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "ServiceAccount",
        "ConfigMap",
    }
    for obj in objects:
        assert not schema_errors(obj), f"{obj['kind']} {obj['metadata']['name']}: {schema_errors(obj)}"


def crd_backed(objects: Objects) -> list[str]:
    """Kinds a bare cluster does not serve: those the Kubernetes schemas do not know (custom resources)."""
    found = []
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSIONS[0], strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            found.append(f"{obj['apiVersion']} {obj['kind']}")
    return sorted(found)


def test_the_base_applies_on_a_bare_cluster() -> None:
    """Nothing in the base needs a CRD or an add-on; each component adds what it names, and only that."""
    base = compose(())
    base_kinds = {o["kind"] for o in base}
    assert crd_backed(base) == []
    assert base_kinds == {"Deployment", "Service", "PodDisruptionBudget", "ServiceAccount", "ConfigMap"}
    added = {name: {o["kind"] for o in compose((name,))} - base_kinds for name in COMPONENTS}
    assert added == {
        "monitoring": {"ServiceMonitor", "PrometheusRule", "AlertmanagerConfig"},  # and the dashboard's ConfigMap
        "autoscaling": {"HorizontalPodAutoscaler"},
        "network-policy": {"NetworkPolicy"},
        "kubernetes-alerts": {"PrometheusRule"},
        "model-download": set(),  # an init container and a volume in the Deployment
    }
    assert crd_backed(compose(("monitoring",))) == [
        "monitoring.coreos.com/v1 PrometheusRule",
        "monitoring.coreos.com/v1 ServiceMonitor",
        "monitoring.coreos.com/v1alpha1 AlertmanagerConfig",
    ]


def test_every_image_tag_is_the_release() -> None:
    """The base's and the components' ``images:`` name the version this checkout builds."""
    tags = {
        str(path.relative_to(DEPLOY)): image.get("newTag")
        for path in DEPLOY.rglob("kustomization.yaml")
        for image in yaml.safe_load(path.read_text()).get("images", [])
    }
    assert "base/kustomization.yaml" in tags and "components/model-download/kustomization.yaml" in tags
    assert set(tags.values()) == {__version__}, tags


@pytest.mark.parametrize(
    ("kind", "break_it"),
    [
        ("Deployment", lambda o: o["spec"]["template"]["spec"]["containers"][0].update(livenessprobe={})),
        ("Deployment", lambda o: o["spec"]["template"]["spec"].update(terminationGracePeriodSeconds="90")),
        ("HorizontalPodAutoscaler", lambda o: o["spec"].update(minReplicas="two")),
        ("AlertmanagerConfig", lambda o: o["spec"]["inhibitRules"][0]["sourceMatch"][0].update(matchType="==")),
        ("AlertmanagerConfig", lambda o: o["spec"]["inhibitRules"][0].update(sourceMatchers=[])),
        ("ServiceMonitor", lambda o: o["spec"]["endpoints"][0].update(intervall="15s")),
        ("ServiceMonitor", lambda o: o["spec"]["endpoints"][0].update(interval="15 seconds")),
        ("PrometheusRule", lambda o: o["spec"]["groups"][0]["rules"][0].update(fore="5m")),
    ],
)
def test_the_schema_check_rejects_a_broken_object(kind: str, break_it: Callable[[dict[str, Any]], None]) -> None:
    obj = copy.deepcopy(next(o for o in render(EXAMPLE) if o["kind"] == kind))
    assert not schema_errors(obj)
    break_it(obj)
    assert schema_errors(obj)


# --- invariants ----------------------------------------------------------------------------------------------


def selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def problems(objects: Objects) -> list[str]:
    """What would make the deployment misbehave although every object is valid."""
    pod = one(objects, "Deployment")["spec"]["template"]
    return (
        pod_problems(objects)
        + wiring_problems(objects)
        + component_problems(objects)
        + monitoring_problems(objects)
        + security_problems(pod["spec"], container(objects))
    )


def pod_problems(objects: Objects) -> list[str]:
    """Settings, probes, shutdown and resources against what the service does."""
    found = []
    main = container(objects)
    settings, unread = settings_of(objects)
    if unread:
        found.append(f"settings the service does not know: {sorted(unread)}")
    routes = set(openapi_document("0", Limits(max_inputs=1, max_input_chars=1), None)["paths"])
    ports = {p["name"] for p in main["ports"]}
    # Readiness is /health, not /ready: a shedding pod stays among the endpoints and answers 503 with Retry-After
    # (tests/e2e/test_kubernetes_rehearsal.py shows what clients get either way when every replica sheds).
    for name, path in (("startupProbe", "/health"), ("readinessProbe", "/health"), ("livenessProbe", "/live")):
        get = main.get(name, {}).get("httpGet", {})
        if get.get("path") != path or path not in routes or get.get("port") not in ports:
            found.append(f"{name} is not GET {path} on a container port: {get}")
    startup = main.get("startupProbe", {})
    budget = startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3)
    if startup.get("failureThreshold") != settings.startup_timeout_s or budget < 2 * settings.startup_timeout_s:
        found.append(
            f"the startup probe's budget ({startup.get('failureThreshold')} x {startup.get('periodSeconds')} s) is not "
            f"from EMBEDDING_STARTUP_TIMEOUT_S={settings.startup_timeout_s:g} (components/startup-budget): the kubelet "
            "would restart a pod the service still lets load, or wait for one it has given up on"
        )
    pre_stop = main.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    pause = int(pre_stop[1]) if pre_stop[:1] == ["sleep"] else 0
    drain = max(30, int(settings.request_timeout_s))  # gunicorn's graceful_timeout (app/gunicorn_conf.py)
    grace = pod_spec(objects).get("terminationGracePeriodSeconds", 30)
    if grace <= pause + drain:
        found.append(f"grace period {grace} s does not exceed the preStop pause {pause} s + the drain {drain} s")
    resources = main["resources"]
    limit = parse_quantity(resources.get("limits", {}).get("memory", "0"))
    if limit * CGROUP_LIMIT_SHARE <= settings.memory_high_bytes:
        found.append(f"memory limit {limit:.0f} leaves no room above EMBEDDING_MEMORY_HIGH_BYTES before shedding")
    request = parse_quantity(resources["requests"]["memory"])
    if request > limit:
        found.append("memory request above the limit")
    if request < settings.memory_elevated_bytes:
        found.append(
            f"memory request {request:.0f} below EMBEDDING_MEMORY_ELEVATED_BYTES ({settings.memory_elevated_bytes}), "
            "what the service holds under load: the pod is the kubelet's first pick under node pressure"
        )
    if settings.torch_threads != parse_quantity(resources["requests"]["cpu"]):
        found.append(f"EMBEDDING_TORCH_THREADS={settings.torch_threads} is not the CPU request")
    return found


def wiring_problems(objects: Objects) -> list[str]:
    """Labels and selectors, ports and names: every object reaches the one it is meant for."""
    found = []
    deployment, service = one(objects, "Deployment"), one(objects, "Service")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    if "replicas" in deployment["spec"]:
        found.append("the Deployment sets replicas: every apply resets what the autoscaler chose")
    if not selects(deployment["spec"]["selector"]["matchLabels"], pod_labels):
        found.append("the Deployment's selector does not select its pods")
    if not selects(service["spec"]["selector"], pod_labels):
        found.append("the Service selects no pod")
    ports = {p["name"] for p in container(objects)["ports"]}
    if any(p["targetPort"] not in ports for p in service["spec"]["ports"]):
        found.append("a Service port targets no container port")
    budget = one(objects, "PodDisruptionBudget")["spec"]
    if not selects(budget["selector"]["matchLabels"], pod_labels):
        found.append("the PodDisruptionBudget selects no pod")
    if budget.get("unhealthyPodEvictionPolicy") != "AlwaysAllow":
        found.append("a pod that is not ready blocks node drains (unhealthyPodEvictionPolicy)")
    return found + identity_problems(deployment["spec"]["template"]["spec"], one(objects, "ServiceAccount"))


def identity_problems(pod: dict[str, Any], account: dict[str, Any]) -> list[str]:
    found = []
    if pod.get("serviceAccountName") != account["metadata"]["name"]:
        found.append("the pods do not run as the ServiceAccount")
    if pod.get("automountServiceAccountToken") is not False or account.get("automountServiceAccountToken") is not False:
        found.append("a service account token is mounted: the service calls no Kubernetes API")
    return found


def component_problems(objects: Objects) -> list[str]:
    """The components' objects reach what they are meant for, where a component is included."""
    found = []
    deployment, service = one(objects, "Deployment"), one(objects, "Service")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    ports = {p["name"] for p in container(objects)["ports"]}
    monitor = maybe(objects, "ServiceMonitor")
    if monitor is not None:
        if not selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"]):
            found.append("the ServiceMonitor selects no Service")
        service_ports = {p["name"] for p in service["spec"]["ports"]}
        if any(e.get("port") not in service_ports or e.get("path") != "/metrics" for e in monitor["spec"]["endpoints"]):
            found.append("a ServiceMonitor endpoint is not /metrics on a Service port")
    autoscaler = maybe(objects, "HorizontalPodAutoscaler")
    if autoscaler is not None and autoscaler["spec"]["scaleTargetRef"]["name"] != deployment["metadata"]["name"]:
        found.append("the HorizontalPodAutoscaler scales another Deployment")
    found += download_problems(objects)
    policy = maybe(objects, "NetworkPolicy")
    if policy is not None:
        allowed = {port.get("port") for rule in policy["spec"].get("ingress", []) for port in rule.get("ports", [])}
        if not selects(policy["spec"]["podSelector"]["matchLabels"], pod_labels) or "http" not in allowed & ports:
            found.append("the NetworkPolicy does not let clients reach the pods' HTTP port")
    return found


def download_problems(objects: Objects) -> list[str]:
    """components/model-download: the init container fills the directory the server reads, read-only, with the
    hub id the settings name; it runs as the server does, with the token from an optional Secret."""
    pod = pod_spec(objects)
    init = {c["name"]: c for c in pod.get("initContainers", [])}.get("model-download")
    if init is None:
        return []
    found = []
    main = container(objects)
    if init["image"] != main["image"]:
        found.append("the model-download init container runs another image than the server")
    target = init["args"][init["args"].index("--to") + 1]
    names = [var["name"] for var in main.get("env", [])]
    served = {var["name"]: var.get("value") for var in main.get("env", [])}
    if served.get("EMBEDDING_MODEL") != target:
        found.append(f"the server reads {served.get('EMBEDDING_MODEL')}, the init container fills {target}")
    if "EMBEDDING_SERVED_MODEL_NAME" in names and names.index("EMBEDDING_SERVED_MODEL_NAME") > names.index(
        "EMBEDDING_MODEL"
    ):
        found.append("EMBEDDING_SERVED_MODEL_NAME is expanded after EMBEDDING_MODEL is rewritten to a path")
    mounts = {m["name"]: m for m in main.get("volumeMounts", [])}
    init_mounts = {m["name"]: m for m in init.get("volumeMounts", [])}
    if not target.startswith(init_mounts.get("models", {}).get("mountPath", "?") + "/"):
        found.append("the init container does not write into the models volume")
    if (
        not mounts.get("models", {}).get("readOnly")
        or mounts["models"]["mountPath"] != init_mounts["models"]["mountPath"]
    ):
        found.append("the server does not read the models volume read-only where the init container filled it")
    env = {var["name"]: var for var in init.get("env", [])}
    if env.get("HF_HUB_OFFLINE", {}).get("value") != "0":
        found.append("the init container is offline (HF_HUB_OFFLINE): it cannot fetch")
    token = env.get("HF_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef", {})
    if not token.get("optional"):
        found.append("HF_TOKEN is not read from an optional Secret (public models need none)")
    found += [f"model-download: {problem}" for problem in security_problems(pod, init)]
    return found


ADAPTER_RULES = DEPLOY / "components" / "autoscaling" / "prometheus-adapter-rules.yaml"


def adapter_problems(rules: list[dict[str, Any]], metric: str) -> list[str]:
    """prometheus-adapter's rules against the autoscaler's metric and the service's series."""
    found = []
    if metric not in {rule["name"]["as"] for rule in rules}:
        found.append(f"the autoscaler reads {metric}, which no prometheus-adapter rule exposes")
    families = list(Metrics().registry.collect())
    ours = {f.name for f in families} | {f"{f.name}_total" for f in families if f.type == "counter"}
    for rule in rules:
        series = re.match(r"\w+", rule["seriesQuery"])
        if series is None or series.group(0) not in ours:
            found.append(f"prometheus-adapter rule on a metric the service does not export: {rule['seriesQuery']}")
        if not re.search(r"^sum\(.*\) by \(<<\.GroupBy>>\)$", rule["metricsQuery"]):
            found.append(f"prometheus-adapter rule not summed by the autoscaler's group-by: {rule['metricsQuery']}")
    return found


@pytest.mark.parametrize(
    ("expected", "break_it"),
    [
        ("not summed by the autoscaler's group-by", lambda r: r.update(metricsQuery="rate(<<.Series>>[2m])")),
        ("does not export", lambda r: r.update(seriesQuery='embedding_busy{namespace!=""}')),
        ("which no prometheus-adapter rule exposes", lambda r: r["name"].update({"as": "busy"})),
    ],
)
def test_the_adapter_rule_check_rejects_a_broken_rule(
    expected: str, break_it: Callable[[dict[str, Any]], None]
) -> None:
    rules = yaml.safe_load(ADAPTER_RULES.read_text())["rules"]
    metric = pods_metric(render(EXAMPLE))["name"]
    assert adapter_problems(rules, metric) == []
    break_it(rules[0])
    assert any(expected in problem for problem in adapter_problems(rules, metric))


def monitoring_problems(objects: Objects) -> list[str]:
    """The autoscaler's metric, the rules and the dashboard: the same as the service and the repo's sources."""
    found = []
    if maybe(objects, "HorizontalPodAutoscaler") is not None:
        found += adapter_problems(yaml.safe_load(ADAPTER_RULES.read_text())["rules"], pods_metric(objects)["name"])
    rules = {o["metadata"]["name"]: o["spec"] for o in objects if o["kind"] == "PrometheusRule"}
    if maybe(objects, "ServiceMonitor") is not None:
        if rules.get("embedding-service") != yaml.safe_load(
            (ROOT / "alerts" / "embedding-service.rules.yml").read_text()
        ):
            found.append("the PrometheusRule differs from alerts/embedding-service.rules.yml")
        dashboard = json.loads((ROOT / "dashboards" / "embedding-service.json").read_text())
        if [json.loads(text) for text in dashboard_map(objects)["data"].values()] != [dashboard]:
            found.append("the dashboard ConfigMap differs from dashboards/embedding-service.json")
    optional = ROOT / "alerts" / "embedding-service.kubernetes.rules.yml"
    if rules.get("embedding-service-kubernetes", yaml.safe_load(optional.read_text())) != yaml.safe_load(
        optional.read_text()
    ):
        found.append("the optional PrometheusRule differs from alerts/embedding-service.kubernetes.rules.yml")
    return found


def security_problems(pod: dict[str, Any], main: dict[str, Any]) -> list[str]:
    user, workdir = dockerfile_instruction("USER"), dockerfile_instruction("WORKDIR")
    security = {**pod.get("securityContext", {}), **main.get("securityContext", {})}
    found = []
    if not (security.get("runAsNonRoot") and str(security.get("runAsUser")) == user):
        found.append(f"not run as the image's non-root user {user}")
    if not security.get("readOnlyRootFilesystem") or security.get("allowPrivilegeEscalation", True):
        found.append("the root filesystem is writable or privileges can be escalated")
    mounts = {m["mountPath"] for m in main.get("volumeMounts", [])}
    if workdir not in mounts:
        found.append(f"nothing writable at {workdir}, where the service writes (gunicorn's heartbeat file)")
    return found


def parse_quantity(text: str | int) -> float:
    """A Kubernetes quantity (1536Mi, 3Gi, 2, 500m) as a number."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "k": 1e3, "M": 1e6, "G": 1e9, "m": 1e-3, "": 1}
    number, unit = re.fullmatch(r"([\d.]+)([A-Za-z]*)", str(text)).groups()  # type: ignore[union-attr]
    return float(number) * units[unit]


def test_the_deployment_keeps_its_invariants(objects: Objects) -> None:
    assert problems(objects) == []


def probe(o: Objects, name: str) -> dict[str, Any]:
    get: dict[str, Any] = container(o)[name]["httpGet"]
    return get


def pods_metric(o: Objects) -> dict[str, Any]:
    (metric,) = (
        m["pods"]["metric"] for m in one(o, "HorizontalPodAutoscaler")["spec"]["metrics"] if m["type"] == "Pods"
    )
    return metric  # type: ignore[no-any-return]


BROKEN: list[tuple[str, Callable[[Objects], None]]] = [
    ("GET /live", lambda o: probe(o, "livenessProbe").update(path="/health")),
    ("startup probe's budget", lambda o: container(o)["startupProbe"].update(failureThreshold=60)),
    ("startup probe's budget", lambda o: container(o)["startupProbe"].update(periodSeconds=1)),
    ("GET /health", lambda o: probe(o, "readinessProbe").update(path="/ready")),
    ("grace period", lambda o: pod_spec(o).update(terminationGracePeriodSeconds=60)),
    ("no room above", lambda o: container(o)["resources"]["limits"].update(memory="2Gi")),
    ("TORCH_THREADS", lambda o: container(o)["resources"]["requests"].update(cpu="4")),
    ("selects no pod", lambda o: one(o, "Service")["spec"]["selector"].update({"app.kubernetes.io/component": "x"})),
    ("sets replicas", lambda o: one(o, "Deployment")["spec"].update(replicas=3)),
    ("no prometheus-adapter rule", lambda o: pods_metric(o).update(name="queue")),
    (
        "differs from alerts",
        lambda o: named(o, "PrometheusRule", "embedding-service")["spec"]["groups"][0]["rules"].pop(),
    ),
    ("differs from dashboards", lambda o: dashboard_map(o)["data"].update({"embedding-service.json": "{}"})),
    ("does not know", lambda o: settings_map(o)["data"].update(EMBEDDING_MEMORY_HIGH="3GB")),
    ("writable", lambda o: container(o)["securityContext"].update(readOnlyRootFilesystem=False)),
    ("below EMBEDDING_MEMORY_ELEVATED_BYTES", lambda o: container(o)["resources"]["requests"].update(memory="1536Mi")),
    ("blocks node drains", lambda o: one(o, "PodDisruptionBudget")["spec"].pop("unhealthyPodEvictionPolicy")),
    ("token is mounted", lambda o: one(o, "ServiceAccount").pop("automountServiceAccountToken")),
    ("as the ServiceAccount", lambda o: pod_spec(o).pop("serviceAccountName")),
    ("HTTP port", lambda o: one(o, "NetworkPolicy")["spec"]["ingress"][0]["ports"][0].update(port="metrics")),
    ("nothing writable", lambda o: container(o).update(volumeMounts=[])),
]


def init_container(o: Objects) -> dict[str, Any]:
    (init,) = pod_spec(o)["initContainers"]
    return init  # type: ignore[no-any-return]


def main_env(o: Objects) -> list[dict[str, Any]]:
    return container(o)["env"]  # type: ignore[no-any-return]


BROKEN_DOWNLOAD: list[tuple[str, Callable[[Objects], None]]] = [
    ("another image", lambda o: init_container(o).update(image="python:3.11")),
    ("the init container fills", lambda o: init_container(o)["args"].__setitem__(2, "/models/other")),
    ("expanded after", lambda o: main_env(o).reverse()),
    (
        "read-only where",
        lambda o: next(m for m in container(o)["volumeMounts"] if m["name"] == "models").pop("readOnly"),
    ),
    ("cannot fetch", lambda o: init_container(o)["env"][0].update(value="1")),
    ("optional Secret", lambda o: init_container(o)["env"][2]["valueFrom"]["secretKeyRef"].pop("optional")),
    ("model-download: the root filesystem is writable", lambda o: init_container(o)["securityContext"].clear()),
]


@pytest.mark.parametrize(("expected", "break_it"), BROKEN_DOWNLOAD, ids=[b[0] for b in BROKEN_DOWNLOAD])
def test_the_model_download_check_rejects_a_broken_copy(expected: str, break_it: Callable[[Objects], None]) -> None:
    rendered = compose(("model-download",))
    assert download_problems(rendered) == []
    broken = copy.deepcopy(rendered)
    break_it(broken)
    assert any(expected in problem for problem in download_problems(broken)), download_problems(broken)


@pytest.mark.parametrize(("expected", "break_it"), BROKEN, ids=[b[0] for b in BROKEN])
def test_each_invariant_rejects_a_broken_copy(expected: str, break_it: Callable[[Objects], None]) -> None:
    broken = copy.deepcopy(render(EXAMPLE))
    break_it(broken)
    assert any(expected in problem for problem in problems(broken)), problems(broken)


def start_period_s(healthcheck: str) -> float:
    """The ``--start-period`` of a Dockerfile's HEALTHCHECK, in seconds."""
    match = re.search(r"--start-period=(\d+)(h|m|s)\b", healthcheck)
    assert match is not None, healthcheck
    return int(match.group(1)) * {"h": 3600, "m": 60, "s": 1}[match.group(2)]


def test_the_images_health_check_leaves_the_start_up_limit_to_the_service() -> None:
    """Docker counts no failure in the start period until the first success: a start period shorter than what
    EMBEDDING_STARTUP_TIMEOUT_S allows would call a model still loading unhealthy. The limit is the service's own
    (it exits past it), so the start period is longer than any the settings here allow."""
    (healthcheck,) = re.findall(r"^HEALTHCHECK ((?:.*\\\n)*.*)$", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    assert "/ready" in healthcheck
    allowed = max(Settings().startup_timeout_s, settings_of(render(EXAMPLE))[0].startup_timeout_s)
    assert start_period_s(healthcheck) >= 10 * allowed
    assert start_period_s("--interval=15s --start-period=180s --retries=3") < 10 * allowed  # the image before


@pytest.mark.parametrize("overlay", [(), ("model-download",)])
def test_the_startup_probes_budget_follows_the_setting_an_overlay_gives(overlay: tuple[str, ...]) -> None:
    """EMBEDDING_STARTUP_TIMEOUT_S is written once, in the settings: an overlay that merges another value gets the
    probe's budget from it."""
    objects = compose(overlay, {"EMBEDDING_STARTUP_TIMEOUT_S": "1800"})
    assert container(objects)["startupProbe"]["failureThreshold"] == 1800
    assert settings_of(objects)[0].startup_timeout_s == 1800
    assert pod_problems(objects) == []


@functools.cache
def deploy_generator() -> Any:
    """deploy/kubernetes/generate.py as a module (it is a script beside the manifests)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("deploy_generate", DEPLOY / "generate.py")
    assert spec and spec.loader
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    return generate


def test_the_generated_files_are_up_to_date() -> None:
    """deploy/kubernetes/generate.py's output is what is committed (run `make deploy` after changing the rules
    or the dashboard)."""
    for path, text in deploy_generator().rendered().items():
        assert path.read_text() == text, f"{path.relative_to(ROOT)} is stale: run make deploy"


def hpa_scales_out_rule() -> dict[str, Any]:
    """The autoscaler's decision as a Prometheus alert: with the adapter's query as prometheus-adapter renders it
    for two pods, grouped by pod, the HorizontalPodAutoscaler adds a replica when the pods' average exceeds its
    target (desired = ceil(2 x average / target) > 2)."""
    (rule,) = yaml.safe_load(ADAPTER_RULES.read_text())["rules"]
    query = (
        rule["metricsQuery"]
        .replace("<<.Series>>", re.match(r"\w+", rule["seriesQuery"]).group(0))  # type: ignore[union-attr]
        .replace("<<.LabelMatchers>>", 'namespace="embedding",pod=~"a|b"')
        .replace("<<.GroupBy>>", "pod")
    )
    (metric,) = (m for m in one(render(EXAMPLE), "HorizontalPodAutoscaler")["spec"]["metrics"] if m["type"] == "Pods")
    target = parse_quantity(metric["pods"]["target"]["averageValue"])
    return {"alert": "ScalesOut", "expr": f"avg({query}) > {target}"}


def busy(pod: str, values: str) -> dict[str, str]:
    return {"series": f'embedding_inference_busy_seconds_total{{namespace="embedding",pod="{pod}"}}', "values": values}


def test_one_large_request_does_not_scale_out_and_a_sustained_overload_does(tmp_path: Path) -> None:
    """Simulated with promtool on the adapter's real query and the autoscaler's real target, scraped every 15 s.
    512 whole documents keep a pod's inference thread busy for about a minute at most (the production model on
    2 cores): one such request, on one pod or on each at once, stays under the target. Both pods busy all the
    time, or 80% of it, scale out within 3 minutes; 60% does not. (Saturation on every pod for most of the
    2-minute window does scale out: that is load the pods cannot keep up with for long.)"""
    (tmp_path / "rules.yml").write_text(yaml.safe_dump({"groups": [{"name": "hpa", "rules": [hpa_scales_out_rule()]}]}))
    # The autoscaler reads the metric every 15 s: so is the rule evaluated, and checked at each of those times.
    never = [{"eval_time": f"{15 * k}s", "alertname": "ScalesOut", "exp_alerts": []} for k in range(1, 41)]
    firing = [{"eval_time": "3m", "alertname": "ScalesOut", "exp_alerts": [{"exp_labels": {}}]}]
    tests = [
        # One 512-text request on pod a: busy for 60 s, then idle; pod b idle.
        {
            "interval": "15s",
            "input_series": [busy("a", "0+0x3 15+15x3 60+0x40"), busy("b", "0+0x47")],
            "alert_rule_test": never,
        },
        # One such request on each pod at once.
        {
            "interval": "15s",
            "input_series": [busy("a", "0+0x3 15+15x3 60+0x40"), busy("b", "0+0x3 15+15x3 60+0x40")],
            "alert_rule_test": never,
        },
        {"interval": "15s", "input_series": [busy("a", "0+15x47"), busy("b", "0+15x47")], "alert_rule_test": firing},
        {"interval": "15s", "input_series": [busy("a", "0+12x47"), busy("b", "0+12x47")], "alert_rule_test": firing},
        {"interval": "15s", "input_series": [busy("a", "0+9x47"), busy("b", "0+9x47")], "alert_rule_test": never},
    ]
    simulation = {"rule_files": ["rules.yml"], "evaluation_interval": "15s", "tests": tests}
    (tmp_path / "test.yml").write_text(yaml.safe_dump(simulation))
    promtool = shutil.which("promtool")
    assert promtool, "promtool is not installed: run `make system-deps` (Debian package prometheus)"
    result = subprocess.run(
        [promtool, "test", "rules", "test.yml"], cwd=tmp_path, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- several instances in one namespace ------------------------------------------------------------------------

STAGING = "embedding-staging"


def test_another_instances_rules_and_dashboard_are_the_generators_own() -> None:
    """What deploy/kubernetes/generate.py --instance writes (with PyYAML only) is what alerts/generate.py and
    dashboards/generate.py make for that job."""
    from alerts.generate import render as render_rules
    from dashboards.generate import build

    generate = deploy_generator()
    rules = generate.prometheus_rule(instance=STAGING)["spec"]
    assert rules == yaml.safe_load(render_rules(selector=f'job="{STAGING}"'))
    assert rules != generate.prometheus_rule()["spec"]
    assert generate.dashboard(STAGING) == build(job=STAGING)
    assert generate.dashboard() == build()


def two_instances(tmp: Path, staging_label: bool = True, staging_monitoring: str = "generated") -> Objects:
    """Production (the example's components) and staging (its own name suffix, instance label and monitoring
    component from generate.py --instance) in one namespace, rendered together."""
    generate = deploy_generator()
    (tmp / "staging" / "monitoring").mkdir(parents=True)
    for name, text in generate.instance_component(STAGING).items():
        (tmp / "staging" / "monitoring" / name).write_text(text)
    components = ["monitoring", "network-policy", "autoscaling"]

    def rel(path: Path, here: Path) -> str:
        return os.path.relpath(path, here)

    production: dict[str, Any] = {
        "resources": [rel(DEPLOY / "base", tmp / "production")],
        "components": [rel(DEPLOY / "components" / c, tmp / "production") for c in components],
    }
    staging: dict[str, Any] = {
        "nameSuffix": "-staging",
        "resources": [rel(DEPLOY / "base", tmp / "staging")],
        "components": [
            "monitoring"
            if staging_monitoring == "generated"
            else rel(DEPLOY / "components" / "monitoring", tmp / "staging"),
            *(rel(DEPLOY / "components" / c, tmp / "staging") for c in components[1:]),
        ],
    }
    if staging_label:
        staging["labels"] = [{"pairs": {"app.kubernetes.io/instance": STAGING}, "includeSelectors": True}]
    (tmp / "production").mkdir()
    for name, overlay in (("production", production), ("staging", staging)):
        kustomization = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", **overlay}
        (tmp / name / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    both = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "namespace": "embedding",
            "resources": ["production", "staging"]}  # fmt: skip
    (tmp / "kustomization.yaml").write_text(yaml.safe_dump(both))
    return render(tmp)


def instance_problems(objects: Objects) -> list[str]:
    """Two instances in one namespace: each object reaches its own instance only, each instance's monitoring
    (scrape job, rules, dashboard) is its own."""
    return selector_problems(objects) + scrape_problems(objects) + dashboard_problems(objects)


def selector_problems(objects: Objects) -> list[str]:
    found = []
    ids = [(o["kind"], o["metadata"]["name"]) for o in objects]
    if len(ids) != len(set(ids)):
        found.append("two objects of one kind share a name")
    deployments = {d["metadata"]["name"]: d for d in objects if d["kind"] == "Deployment"}
    pods = {name: d["spec"]["template"]["metadata"]["labels"] for name, d in deployments.items()}
    services = [o for o in objects if o["kind"] == "Service"]
    selectors: list[tuple[str, Mapping[str, str]]] = [
        (f"Service {o['metadata']['name']}", o["spec"]["selector"]) for o in services
    ]
    for kind, path in (("Deployment", ("spec", "selector")), ("PodDisruptionBudget", ("spec", "selector")),
                       ("NetworkPolicy", ("spec", "podSelector"))):  # fmt: skip
        for o in (o for o in objects if o["kind"] == kind):
            selectors.append((f"{kind} {o['metadata']['name']}", o[path[0]][path[1]]["matchLabels"]))
    for name, deployment in deployments.items():
        for spread in deployment["spec"]["template"]["spec"].get("topologySpreadConstraints", []):
            selectors.append((f"Deployment {name}'s spread", spread["labelSelector"]["matchLabels"]))
    for what, selector in selectors:
        chosen = sum(selects(selector, labels) for labels in pods.values())
        if chosen != 1:
            found.append(f"{what} selects the pods of {chosen} instances")
    for hpa in (o for o in objects if o["kind"] == "HorizontalPodAutoscaler"):
        if hpa["spec"]["scaleTargetRef"]["name"] not in deployments:
            found.append(f"HorizontalPodAutoscaler {hpa['metadata']['name']} scales no Deployment")
    return found


def scrape_problems(objects: Objects) -> list[str]:
    """Each ServiceMonitor scrapes one Service, as that instance's job, and the rules and dashboard beside it
    select that job."""
    found = []
    services = [o for o in objects if o["kind"] == "Service"]
    monitors = [o for o in objects if o["kind"] == "ServiceMonitor"]
    for monitor in monitors:
        chosen = [s for s in services if selects(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])]
        if len(chosen) != 1:
            found.append(f"ServiceMonitor {monitor['metadata']['name']} scrapes {len(chosen)} Services")
            continue
        label = monitor["spec"].get("jobLabel")
        job = chosen[0]["metadata"]["labels"].get(label) if label else chosen[0]["metadata"]["name"]
        relabels = monitor["spec"]["endpoints"][0].get("relabelings", [])
        if {"sourceLabels": ["__meta_kubernetes_pod_name"], "targetLabel": "instance"} not in relabels:
            found.append("instance is not the pod's name")
        suffix = monitor["metadata"]["name"].removeprefix("embedding-service")
        rule = named(objects, "PrometheusRule", f"embedding-service{suffix}")
        jobs = {j for g in rule["spec"]["groups"] for r in g["rules"] for j in re.findall(r'job="([^"]*)"', r["expr"])}
        if jobs != {job}:
            found.append(
                f"the rules beside ServiceMonitor {monitor['metadata']['name']} select jobs {jobs}, its job is {job}"
            )
        board = next(iter(named(objects, "ConfigMap", f"embedding-service-dashboard{suffix}")["data"].values()))
        if f'up{{job=\\"{job}\\"}}' not in board:
            found.append(f"the dashboard beside ServiceMonitor {monitor['metadata']['name']} does not list job {job}")
    return found


def dashboard_problems(objects: Objects) -> list[str]:
    found = []
    boards = [
        json.loads(text)
        for o in objects
        if o["kind"] == "ConfigMap"
        for k, text in o.get("data", {}).items()
        if k.endswith(".json")
    ]
    keys = [
        k
        for o in objects
        if o["kind"] == "ConfigMap" and "grafana_dashboard" in o["metadata"].get("labels", {})
        for k in o["data"]
    ]
    for what, values in (("uid", [b["uid"] for b in boards]), ("title", [b["title"] for b in boards]), ("file", keys)):
        if len(values) != len(set(values)):
            found.append(f"the dashboards share a {what}: Grafana keeps one")
    return found


def test_two_instances_in_one_namespace_each_reach_only_their_own(tmp_path: Path) -> None:
    objects = two_instances(tmp_path)
    assert [e for o in objects for e in schema_errors(o)] == []
    assert len([o for o in objects if o["kind"] == "Deployment"]) == 2
    assert instance_problems(objects) == []


@pytest.mark.parametrize(
    ("expected", "variant"),
    [
        ("selects the pods of 2 instances", {"staging_label": False}),
        ("select jobs {'embedding-service'}, its job is embedding-staging", {"staging_monitoring": "default"}),
        ("the dashboards share a uid", {"staging_monitoring": "default"}),
    ],
)
def test_the_instance_check_rejects_a_broken_second_instance(
    tmp_path: Path, expected: str, variant: dict[str, Any]
) -> None:
    problems = instance_problems(two_instances(tmp_path, **variant))
    assert any(expected in problem for problem in problems), problems
