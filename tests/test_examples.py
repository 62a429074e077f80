"""examples/ is what users copy, so it must be right: every manifest valid Kubernetes,
every proxyctl config valid, and the pieces fitting together once applied (mounts,
probes, RBAC, an agent behind every route)."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Callable, Iterator

import jsonschema
import pytest
from kubernetes_validate import utils as kubernetes_validate
from ruamel.yaml import YAML

from proxyctl.cli import DEFAULT_CONFIG, DEFAULT_STATE_DIR, main
from proxyctl.config import CONFIGMAP_KEY, Config, load_config
from proxyctl.nginx import Nginx

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
# The newest Kubernetes whose schemas the installed kubernetes-validate ships.
KUBERNETES_VERSION = kubernetes_validate.latest_version()

Document = dict[str, Any]


def documents(path: Path) -> list[Document]:
    return [d for d in YAML(typ="safe").load_all(path.read_text(encoding="utf-8")) if d is not None]


def is_manifest(document: Any) -> bool:
    return isinstance(document, dict) and "apiVersion" in document and "kind" in document


def is_custom(document: Document) -> bool:
    """A resource a CRD defines: kubernetes-validate has no schema for it, a test below checks it."""
    return document["apiVersion"].split("/")[0] in CUSTOM_GROUPS


def holds_config(document: Document) -> bool:
    return document["kind"] == "ConfigMap" and CONFIGMAP_KEY in (document.get("data") or {})


CUSTOM_GROUPS = {"monitoring.coreos.com"}
YAML_FILES = sorted(EXAMPLES.glob("*.yaml"))
MANIFEST_FILES = [p for p in YAML_FILES if any(is_manifest(d) and not is_custom(d) for d in documents(p))]
PODMONITOR_FILE = EXAMPLES / "podmonitor.yaml"
CONFIG_FILES = [p for p in YAML_FILES if any(isinstance(d, dict) and "routes" in d for d in documents(p))]
CONFIGMAP_FILES = [p for p in MANIFEST_FILES if any(is_manifest(d) and holds_config(d) for d in documents(p))]
ENDPOINTS_FILE = EXAMPLES / "endpoints.yaml"
MANIFESTS = [d for p in MANIFEST_FILES for d in documents(p) if is_manifest(d)]


def schema_errors(path: Path) -> list[str]:
    """What the Kubernetes API schema says is wrong with each manifest in `path` (strict: no unknown keys)."""
    errors = []
    for document in documents(path):
        where = f"{path.name}: {document.get('kind')}/{(document.get('metadata') or {}).get('name')}"
        try:
            kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            field = ".".join(str(part) for part in error.absolute_path)
            errors.append(f"{where}: {field}: {error.message}")
        except kubernetes_validate.SchemaNotFoundError as error:
            errors.append(f"{where}: {error}")
    return errors


# --- every file is checked ------------------------------------------------------------------------


def test_every_yaml_file_in_examples_is_checked_by_a_test_here() -> None:
    unchecked = set(YAML_FILES) - set(MANIFEST_FILES) - set(CONFIG_FILES) - {ENDPOINTS_FILE, PODMONITOR_FILE}
    assert not unchecked, f"neither a manifest nor a proxyctl config: {sorted(p.name for p in unchecked)}"
    assert {"app.yaml", "configmap.yaml", "env-pod.yaml", "node-agents.yaml", "rbac.yaml"} <= {
        p.name for p in MANIFEST_FILES}


# --- Kubernetes schema ---------------------------------------------------------------------------------


@pytest.mark.parametrize("path", MANIFEST_FILES, ids=lambda p: p.name)
def test_manifest_is_valid_kubernetes(path: Path) -> None:
    assert schema_errors(path) == []


def _container(deployment: Document) -> Document:
    return deployment["spec"]["template"]["spec"]["initContainers"][0]


def _ports_as_string(deployment: Document) -> None:
    _container(deployment)["ports"] = "9901"


def _missing_name(deployment: Document) -> None:
    del _container(deployment)["name"]


def _misspelt_key(deployment: Document) -> None:
    _container(deployment)["restartpolicy"] = _container(deployment).pop("restartPolicy")


@pytest.mark.parametrize(("breakage", "complaint"), [
    (_ports_as_string, "'9901' is not of type 'array'"),
    (_missing_name, "'name' is a required property"),
    (_misspelt_key, "Additional properties are not allowed ('restartpolicy' was unexpected)"),
], ids=["ports-as-string", "missing-name", "misspelt-key"])
def test_schema_check_rejects_a_broken_copy(tmp_path: Path, breakage: Callable[[Document], None],
                                            complaint: str) -> None:
    """The check above can fail: the same check finds each mistake in a copy of app.yaml."""
    deployment = copy.deepcopy(documents(EXAMPLES / "app.yaml")[0])
    breakage(deployment)
    broken = tmp_path / "app.yaml"
    with broken.open("w", encoding="utf-8") as file:
        YAML().dump(deployment, file)
    errors = schema_errors(broken)
    assert len(errors) == 1 and complaint in errors[0], errors
    assert "spec.template.spec.initContainers.0" in errors[0]


# --- proxyctl's own check ------------------------------------------------------------------------------


@pytest.mark.parametrize("path", CONFIGMAP_FILES + CONFIG_FILES, ids=lambda p: p.name)
def test_proxyctl_validate_accepts(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(path)]) == 0, capsys.readouterr().err


def test_proxyctl_validate_rejects_a_broken_configmap_at_its_line(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    text = (EXAMPLES / "configmap.yaml").read_text(encoding="utf-8")
    broken = tmp_path / "configmap.yaml"
    broken.write_text(text.replace("protocol: udp", "protocol: tpc", 1), encoding="utf-8")
    line = next(i for i, row in enumerate(broken.read_text().splitlines(), 1) if "protocol: tpc" in row)

    assert main(["validate", str(broken)]) == 1
    assert f"configmap.yaml:{line}:" in capsys.readouterr().err


def test_render_example_is_accepted_by_nginx(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The command in endpoints.yaml's comment, then `nginx -t` on what it prints."""
    assert main(["render", "--config", str(EXAMPLES / "proxyctl.yaml"), "--endpoints", str(ENDPOINTS_FILE),
                 "--state-dir", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert "server 10.0.0.5:8125;" in text and "server [fd00::5]:8125;" in text
    Nginx(tmp_path).test(text)


# --- the pieces fit together ----------------------------------------------------------------------------


def pod_specs() -> Iterator[tuple[Document, Document]]:
    """(manifest, pod spec) for every Pod and workload template in the examples."""
    for manifest in MANIFESTS:
        if manifest["kind"] == "Pod":
            yield manifest, manifest["spec"]
        elif "template" in (manifest.get("spec") or {}):
            yield manifest, manifest["spec"]["template"]["spec"]


def runs_proxyctl(container: Document) -> bool:
    return container["image"].rsplit("/", 1)[-1].split(":")[0] == "proxyctl"


def find(kind: str, namespace: str, name: str) -> Document:
    matches = [m for m in MANIFESTS if m["kind"] == kind and m["metadata"]["name"] == name
               and m["metadata"].get("namespace", "default") == namespace]
    assert len(matches) == 1, f"{kind} {namespace}/{name}: {len(matches)} in examples/"
    return matches[0]


def sidecars() -> Iterator[tuple[Document, Document, Document, Config]]:
    """(manifest, pod spec, proxyctl container, its config) for pods that mount a proxyctl ConfigMap."""
    for manifest, spec in pod_specs():
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for container in spec.get("initContainers", []) + spec["containers"]:
            if not runs_proxyctl(container):
                continue
            for mount in container.get("volumeMounts", []):
                source = volumes[mount["name"]].get("configMap")
                if source is None:
                    continue
                configmap = find("ConfigMap", manifest["metadata"].get("namespace", "default"), source["name"])
                yield manifest, spec, container, load_config(configmap["data"][CONFIGMAP_KEY])


def test_there_is_a_native_sidecar_example() -> None:
    assert [m["metadata"]["name"] for m, *_ in sidecars()] == ["myapp"]


def test_sidecar_mounts_the_config_directory_so_updates_arrive() -> None:
    for _, spec, container, _ in sidecars():
        volumes = {v["name"]: v for v in spec["volumes"]}
        mount = next(m for m in container["volumeMounts"] if m["mountPath"] == str(Path(DEFAULT_CONFIG).parent))
        assert "subPath" not in mount and "configMap" in volumes[mount["name"]]


def test_sidecar_keeps_its_state_in_an_emptydir() -> None:
    """The only writable place: the root filesystem is read-only."""
    for _, spec, container, _ in sidecars():
        volumes = {v["name"]: v for v in spec["volumes"]}
        mount = next(m for m in container["volumeMounts"] if m["mountPath"] == DEFAULT_STATE_DIR)
        assert "emptyDir" in volumes[mount["name"]]
        assert container["securityContext"]["readOnlyRootFilesystem"] is True


def test_sidecar_is_native_and_holds_the_app_until_readyz_answers() -> None:
    for _, spec, container, config in sidecars():
        assert container in spec["initContainers"] and container["restartPolicy"] == "Always"
        probe = container["startupProbe"]["httpGet"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        host, _, port = config.health.rpartition(":")
        assert probe["path"] == "/readyz" and ports.get(probe["port"], probe["port"]) == int(port)
        assert not host.startswith("127."), "the kubelet probes the pod IP, not loopback"


def test_sidecar_learns_its_node_and_namespace_from_the_downward_api() -> None:
    for _, _, container, _ in sidecars():
        env = {e["name"]: e for e in container["env"]}
        assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
        assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"


def test_sidecar_runs_unprivileged() -> None:
    for _, spec, container, _ in sidecars():
        context = container["securityContext"]
        assert context["runAsNonRoot"] is True and spec["securityContext"]["runAsNonRoot"] is True
        assert context["capabilities"]["drop"] == ["ALL"] and context["allowPrivilegeEscalation"] is False


def test_rbac_grants_list_and_watch_in_each_route_namespace_and_nothing_cluster_wide() -> None:
    assert not [m for m in MANIFESTS if m["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    for role in (m for m in MANIFESTS if m["kind"] == "Role"):
        for rule in role["rules"]:
            assert rule["apiGroups"] == [""] and rule["resources"] == ["pods"]
            assert set(rule["verbs"]) <= {"get", "list", "watch"}
    for manifest, spec, _, config in sidecars():
        account = spec["serviceAccountName"]
        own = manifest["metadata"].get("namespace", "default")
        find("ServiceAccount", own, account)
        for route in config.routes:
            namespace = route.namespace or own
            verbs = {verb for binding in MANIFESTS if binding["kind"] == "RoleBinding"
                     and binding["metadata"]["namespace"] == namespace
                     and {"kind": "ServiceAccount", "name": account, "namespace": own} in binding["subjects"]
                     for rule in find("Role", namespace, binding["roleRef"]["name"])["rules"]
                     for verb in rule["verbs"]}
            assert {"list", "watch"} <= verbs, f"route {route.key}: no list/watch on pods in {namespace}"


def test_every_route_finds_an_agent_among_the_examples() -> None:
    """Applied together, the examples give every route a backend, so the app's startupProbe passes."""
    for manifest, _, _, config in sidecars():
        own = manifest["metadata"].get("namespace", "default")
        for route in config.routes:
            target = route.target_port or route.port
            agents = [
                workload["metadata"]["name"]
                for workload, spec in pod_specs()
                if workload["kind"] == "DaemonSet" and workload["metadata"]["namespace"] == (route.namespace or own)
                and route.selector.matches(workload["spec"]["template"]["metadata"]["labels"])
                for container in spec["containers"] for port in container.get("ports", [])
                if target in (port["containerPort"], port.get("name"))
                and port.get("protocol", "TCP") == route.protocol.upper()
            ]
            assert agents, f"route {route.key}: no DaemonSet in examples/ serves {route.protocol} {target}"


# PodMonitor (monitoring.coreos.com/v1): a subset of the fields its CRD defines, with the CRD's own
# types and duration pattern (prometheus-operator 0.91, monitoring.coreos.com_podmonitors.yaml);
# kubernetes-validate has no CRD schemas, and an unknown field here is a mistake.
DURATION = {"type": "string", "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"}
LABEL_SELECTOR = {"type": "object", "additionalProperties": False, "properties": {
    "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
    "matchExpressions": {"type": "array"}}}
PODMONITOR_SCHEMA = {
    "type": "object", "additionalProperties": False, "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PodMonitor"},
        "metadata": {"type": "object", "required": ["name"], "properties": {
            "name": {"type": "string"}, "namespace": {"type": "string"},
            "labels": {"type": "object", "additionalProperties": {"type": "string"}}}},
        "spec": {"type": "object", "additionalProperties": False, "required": ["selector"], "properties": {
            "selector": LABEL_SELECTOR,
            "namespaceSelector": {"type": "object", "additionalProperties": False, "properties": {
                "any": {"type": "boolean"}, "matchNames": {"type": "array", "items": {"type": "string"}}}},
            "jobLabel": {"type": "string"},
            "podTargetLabels": {"type": "array", "items": {"type": "string"}},
            "podMetricsEndpoints": {"type": "array", "minItems": 1, "items": {
                "type": "object", "additionalProperties": False, "properties": {
                    "port": {"type": "string"}, "portNumber": {"type": "integer"}, "path": {"type": "string"},
                    "interval": DURATION, "scrapeTimeout": DURATION,
                    "honorLabels": {"type": "boolean"}, "relabelings": {"type": "array"},
                    "metricRelabelings": {"type": "array"}}}}}}}}


def podmonitor_errors(document: Document) -> list[str]:
    validator = jsonschema.Draft202012Validator(PODMONITOR_SCHEMA)
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document)]


def test_podmonitor_has_the_crd_fields_only() -> None:
    (podmonitor,) = documents(PODMONITOR_FILE)
    assert podmonitor_errors(podmonitor) == []
    broken = copy.deepcopy(podmonitor)
    broken["spec"]["podMetricsEndpoints"][0]["intervall"] = "30s"
    assert podmonitor_errors(broken) == [
        "spec.podMetricsEndpoints.0: Additional properties are not allowed ('intervall' was unexpected)"]


def test_podmonitor_scrapes_the_sidecars_metrics() -> None:
    """It selects the pods that run the sidecar, in their namespace, on the port its config serves health on."""
    (podmonitor,) = documents(PODMONITOR_FILE)
    (endpoint,) = podmonitor["spec"]["podMetricsEndpoints"]
    assert endpoint["path"] == "/metrics"
    for manifest, _, container, config in sidecars():
        labels = manifest["spec"]["template"]["metadata"]["labels"]
        assert podmonitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert podmonitor["metadata"]["namespace"] == manifest["metadata"].get("namespace", "default")
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports[endpoint["port"]] == int(config.health.rpartition(":")[2])


# --- the image and the hook -----------------------------------------------------------------------------


def test_image_installs_what_make_deps_installs() -> None:
    dockerfile = (REPO / "Dockerfile").read_text(encoding="utf-8")
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    apt = re.search(r"^NGINX_PACKAGES := (.+)$", makefile, re.MULTILINE)
    assert apt, "the apt packages of `make deps`"
    assert f"apt-get install -y --no-install-recommends {apt.group(1)}" in dockerfile
    assert "-c constraints.txt ." in dockerfile  # the versions CI tested
    assert "pip install --quiet --disable-pip-version-check -c constraints.txt" in makefile
    assert f"mkdir -p {DEFAULT_STATE_DIR}" in dockerfile
    user = re.search(r"^USER (\d+):(\d+)$", dockerfile, re.MULTILINE)
    assert user, "a numeric USER, so that the kubelet can check runAsNonRoot"
    for _, spec, _, _ in sidecars():
        assert str(spec["securityContext"]["runAsUser"]) == user.group(1)


def test_pre_commit_hook_runs_proxyctl_validate_on_config_files() -> None:
    [hook] = YAML(typ="safe").load((REPO / ".pre-commit-hooks.yaml").read_text(encoding="utf-8"))
    assert (hook["id"], hook["entry"], hook["language"]) == ("proxyctl-validate", "proxyctl validate", "python")
    for name in ("proxyctl.yaml", "k8s/proxyctl-configmap.yml", "deploy/proxyctl.yaml"):
        assert re.search(hook["files"], name), name
    for name in ("k8s/deployment.yaml", "proxyctl/config.py", "values.yaml"):
        assert not re.search(hook["files"], name), name
