"""deploy/k8s: the Kubernetes manifests render, validate, lint clean and agree with each other and with a
running kvserve.

- Rendering: a small renderer of the kustomize subset the manifests use (resources, components, namespace,
  images, inline JSON 6902 patches; anything else in a kustomization fails the test). Where `kubectl` is
  installed, `kubectl kustomize` must render exactly the same objects.
- Schemas: every built-in kind against the Kubernetes OpenAPI schemas that `kubernetes-validate` ships
  (strict: unknown fields fail), for the oldest and the newest Kubernetes the manifests claim; the custom
  resources (InferencePool, HTTPRoute, Gateway, PodMonitor, ScaledObject) and the endpoint picker's config
  against the schemas in deploy/k8s/schemas. Offline: nothing is downloaded.
- yamllint with deploy/k8s/.yamllint, on every file and on the picker's config embedded in its ConfigMap.
- Cross-references: selectors, ports, names, RBAC, the drain budget, the image's user and paths, and against a
  running server: probe paths, gateway routes and every metric name the picker, KEDA and Prometheus use.
"""
from __future__ import annotations

import copy
import inspect
import json
import os
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path

import httpx
import jsonschema
import pytest
import yaml
from kubernetes_validate import utils as kv_utils
from prometheus_client.parser import text_string_to_metric_families
from referencing import Registry, Resource
from yamllint import config as yamllint_config
from yamllint import linter as yamllint_linter

from test_server_api import start_server, stop_server

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
SCHEMAS = K8S / "schemas"
# The oldest Kubernetes the manifests claim (the preStop `sleep` action is on by default from 1.30) and the
# newest kubernetes-validate ships.
KUBERNETES_VERSIONS = ("1.30.0", kv_utils.all_versions()[-1])
OVERLAYS = ("base", "overlays/gpu", "overlays/gpu-autoscaling")
OPTIONAL_COMPONENTS = ("components/model-cache-pvc",)      # in no overlay: rendered on top of base here
API_KEY = "k8s-manifest-test-key"


# ---------------------------------------------------------------------------------------------------------
# kustomize, the subset used here

KUSTOMIZATION_FIELDS = {"apiVersion", "kind", "namespace", "resources", "components", "images", "patches"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "PersistentVolume",
                  "StorageClass", "PriorityClass", "GatewayClass", "IngressClass", "RuntimeClass"}


def yaml_documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def render(directory: Path, files: set[Path] | None = None, accumulated: list[dict] | None = None,
           kind: str = "Kustomization") -> list[dict]:
    """What `kustomize build directory` gives, for the fields in KUSTOMIZATION_FIELDS. `files` collects every
    manifest file read."""
    files = set() if files is None else files
    spec = yaml.safe_load((directory / "kustomization.yaml").read_text())
    missing = set(spec) - KUSTOMIZATION_FIELDS
    assert not missing, f"{directory}: the test's renderer does not implement {missing}"
    assert spec["kind"] == kind, f"{directory}: expected a {kind}"
    objects = [copy.deepcopy(o) for o in accumulated or []]
    for entry in spec.get("resources", []):
        target = (directory / entry).resolve()
        if target.is_dir():
            objects += render(target, files)
        else:
            assert target.is_relative_to(directory.resolve()), f"{entry}: kustomize only loads files under the root"
            files.add(target)
            objects += yaml_documents(target)
    for entry in spec.get("components", []):
        objects = render((directory / entry).resolve(), files, objects, kind="Component")
    for patch in spec.get("patches", []):
        apply_patch(objects, patch, directory)
    if "namespace" in spec:
        set_namespace(objects, spec["namespace"])
    for image in spec.get("images", []):
        set_image(objects, image)
    return objects


def apply_patch(objects: list[dict], patch: dict, directory: Path) -> None:
    assert set(patch) == {"target", "patch"}, f"{directory}: only inline JSON 6902 patches with a target"
    target, operations = patch["target"], yaml.safe_load(patch["patch"])
    assert isinstance(operations, list), f"{directory}: only JSON 6902 patches"
    matched = [o for o in objects if o["kind"] == target["kind"] and o["metadata"]["name"] == target["name"]
               and o["apiVersion"] == "/".join(filter(None, [target.get("group"), target.get("version")]))]
    assert matched, f"{directory}: no object matches the patch target {target}"
    for obj in matched:
        for op in operations:
            json_patch(obj, op)


def json_patch(obj: dict, op: dict) -> None:
    """One RFC 6902 operation: add, remove, replace or test."""
    *parents, last = [part.replace("~1", "/").replace("~0", "~") for part in op["path"].split("/")[1:]]
    node = obj
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    key = (len(node) if last == "-" else int(last)) if isinstance(node, list) else last
    if op["op"] == "test":
        assert node[key] == op["value"], f"JSON patch test failed at {op['path']}: {node[key]!r}"
    elif op["op"] == "remove":
        del node[key]
    elif op["op"] == "replace":
        node[key]                                          # must exist
        node[key] = copy.deepcopy(op["value"])
    elif op["op"] == "add" and isinstance(node, list):
        node.insert(key, copy.deepcopy(op["value"]))
    elif op["op"] == "add":
        node[key] = copy.deepcopy(op["value"])
    else:
        raise AssertionError(f"unsupported JSON patch operation {op}")


def set_namespace(objects: list[dict], namespace: str) -> None:
    for obj in objects:
        if obj["kind"] not in CLUSTER_SCOPED:
            obj["metadata"]["namespace"] = namespace
        if obj["kind"] in ("RoleBinding", "ClusterRoleBinding"):
            for subject in obj.get("subjects", []):
                if subject["kind"] == "ServiceAccount" and not subject.get("namespace"):
                    subject["namespace"] = namespace


def split_image(image: str) -> tuple[str, str]:
    """('registry/name', ':tag' or '@digest' or '')."""
    if "@" in image:
        name, digest = image.split("@", 1)
        return name, "@" + digest
    slash = image.rfind("/")
    colon = image.rfind(":")
    return (image[:colon], image[colon:]) if colon > slash else (image, "")


def set_image(objects: list[dict], image: dict) -> None:
    for container in containers(objects):
        name, suffix = split_image(container["image"])
        if name == image["name"]:
            suffix = f"@{image['digest']}" if "digest" in image else f":{image['newTag']}" if "newTag" in image \
                else suffix
            container["image"] = image.get("newName", name) + suffix


# ---------------------------------------------------------------------------------------------------------
# rendered targets and helpers

@cache
def rendered(target: str) -> tuple[tuple[dict, ...], frozenset[Path]]:
    files: set[Path] = set()
    if target in OPTIONAL_COMPONENTS:
        objects = render(K8S / target, files, render(K8S / "base", files), kind="Component")
    else:
        objects = render(K8S / target, files)
    return tuple(objects), frozenset(files)


def objects_of(target: str) -> list[dict]:
    return copy.deepcopy(list(rendered(target)[0]))


ALL_TARGETS = OVERLAYS + OPTIONAL_COMPONENTS


def find(objects: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def one(objects: list[dict], kind: str, name: str | None = None) -> dict:
    found = find(objects, kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def pod_templates(objects: list[dict]) -> list[dict]:
    return [o["spec"]["template"] for o in objects if o["kind"] in ("Deployment", "StatefulSet", "DaemonSet")]


def containers(objects: list[dict]) -> list[dict]:
    return [c for t in pod_templates(objects) for c in t["spec"].get("initContainers", []) + t["spec"]["containers"]]


def selects(selector: dict, labels: dict) -> bool:
    match = selector.get("matchLabels", selector)
    assert "matchExpressions" not in selector
    return bool(match) and all(labels.get(k) == v for k, v in match.items())


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def kvserve_pod(objects: list[dict]) -> dict:
    return one(objects, "Deployment", "kvserve")["spec"]["template"]


def kvserve_container(objects: list[dict]) -> dict:
    return next(c for c in kvserve_pod(objects)["spec"]["containers"] if c["name"] == "kvserve")


def container_port(container: dict, port: int | str) -> int:
    if isinstance(port, int):
        assert port in {p["containerPort"] for p in container["ports"]}, (container["name"], port)
        return port
    return next(p["containerPort"] for p in container["ports"] if p["name"] == port)


def epp_config(objects: list[dict]) -> dict:
    return yaml.safe_load(one(objects, "ConfigMap", "kvserve-epp")["data"]["epp-config.yaml"])


def epp_container(objects: list[dict]) -> dict:
    return one(objects, "Deployment", "kvserve-epp")["spec"]["template"]["spec"]["containers"][0]


def flag(container: dict, name: str) -> str:
    values = [a.split("=", 1)[1] for a in container["args"] if a.startswith(f"--{name}=")]
    assert len(values) == 1, (name, container["args"])
    return values[0]


def dockerfile() -> str:
    return (ROOT / "docker" / "Dockerfile").read_text()


# ---------------------------------------------------------------------------------------------------------
# rendering

def manifest_files() -> set[Path]:
    return {p.resolve() for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml"}


def test_every_manifest_file_is_part_of_a_rendered_target():
    files = set().union(*(rendered(t)[1] for t in ALL_TARGETS))
    assert files == manifest_files(), sorted(str(p.relative_to(K8S)) for p in manifest_files() ^ files)
    components = {p.parent.name for p in (K8S / "components").glob("*/kustomization.yaml")}
    used = {Path(c).name for t in OVERLAYS for c in yaml.safe_load((K8S / t / "kustomization.yaml").read_text())
            .get("components", [])} | {Path(c).name for c in OPTIONAL_COMPONENTS}
    assert components == used, components ^ used


def identity(obj: dict) -> tuple:
    return obj["apiVersion"], obj["kind"], obj["metadata"].get("namespace"), obj["metadata"]["name"]


@pytest.mark.parametrize("target", ALL_TARGETS)
def test_kubectl_kustomize_renders_the_same_objects(target, tmp_path):
    """The renderer above is checked against the real kustomize (kubectl's) wherever kubectl is installed."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the renderer is not cross-checked here")
    directory = K8S / target
    if target in OPTIONAL_COMPONENTS:
        directory = tmp_path / "with-component"
        directory.mkdir()
        (directory / "kustomization.yaml").write_text(yaml.safe_dump({
            "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
            "resources": [os.path.relpath(K8S / "base", directory)],
            "components": [os.path.relpath(K8S / target, directory)]}))
    out = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    theirs = {identity(o): o for o in yaml.safe_load_all(out.stdout) if o}
    ours = {identity(o): o for o in objects_of(target)}
    assert set(theirs) == set(ours), set(theirs) ^ set(ours)
    for key, obj in ours.items():
        assert obj == theirs[key], key


# ---------------------------------------------------------------------------------------------------------
# schemas and lint

CUSTOM_SCHEMAS = {
    ("inference.networking.k8s.io/v1", "InferencePool"): "inferencepool-inference.networking.k8s.io-v1.json",
    ("gateway.networking.k8s.io/v1", "HTTPRoute"): "httproute-gateway.networking.k8s.io-v1.json",
    ("gateway.networking.k8s.io/v1", "Gateway"): "gateway-gateway.networking.k8s.io-v1.json",
    ("monitoring.coreos.com/v1", "PodMonitor"): "podmonitor-monitoring.coreos.com-v1.json",
    ("keda.sh/v1alpha1", "ScaledObject"): "scaledobject-keda.sh-v1alpha1.json",
    ("inference.networking.x-k8s.io/v1alpha1", "EndpointPickerConfig"):
        "endpointpickerconfig-inference.networking.x-k8s.io-v1alpha1.json",
}


@cache
def custom_validator(api_version: str, kind: str, kubernetes_version: str) -> jsonschema.Draft202012Validator:
    """The vendored schema; its $refs to Kubernetes types (ObjectMeta, LabelSelector, HPA behavior) resolve in
    kubernetes-validate's definitions for that Kubernetes version."""
    schema = json.loads((SCHEMAS / CUSTOM_SCHEMAS[api_version, kind]).read_text())
    definitions = kv_utils.schema_contents(f"kubernetes-json-schema/v{kubernetes_version}-local-strict/"
                                           "_definitions.json", kubernetes_version)
    registry = Resource.from_contents(definitions) @ Registry()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema, registry=registry)


def validate(obj: dict, kubernetes_version: str) -> str:
    """'custom' or 'kubernetes'; raises on an invalid object."""
    key = (obj["apiVersion"], obj["kind"])
    if key in CUSTOM_SCHEMAS:
        custom_validator(*key, kubernetes_version).validate(obj)
        return "custom"
    kv_utils.validate(obj, kubernetes_version, strict=True)
    return "kubernetes"


@pytest.mark.parametrize("kubernetes_version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("target", ALL_TARGETS)
def test_manifests_validate_against_schemas(target, kubernetes_version):
    counts = {"kubernetes": 0, "custom": 0}
    for obj in objects_of(target):
        try:
            counts[validate(obj, kubernetes_version)] += 1
        except (jsonschema.ValidationError, kv_utils.ValidationError) as exc:
            pytest.fail(f"{obj['kind']} {obj['metadata']['name']} ({target}, Kubernetes {kubernetes_version}): {exc}")
    if find(objects_of(target), "ConfigMap", "kvserve-epp"):
        custom_validator("inference.networking.x-k8s.io/v1alpha1", "EndpointPickerConfig",
                         kubernetes_version).validate(epp_config(objects_of(target)))
        counts["custom"] += 1
    print(f"{target}: {counts['kubernetes']} objects valid against Kubernetes {kubernetes_version} (strict), "
          f"{counts['custom']} against deploy/k8s/schemas")


@pytest.mark.parametrize("broken", [
    lambda o: o["spec"]["template"]["spec"]["containers"][0].update(livenessprobe={}),   # misspelt field
    lambda o: o["spec"]["template"]["spec"]["containers"][0]["ports"][0].update(containerPort="8000"),
])
def test_schema_validation_catches_mistakes_in_builtin_kinds(broken):
    deployment = one(objects_of("base"), "Deployment", "kvserve")
    broken(deployment)
    with pytest.raises(kv_utils.ValidationError):
        validate(deployment, KUBERNETES_VERSIONS[-1])


@pytest.mark.parametrize("kind, name, breaks", [
    ("InferencePool", "kvserve", lambda o: o["spec"].pop("endpointPickerRef")),
    ("InferencePool", "kvserve", lambda o: o["spec"]["endpointPickerRef"].pop("port")),
    ("HTTPRoute", "kvserve", lambda o: o["spec"]["rules"][1]["backendRefs"][0].pop("port")),
    ("HTTPRoute", "kvserve", lambda o: o["spec"]["rules"][0]["timeouts"].update(request="10 minutes")),
    ("HTTPRoute", "kvserve", lambda o: o["spec"]["rules"][0]["matches"][0]["path"].update(value="v1/completions")),
    ("Gateway", "inference-gateway", lambda o: o["spec"]["listeners"][0].pop("protocol")),
    ("PodMonitor", "kvserve", lambda o: o["spec"]["podMetricsEndpoints"][0].update(path="metrics")),
    ("ScaledObject", "kvserve", lambda o: o["spec"]["triggers"][0]["metadata"].update(treshold="5")),
    ("ScaledObject", "kvserve", lambda o: o["spec"]["triggers"][0]["metadata"].update(threshold=5)),
    ("ScaledObject", "kvserve", lambda o: o["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
     ["scaleDown"].update(stabilisationWindowSeconds=60)),
])
def test_custom_schemas_catch_mistakes(kind, name, breaks):
    obj = one(objects_of("overlays/gpu-autoscaling"), kind, name)
    breaks(obj)
    with pytest.raises(jsonschema.ValidationError):
        validate(obj, KUBERNETES_VERSIONS[-1])


def test_epp_config_schema_catches_misspelt_metric_keys():
    config = epp_config(objects_of("overlays/gpu"))
    extractor = next(p for p in config["plugins"] if p["type"] == "core-metrics-extractor")
    extractor["parameters"]["engineConfigs"][0]["queuedRequestSpec"] = "kvserve_requests_waiting"
    with pytest.raises(jsonschema.ValidationError):
        custom_validator("inference.networking.x-k8s.io/v1alpha1", "EndpointPickerConfig",
                         KUBERNETES_VERSIONS[-1]).validate(config)


def yamllint_problems(text: str, path: Path) -> list[str]:
    conf = yamllint_config.YamlLintConfig(file=str(K8S / ".yamllint"))
    return [f"{path.relative_to(ROOT)}:{p.line}:{p.column}: {p.message} ({p.rule})"
            for p in yamllint_linter.run(text, conf, str(path))]


def test_yamllint_passes_on_every_file_and_on_the_embedded_picker_config():
    paths = sorted(K8S.rglob("*.yaml")) + [K8S / ".yamllint"]
    problems = [p for path in paths for p in yamllint_problems(path.read_text(), path)]
    problems += yamllint_problems(one(objects_of("overlays/gpu"), "ConfigMap")["data"]["epp-config.yaml"],
                                  K8S / "components" / "inference-pool" / "epp-config.yaml")
    assert not problems, "\n".join(problems)
    assert yamllint_problems("a:  1\nb: yes\n", K8S / "x.yaml")     # the config does find problems


# ---------------------------------------------------------------------------------------------------------
# cross-references within the manifests

@pytest.mark.parametrize("target", ALL_TARGETS)
def test_selectors_match_exactly_the_pods_they_mean(target):
    objects = objects_of(target)
    kvserve_labels = kvserve_pod(objects)["metadata"]["labels"]
    other_pods = [t["metadata"]["labels"] for t in pod_templates(objects) if t is not kvserve_pod(objects)]
    for deployment in find(objects, "Deployment"):
        assert selects(deployment["spec"]["selector"], deployment["spec"]["template"]["metadata"]["labels"])
    model_server_selectors = [one(objects, "Service", "kvserve")["spec"]["selector"],
                              one(objects, "PodDisruptionBudget", "kvserve")["spec"]["selector"],
                              one(objects, "Deployment", "kvserve")["spec"]["selector"]]
    model_server_selectors += [c["labelSelector"] for c in kvserve_pod(objects)["spec"]["topologySpreadConstraints"]]
    model_server_selectors += [o["spec"]["selector"] for o in find(objects, "InferencePool")]
    model_server_selectors += [o["spec"]["selector"] for o in find(objects, "PodMonitor")]
    for selector in model_server_selectors:
        assert selects(selector, kvserve_labels), selector
        assert not any(selects(selector, labels) for labels in other_pods), selector
    for service in find(objects, "Service", "kvserve-epp"):
        pod = one(objects, "Deployment", "kvserve-epp")["spec"]["template"]["metadata"]["labels"]
        assert selects(service["spec"]["selector"], pod) and not selects(service["spec"]["selector"], kvserve_labels)


@pytest.mark.parametrize("target", ALL_TARGETS)
def test_ports_agree(target):
    objects = objects_of(target)
    container = kvserve_container(objects)
    port = container_port(container, "http")
    assert env_of(container)["KVSERVE_PORT"]["value"] == str(port)
    assert f"EXPOSE {port}" in dockerfile()
    annotations = kvserve_pod(objects)["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(port)
    service = one(objects, "Service", "kvserve")
    assert [container_port(container, p["targetPort"]) for p in service["spec"]["ports"]] == [port]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container_port(container, container[probe]["httpGet"]["port"]) == port
    for pool in find(objects, "InferencePool"):
        # the pod's port, which the gateway sends to and the picker scrapes: not the Service's
        assert [p["number"] for p in pool["spec"]["targetPorts"]] == [port]
    for monitor in find(objects, "PodMonitor"):
        assert [container_port(container, e["port"]) for e in monitor["spec"]["podMetricsEndpoints"]] == [port]


@pytest.mark.parametrize("target", ["overlays/gpu", "overlays/gpu-autoscaling"])
def test_the_gateway_route_pool_and_picker_reference_each_other(target):
    objects = objects_of(target)
    pool = one(objects, "InferencePool", "kvserve")
    picker = pool["spec"]["endpointPickerRef"]
    assert picker.get("kind", "Service") == "Service" and picker.get("group", "") == ""
    service = one(objects, "Service", picker["name"])
    grpc = next(p for p in service["spec"]["ports"] if p["port"] == picker["port"]["number"])
    epp = epp_container(objects)
    assert container_port(epp, grpc["targetPort"]) == 9002           # the picker's ext-proc port (--grpc-port)
    assert flag(epp, "pool-name") == pool["metadata"]["name"]
    assert one(objects, "Deployment", "kvserve-epp")["spec"]["replicas"] == 1   # no leader election configured
    probe_ports = {epp[p]["grpc"]["port"] for p in ("livenessProbe", "readinessProbe")}
    assert {container_port(epp, p) for p in probe_ports} == {9003}   # --grpc-health-port
    # the config file the picker is told to read is the one its ConfigMap mounts
    pod = one(objects, "Deployment", "kvserve-epp")["spec"]["template"]["spec"]
    mount = next(m for m in epp["volumeMounts"] if flag(epp, "config-file").startswith(m["mountPath"] + "/"))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    config_map = one(objects, "ConfigMap", volume["configMap"]["name"])
    assert flag(epp, "config-file")[len(mount["mountPath"]) + 1:] in config_map["data"]
    assert env_of(epp)["NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    # RBAC: the picker's service account may watch pods and the pool in its namespace
    account = pod["serviceAccountName"]
    one(objects, "ServiceAccount", account)
    binding = one(objects, "RoleBinding", account)
    assert [(s["kind"], s["name"]) for s in binding["subjects"]] == [("ServiceAccount", account)]
    role = one(objects, binding["roleRef"]["kind"], binding["roleRef"]["name"])
    grants = {(group, resource): set(rule["verbs"])
              for rule in role["rules"] for group in rule["apiGroups"] for resource in rule["resources"]}
    for resource in [("", "pods"), ("inference.networking.k8s.io", "inferencepools")]:
        assert {"get", "list", "watch"} <= grants[resource], resource
    # the route: its Gateway, the pool and the Service exist
    route = one(objects, "HTTPRoute", "kvserve")
    gateways = {g["metadata"]["name"] for g in find(objects, "Gateway")}
    assert [p["name"] for p in route["spec"]["parentRefs"]] == sorted(gateways)
    backends = [b for rule in route["spec"]["rules"] for b in rule["backendRefs"]]
    for backend in backends:
        if backend["kind"] == "InferencePool":
            assert backend["group"] == "inference.networking.k8s.io" and backend["name"] == pool["metadata"]["name"]
        else:
            kvserve_service = one(objects, backend["kind"], backend["name"])
            assert backend["port"] in [p["port"] for p in kvserve_service["spec"]["ports"]]
    assert {b["kind"] for b in backends} == {"InferencePool", "Service"}


@pytest.mark.parametrize("target", ["overlays/gpu", "overlays/gpu-autoscaling"])
def test_the_picker_config_hangs_together(target):
    objects = objects_of(target)
    config = epp_config(objects)
    plugins = {p.get("name", p["type"]): p for p in config["plugins"]}
    referenced = [r["pluginRef"] for profile in config["schedulingProfiles"] for r in profile["plugins"]]
    referenced += [s["pluginRef"] for s in config["dataLayer"]["sources"]]
    referenced += [e["pluginRef"] for s in config["dataLayer"]["sources"] for e in s["extractors"]]
    assert set(referenced) <= set(plugins), set(referenced) - set(plugins)
    extractor = plugins["core-metrics-extractor"]["parameters"]
    engines = {e["name"]: e for e in extractor["engineConfigs"]}
    labels = kvserve_pod(objects)["metadata"]["labels"]
    assert labels[extractor["engineLabelKey"]] in engines and extractor["defaultEngine"] in engines
    source = plugins["metrics-data-source"]["parameters"]
    assert source["path"] == kvserve_pod(objects)["metadata"]["annotations"]["prometheus.io/path"]
    # the picker's own default engines are vLLM and friends: the kvserve entry must carry every signal
    kvserve = engines[labels[extractor["engineLabelKey"]]]
    for key in ("queuedRequestsSpec", "runningRequestsSpec", "kvUsageSpec"):
        assert kvserve[key], key


def test_drain_fits_in_the_termination_grace_period():
    """Kubernetes kills at terminationGracePeriodSeconds, counted from the start of preStop. kvserve needs:
    the preStop sleep, then --shutdown-timeout of drain, the 2 s it gives aborted requests, uvicorn's graceful
    wind-down, and the engine process' stop (its timeout, then terminate and kill, 2 s each, then up to the
    same timeout again for the thread that reads its results)."""
    from kvserve import AsyncEngine
    from kvserve.server import cli, serving

    objects = objects_of("overlays/gpu")
    pod = kvserve_pod(objects)["spec"]
    container = kvserve_container(objects)
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    drain = float(env_of(container)["KVSERVE_SHUTDOWN_TIMEOUT"]["value"])
    abort_wait = float(re.search(r"deadline = time.monotonic\(\) \+ ([0-9.]+)\n", inspect.getsource(serving.drain))[1])
    uvicorn = float(re.search(r"timeout_graceful_shutdown=([0-9.]+)", inspect.getsource(cli.make_server))[1])
    stop_timeout = inspect.signature(AsyncEngine.shutdown).parameters["timeout"].default
    engine_stop = stop_timeout + 2 + 2 + stop_timeout
    needed = pre_stop + drain + abort_wait + uvicorn + engine_stop
    grace = pod["terminationGracePeriodSeconds"]
    assert needed <= grace <= needed + 30, (needed, grace)
    assert pre_stop >= 3              # long enough for the picker and kube-proxy to drop the pod first
    epp_grace = one(objects, "Deployment", "kvserve-epp")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert epp_grace >= grace         # the picker outlives the requests it placed


def test_startup_probe_allows_at_least_the_images_start_period():
    probe = kvserve_container(objects_of("base"))["startupProbe"]
    start_period = int(re.search(r"--start-period=([0-9]+)s", dockerfile())[1])
    assert probe["periodSeconds"] * probe["failureThreshold"] >= start_period
    for name in ("readinessProbe", "livenessProbe"):
        assert "initialDelaySeconds" not in kvserve_container(objects_of("base"))[name]   # the startup probe gates


@pytest.mark.parametrize("target", ALL_TARGETS)
def test_pods_run_locked_down_as_the_images_user(target):
    objects = objects_of(target)
    uid = int(re.search(r"^USER ([0-9]+):([0-9]+)$", dockerfile(), re.M)[1])
    for template in pod_templates(objects):
        spec = template["spec"]
        assert spec["enableServiceLinks"] is False      # no <SERVICE>_PORT variables (KVSERVE_PORT!)
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        for container in spec["containers"]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False and context["readOnlyRootFilesystem"] is True
            assert context["capabilities"]["drop"] == ["ALL"]
    spec = kvserve_pod(objects)["spec"]
    assert spec["securityContext"]["runAsUser"] == uid and spec["securityContext"]["fsGroup"] == uid
    assert spec["automountServiceAccountToken"] is False
    # writable places on a read-only root: the caches, HOME and /tmp
    container = kvserve_container(objects)
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    hf_home = re.search(r"HF_HOME=(\S+)", dockerfile())[1]
    assert env_of(container)["HF_HOME"]["value"] == hf_home and hf_home in mounts
    assert env_of(container)["TRITON_CACHE_DIR"]["value"].startswith(hf_home + "/")
    assert env_of(container)["TORCHINDUCTOR_CACHE_DIR"]["value"] == re.search(r"TORCHINDUCTOR_CACHE_DIR=(\S+)",
                                                                              dockerfile())[1]
    assert {"/tmp", "/home/kvserve"} <= set(mounts)
    assert set(mounts.values()) == {v["name"] for v in spec["volumes"]}


def test_the_model_server_asks_for_a_gpu_and_the_overlay_places_it_on_gpu_nodes():
    base = kvserve_pod(objects_of("base"))["spec"]
    assert kvserve_container(objects_of("base"))["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert env_of(kvserve_container(objects_of("base")))["KVSERVE_DEVICE"]["value"] == "cuda"
    assert "nodeSelector" not in base and "tolerations" not in base
    gpu = kvserve_pod(objects_of("overlays/gpu"))["spec"]
    assert gpu["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in gpu["tolerations"]
    epp = one(objects_of("overlays/gpu"), "Deployment", "kvserve-epp")["spec"]["template"]["spec"]
    assert "nodeSelector" not in epp            # the picker needs no GPU node


def test_image_is_the_one_the_readme_builds():
    readme = (ROOT / "README.md").read_text()
    tag = re.search(r"docker build -f docker/Dockerfile -t (\S+) \.", readme)[1]
    assert kvserve_container(objects_of("base"))["image"] == tag
    image = kvserve_container(objects_of("overlays/gpu"))["image"]
    assert split_image(image)[0] == tag and split_image(image)[1] == ":0.1.0"


def test_api_key_secret_matches_the_documented_command():
    ref = env_of(kvserve_container(objects_of("base")))["KVSERVE_API_KEY"]["valueFrom"]["secretKeyRef"]
    assert ref.get("optional") is not True          # no key, no pod: never an open server by accident
    for doc in (ROOT / "README.md", K8S / "README.md"):
        commands = re.findall(r"kubectl -n \S+ create secret generic (\S+) --from-literal=([\w.-]+)=", doc.read_text())
        assert (ref["name"], ref["key"]) in commands, (doc, commands)


def test_autoscaling_follows_the_waiting_queue_of_these_pods():
    objects = objects_of("overlays/gpu-autoscaling")
    scaled = one(objects, "ScaledObject", "kvserve")
    target = scaled["spec"]["scaleTargetRef"]
    deployment = one(objects, target.get("kind", "Deployment"), target["name"])
    assert "replicas" not in deployment["spec"]            # the HPA owns it; re-applying must not reset it
    assert "replicas" in one(objects_of("overlays/gpu"), "Deployment", "kvserve")["spec"]
    (trigger,) = scaled["spec"]["triggers"]
    query = trigger["metadata"]["query"]
    namespaces = set(re.findall(r'namespace="([^"]+)"', query))
    assert namespaces == {deployment["metadata"]["namespace"]}, query
    assert "kvserve_requests_waiting" in query and trigger["metricType"] == "AverageValue"
    assert 1 <= float(trigger["metadata"]["threshold"]) <= 16
    assert 1 <= scaled["spec"]["minReplicaCount"] < scaled["spec"]["maxReplicaCount"]
    # Prometheus must scrape the pods the query reads: the PodMonitor is in the same overlay
    one(objects, "PodMonitor", "kvserve")


def test_model_cache_component_shares_one_volume():
    objects = objects_of("components/model-cache-pvc")
    volume = next(v for v in kvserve_pod(objects)["spec"]["volumes"] if v["name"] == "hf-cache")
    claim = one(objects, "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]        # every replica mounts it


# ---------------------------------------------------------------------------------------------------------
# against a running kvserve

@pytest.fixture(scope="module")
def server(demo_model_dir, tmp_path_factory):
    s = start_server(demo_model_dir, tmp_path_factory.mktemp("k8s-manifests") / "kvserve.log",
                     "--num-kv-blocks", "64", "--api-key", API_KEY)
    yield s
    stop_server(s)


@pytest.fixture(scope="module")
def metric_families(server) -> dict[str, str]:
    """name -> type, as a scraper reads /metrics (no API key: Prometheus and the picker send none)."""
    r = httpx.get(f"{server.base}/metrics", timeout=10)
    assert r.status_code == 200
    families = {}
    for family in text_string_to_metric_families(r.text):
        families[family.name] = family.type
        for sample in family.samples:      # counters are `name_total` on the wire
            families.setdefault(sample.name, family.type)
    return families


@pytest.fixture(scope="module")
def routes(server) -> dict[str, set[str]]:
    paths = httpx.get(f"{server.base}/openapi.json", timeout=10).json()["paths"]
    return {path: {m.upper() for m in methods} for path, methods in paths.items()}


def test_probe_paths_answer_200_without_the_api_key(server):
    container = kvserve_container(objects_of("base"))
    for name in ("startupProbe", "readinessProbe", "livenessProbe"):
        path = container[name]["httpGet"]["path"]
        assert httpx.get(f"{server.base}{path}", timeout=5).status_code == 200, name
    assert httpx.post(f"{server.base}/v1/completions", json={}, timeout=5).status_code == 401   # the key is on


def metric_spec_name(spec: str) -> str:
    """The metric of a picker metric spec, `name` or `name{label=value,...}`."""
    return re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})?", spec)[1]


def test_the_pickers_metrics_exist_as_gauges(metric_families, server):
    config = epp_config(objects_of("overlays/gpu"))
    extractor = next(p for p in config["plugins"] if p["type"] == "core-metrics-extractor")["parameters"]
    names = {key: metric_spec_name(spec) for engine in extractor["engineConfigs"] for key, spec in engine.items()
             if key.endswith("Spec") and spec}
    assert set(names) == {"queuedRequestsSpec", "runningRequestsSpec", "kvUsageSpec", "cacheBlockSizeSpec",
                          "cacheNumBlocksSpec"}
    for key, name in names.items():
        # the picker reads a gauge's or a counter's value; these are gauges
        assert metric_families.get(name) == "gauge", (key, name, metric_families.get(name))
    # the picker wants the KV usage as a fraction (0-1) and the block size in tokens
    text = httpx.get(f"{server.base}/metrics", timeout=10).text
    values = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    assert 0.0 <= values[names["kvUsageSpec"]] <= 1.0
    assert values[names["cacheBlockSizeSpec"]] == 16 and values[names["cacheNumBlocksSpec"]] == 64


def test_metric_names_in_keda_and_scrape_configs_exist(metric_families, server):
    objects = objects_of("overlays/gpu-autoscaling")
    query = one(objects, "ScaledObject", "kvserve")["spec"]["triggers"][0]["metadata"]["query"]
    names = set(re.findall(r"\b(kvserve_[a-z_]+)\b", query))
    assert names and all(metric_families.get(n) == "gauge" for n in names), names
    paths = {e["path"] for e in one(objects, "PodMonitor", "kvserve")["spec"]["podMetricsEndpoints"]}
    paths.add(kvserve_pod(objects)["metadata"]["annotations"]["prometheus.io/path"])
    for path in paths:
        r = httpx.get(f"{server.base}{path}", timeout=10)
        assert r.status_code == 200 and "kvserve_requests_waiting" in r.text


def route_matches(match: dict, path: str) -> bool:
    value = match["path"]["value"]
    if match["path"]["type"] == "Exact":
        return path == value
    return path == value or path.startswith(value.rstrip("/") + "/")


PRIVATE_PATHS = ("/metrics", "/kv", "/kv/view", "/docs", "/openapi.json", "/docs/oauth2-redirect", "/redoc")


def test_gateway_routes_are_server_routes(routes):
    route = one(objects_of("overlays/gpu"), "HTTPRoute", "kvserve")
    matches = [m for rule in route["spec"]["rules"] for m in rule["matches"]]
    for match in matches:
        assert any(route_matches(match, path) for path in routes), match
    for rule in route["spec"]["rules"]:
        if rule["backendRefs"][0]["kind"] == "InferencePool":
            # only what the picker's OpenAI parser reads (it answers 400 to other bodies): POST completions
            for match in rule["matches"]:
                path = match["path"]["value"]
                assert match["path"]["type"] == "Exact" and re.search(r"/(chat/)?completions$", path), path
                assert "POST" in routes[path]
    for path in PRIVATE_PATHS:
        assert not any(route_matches(m, path) for m in matches), path
    # the rest of the API is reachable through the gateway
    for path in routes:
        if path not in PRIVATE_PATHS:
            assert any(route_matches(m, path.split("{")[0].rstrip("/") or "/") for m in matches), path


def test_render_is_stable():
    """Rendering twice gives equal objects (the renderer does not mutate its inputs)."""
    assert [json.dumps(o, sort_keys=True) for o in render(K8S / "overlays/gpu-autoscaling")] == \
        [json.dumps(o, sort_keys=True) for o in render(K8S / "overlays/gpu-autoscaling")]
