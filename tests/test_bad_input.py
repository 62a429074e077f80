"""Bad input: whatever a ConfigMap or the API server hands proxyctl, it answers with a located error
or a skipped pod, never a traceback, and nothing hostile reaches nginx.conf. (Bytes on disk and
the environment shorthand, also against a running sidecar: test_bad_config_on_disk.py.)
"""

from __future__ import annotations

import copy
import io
import math
import re
from pathlib import Path
from typing import Any, Callable, Iterable

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from ruamel.yaml import YAML

from proxyctl.backend import Backend
from proxyctl.config import ENV_SOURCE, Config, ConfigError, Problem, check_file, load_config, read_config
from proxyctl.render import render
from tests.kubeapi import KubeApiServer
from tests.support import free_port, wait_for

SOURCE = "proxyctl.yaml"
NS = "kube-system"
AGENT = {"app": "agent"}
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def dump(data: Any) -> str:
    """YAML text for `data`, keys in their given order."""
    stream = io.StringIO()
    yaml = YAML(typ="safe", pure=True)
    yaml.sort_base_mapping_type_on_output = False  # type: ignore[assignment]
    yaml.dump(data, stream)
    return stream.getvalue()


def assert_located(problems: list[Problem], text: str) -> None:
    """Every problem names this file and says something; a position, when given, is inside the file."""
    assert problems
    lines = len(re.split("\r\n|[\r\n\x85\u2028\u2029]", text))  # what YAML counts as line breaks
    for problem in problems:
        assert problem.source == SOURCE and problem.message.strip(), problem
        assert "defect in proxyctl" not in problem.message, problem  # the safety net caught an exception
        assert (problem.line is None) == (problem.column is None), problem
        assert problem.line is None or (1 <= problem.line <= lines and problem.column >= 1), (problem, text)


def assert_loads_or_located(text: str) -> None:
    try:
        load_config(text, SOURCE)
    except ConfigError as exc:
        assert_located(exc.problems, text)


def assert_checks_cleanly(text: str) -> None:
    problems = check_file(text, SOURCE)
    if problems:
        assert_located(problems, text)


# --- arbitrary input to the loader -----------------------------------------------------------

scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
structures = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10) | st.integers(),
                                                                         inner, max_size=4),
    max_leaves=20)


@FUZZ
@given(st.text())
def test_any_text_gives_a_config_or_located_errors(text: str) -> None:
    assert_loads_or_located(text)
    assert_checks_cleanly(text)


@FUZZ
@given(structures)
def test_any_yaml_document_gives_a_config_or_located_errors(data: Any) -> None:
    assert_loads_or_located(dump(data))


# Documents with the real keys and values of any type, so every validator sees hostile input.
label_maps = st.dictionaries(st.text(max_size=8) | scalars, scalars | structures, max_size=3)
expressions = st.lists(st.fixed_dictionaries({}, optional={
    "key": scalars, "operator": st.sampled_from(["In", "NotIn", "Exists", "DoesNotExist", "in"]) | scalars,
    "values": st.lists(scalars, max_size=3) | structures}), max_size=3)
selectors = (st.text(max_size=30) | structures
             | st.fixed_dictionaries({}, optional={"matchLabels": label_maps | structures,
                                                   "matchExpressions": expressions | structures}))
durations = st.sampled_from(["10s", "500ms", "5m", "0s", "1h", "-1s"]) | st.floats() | st.integers() | structures
routes = st.fixed_dictionaries({}, optional={
    "name": st.text(max_size=70) | scalars,
    "port": st.integers(-1, 70000) | scalars,
    "protocol": st.sampled_from(["udp", "tcp", "TCP"]) | scalars,
    "selector": selectors,
    "namespace": st.text(max_size=70) | scalars,
    "targetPort": st.integers(-1, 70000) | st.text(max_size=20) | scalars,
    "whenNoLocalPod": st.sampled_from(["reject", "anyNode"]) | scalars,
    "balance": st.sampled_from(["round_robin", "least_conn", "hash"]) | scalars,
    "udpResponses": st.integers(-2, 5) | scalars,
    "timeout": durations,
    "extra": scalars,
})
configs = st.fixed_dictionaries({}, optional={
    "routes": st.lists(routes, max_size=3) | structures,
    "listenAddress": st.sampled_from(["127.0.0.1", "0.0.0.0", "::1", "::1%lo", "localhost"]) | scalars,
    "logLevel": st.sampled_from(["info", "debug", "trace"]) | scalars,
    "health": st.sampled_from(["127.0.0.1:9901", "[::1]:9901", "127.0.0.1:9_901", ":9901"]) | scalars,
    "watchTimeout": durations,
})

ROUTE = {"port": 8125, "protocol": "udp", "selector": "app=agent"}
ONCE_CRASHED = [  # each of these once raised something other than ConfigError, or could not be rendered
    {"routes": [{**ROUTE, "selector": {"matchLabels": ["app"]}}]},
    {"routes": [{**ROUTE, "selector": {"matchExpressions": 5}}]},
    {"routes": [{**ROUTE, "selector": {1: 2}}]},
    {"routes": [{**ROUTE, "timeout": float("inf")}]},
    {"routes": [ROUTE], "watchTimeout": float("inf")},
]


@FUZZ
@example(ONCE_CRASHED[0])
@example(ONCE_CRASHED[1])
@example(ONCE_CRASHED[2])
@example(ONCE_CRASHED[3])
@example(ONCE_CRASHED[4])
@given(configs)
def test_config_shaped_documents_give_a_renderable_config_or_located_errors(data: dict[str, Any]) -> None:
    text = dump(data)
    try:
        config = load_config(text, SOURCE)
    except ConfigError as exc:
        assert_located(exc.problems, text)
        return
    render(config, {r.key: [Backend("127.0.0.2", 8125)] for r in config.routes}, Path("/state"))
    durations = [config.watch_timeout, *(r.timeout for r in config.routes if r.timeout is not None)]
    assert all(math.isfinite(d) and d > 0 for d in durations), durations  # each watch does round(watchTimeout)


def manifest(config: str, block: bool) -> str:
    """A ConfigMap holding `config`, as a `|` block (what people write) or a quoted string (what tools may)."""
    if not block:
        return dump({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "proxyctl"},
                     "data": {"proxyctl.yaml": config}})
    body = "".join(f"    {line}\n" for line in config.splitlines())
    return f"apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: proxyctl\ndata:\n  proxyctl.yaml: |\n{body}"


@FUZZ
@given(configs)
def test_configmap_manifests_with_a_block_config_give_located_errors(data: dict[str, Any]) -> None:
    assert_checks_cleanly(manifest(dump(data), block=True))


@FUZZ
@example(ONCE_CRASHED[0])
@given(configs)
def test_configmap_manifests_with_a_quoted_config_give_located_errors(data: dict[str, Any]) -> None:
    assert_checks_cleanly(manifest(dump(data), block=False))


# YAML built from the pieces a config is made of: keys, anchors, aliases, merge keys, tags, flow.
FRAGMENTS = ["routes:", "\n", "\n  - ", "  ", "port: ", "protocol: ", "selector: ", "name: ", "timeout: ",
             "matchLabels: ", "matchExpressions:", "listenAddress: ", "{", "}", "[", "]", ", ", ": ", "&a ", "*a",
             "<<: ", "!!str ", "!!binary ", "? ", "- ", "'", '"', "#", "udp", "tcp", "8125", "app=agent", "1e999",
             "~", "null", "true", ".inf", "---\n", "...\n", "\t", "%YAML 1.2\n", "|\n", ">-\n"]
yaml_texts = st.lists(st.sampled_from(FRAGMENTS) | st.text(max_size=4), max_size=30).map("".join)


@FUZZ
@example("routes:\n  - {port: 8125, protocol: udp, selector: app=agent, <<: {extra: 1}}\n")  # once a KeyError
@example("? : routes:")  # once a TypeError: a mapping as a key, holding a mapping
@example("[[routes]]: x")  # and a list as a key, holding a list
@given(yaml_texts)
def test_yaml_made_of_config_pieces_gives_a_config_or_located_errors(text: str) -> None:
    assert_loads_or_located(text)
    assert_checks_cleanly(text)


# --- hostile values in every field ------------------------------------------------------------------

HOSTILE = [";", "}", "{", "\n", "$", "'", '"', "#", " ", "\t", "\x00", "é", "\u202e", "x" * 5000]


def placed(valid: str) -> Iterable[str]:
    """`valid` with each hostile fragment at its start, in its middle and at its end."""
    middle = len(valid) // 2
    for fragment in HOSTILE:
        yield from (fragment + valid, valid[:middle] + fragment + valid[middle:], valid + fragment)


def base() -> dict[str, Any]:
    return {"listenAddress": "127.0.0.1", "health": "127.0.0.1:9901", "logLevel": "info", "watchTimeout": "2s",
            "routes": [{"name": "statsd", "port": 8125, "protocol": "udp", "selector": "app=agent",
                        "namespace": NS, "targetPort": "statsd", "whenNoLocalPod": "reject",
                        "balance": "round_robin", "udpResponses": 0, "timeout": "10s"}]}


def route_field(key: str) -> Callable[[dict[str, Any], Any], None]:
    return lambda config, value: config["routes"][0].__setitem__(key, value)


def top_field(key: str) -> Callable[[dict[str, Any], Any], None]:
    return lambda config, value: config.__setitem__(key, value)


def selector(make: Callable[[str], dict[str, Any]]) -> Callable[[dict[str, Any], Any], None]:
    return lambda config, value: config["routes"][0].__setitem__("selector", make(value))


# (field, where its error must point, how to set it, the valid value the hostile fragments go into)
FIELDS: list[tuple[str, str, Callable[[dict[str, Any], Any], None], list[str]]] = [
    ("name", "routes[0].name", route_field("name"), ["statsd"]),
    ("port", "routes[0].port", route_field("port"), ["8125"]),
    ("protocol", "routes[0].protocol", route_field("protocol"), ["udp"]),
    ("selector", "routes[0].selector", route_field("selector"), ["app=agent"]),
    ("matchLabels value", "routes[0].selector", selector(lambda v: {"matchLabels": {"app": v}}), ["agent"]),
    ("matchLabels key", "routes[0].selector", selector(lambda v: {"matchLabels": {v: "agent"}}), ["app"]),
    ("matchExpressions", "routes[0].selector",
     selector(lambda v: {"matchExpressions": [{"key": "app", "operator": "In", "values": [v]}]}), ["agent"]),
    ("namespace", "routes[0].namespace", route_field("namespace"), [NS]),
    ("targetPort", "routes[0].targetPort", route_field("targetPort"), ["statsd"]),
    ("whenNoLocalPod", "routes[0].whenNoLocalPod", route_field("whenNoLocalPod"), ["reject"]),
    ("balance", "routes[0].balance", route_field("balance"), ["hash"]),
    ("udpResponses", "routes[0].udpResponses", route_field("udpResponses"), ["1"]),
    ("timeout", "routes[0].timeout", route_field("timeout"), ["10s"]),
    ("listenAddress", "listenAddress", top_field("listenAddress"), ["127.0.0.1", "::1%lo"]),
    ("logLevel", "logLevel", top_field("logLevel"), ["info"]),
    ("health", "health", top_field("health"), ["127.0.0.1:9901", "[::1%lo]:9901"]),
    ("watchTimeout", "watchTimeout", top_field("watchTimeout"), ["2s"]),
]


def strings(config: Config) -> str:
    """Every value the validated config holds, as text: what could reach nginx.conf or a socket."""
    def leaves(value: Any) -> Iterable[str]:
        if isinstance(value, dict):
            for item in value.values():
                yield from leaves(item)
        elif isinstance(value, list):
            for item in value:
                yield from leaves(item)
        else:
            yield str(value)
    return "\x1f".join(leaves(config.model_dump()))


def leaks(fragment: str, accepted: str, baseline: str) -> bool:
    """True when `accepted` holds more of the fragment's characters than the benign baseline does."""
    return any(accepted.count(c) > baseline.count(c) for c in set(fragment))


@pytest.mark.parametrize(
    "field, path, set_value, valid",
    [pytest.param(*f, id=f[0]) for f in FIELDS])
def test_hostile_values_are_rejected_with_a_located_error_or_never_reach_nginx(
        field: str, path: str, set_value: Callable[[dict[str, Any], Any], None], valid: list[str]) -> None:
    benign = load_config(dump(base()), SOURCE)
    endpoints = {"statsd": [Backend("127.0.0.2", 8125)]}
    benign_conf = render(benign, endpoints, Path("/state"))
    wrong = []
    for value in (v for good in valid for v in placed(good)):
        data = base()
        set_value(data, value)
        text = dump(data)
        assert YAML(typ="safe").load(text) == data  # the file holds exactly the hostile value
        try:
            config = load_config(text, SOURCE)
        except ConfigError as exc:
            if not any(p.path == path and p.line is not None for p in exc.problems):
                wrong.append(f"{value[:40]!r}: error not located at {path}: {exc}")
            continue
        fragment = next(h for h in HOSTILE if h in value)
        conf = render(config, {config.routes[0].key: endpoints["statsd"]}, Path("/state"))
        if leaks(fragment, conf, benign_conf):
            wrong.append(f"{value[:40]!r}: accepted, and reaches nginx.conf")
        elif leaks(fragment, strings(config), strings(benign)):
            wrong.append(f"{value[:40]!r}: accepted as is (not rendered into nginx.conf)")
    assert wrong == [], "\n".join(wrong)


ENV_FIELDS = [("PORT", "PORT/SOURCE_PORT", "8125"), ("SOURCE_PORT", "PORT/SOURCE_PORT", "8125"),
              ("TARGET_PORT", "TARGET_PORT", "statsd"), ("SELECTOR", "SELECTOR", "app=agent"),
              ("PROTOCOL", "PROTOCOL", "udp"), ("NAMESPACE", "NAMESPACE", NS), ("LOG_LEVEL", "", "info")]


@pytest.mark.parametrize(
    "variable, path, valid",
    [pytest.param(*f, id=f[0]) for f in ENV_FIELDS])
def test_hostile_values_in_the_environment_shorthand_are_rejected_or_normalised(
        variable: str, path: str, valid: str) -> None:
    env = {"PORT": "8125", "SELECTOR": "app=agent", "PROTOCOL": "udp", "NAMESPACE": NS, "TARGET_PORT": "statsd"}
    benign = read_config(None, env)
    wrong = []
    for value in placed(valid):
        try:
            config = read_config(None, {**env, variable: value})
        except ConfigError as exc:
            if not any(p.source == ENV_SOURCE and p.path == path for p in exc.problems):
                wrong.append(f"{value[:40]!r}: error does not name {path}: {exc}")
            continue
        # LOG_LEVEL is a hint from the original image: an unknown one keeps the default.
        if leaks(next(h for h in HOSTILE if h in value), strings(config), strings(benign)):
            wrong.append(f"{value[:40]!r}: accepted as is")
    assert wrong == [], "\n".join(wrong)


# --- pods from the API that are not what they should be ------------------------------------------------------


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """A mutation of a pod: set `path` (dotted, digits index lists) to `value`, or delete it when value is ..."""
    *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]

    def mutate(pod: dict[str, Any]) -> None:
        node: Any = pod
        for part in parents:
            node = node[part]
        if value is ...:
            del node[last]
        else:
            node[last] = value
    return mutate


PORT_PATH = "spec.containers.0.ports.0.containerPort"
# (what is wrong, the mutation, what the skip line says)
BAD_PODS = [
    ("podIP not an IP", _set("status.podIP", "not-an-ip"), "is not an IP address"),
    ("podIP with nginx syntax", _set("status.podIP", "127.0.0.9; } stream {"), "is not an IP address"),
    ("podIP IPv6 with a zone", _set("status.podIP", "fe80::9%eth0;}"), "is not an IP address"),
    ("podIP a number", _set("status.podIP", 2130706441), "is not an IP address"),
    ("no status", _set("status", ...), "no status"),
    ("status a list", _set("status", []), "no status"),
    ("conditions a number", _set("status.conditions", 5), "conditions"),
    ("containers a string", _set("spec.containers", "app"), "containers"),
    ("containerPort out of range", _set(PORT_PATH, 99999), "containerPort"),
    ("containerPort a string", _set(PORT_PATH, "8125"), "containerPort"),
    ("no metadata.name", _set("metadata.name", ...), "no metadata.name"),
]


def server_lines(sidecar) -> set[str]:
    text = sidecar.nginx_conf()
    return set(re.findall(r"^\s*server (\S+);$", text, re.M))


@pytest.mark.slow
@pytest.mark.parametrize(
    "mutate, says",
    [pytest.param(m, s, id=name) for name, m, s in BAD_PODS])
def test_a_malformed_pod_from_the_api_is_skipped_with_a_log_line_and_never_rendered(
        mutate: Callable[[dict[str, Any]], None], says: str, kube_api: KubeApiServer, proxyctl) -> None:
    port = free_port()
    ports = [{"name": "statsd", "containerPort": port, "protocol": "UDP"}]
    good = kube_api.add_pod("agent-good", NS, AGENT, node="node-a", ip="127.0.0.2", ports=ports)

    def bad(name: str) -> dict[str, Any]:
        pod = copy.deepcopy(good)
        pod["metadata"].update(name=name, uid=name)
        del pod["metadata"]["resourceVersion"]  # put_raw_pod stores it as given: no stale version
        pod["status"]["podIP"] = "127.0.0.9"
        mutate(pod)
        return pod

    kube_api.put_raw_pod(bad("bad-listed"))  # met in the first list
    sidecar = proxyctl(f"routes:\n  - {{name: statsd, port: {port}, protocol: udp, selector: app=agent, "
                       f"namespace: {NS}, targetPort: statsd}}\n", start=False).start(wait_ready=False)
    kube_api.put_raw_pod(bad("bad-watched"))  # met in the watch
    kube_api.add_pod("agent-later", NS, AGENT, node="node-a", ip="127.0.0.3", ports=ports)

    expected = {f"127.0.0.2:{port}", f"127.0.0.3:{port}"}

    def served() -> set[str]:
        code, body = sidecar.get("/routes")
        return set(re.findall(r'"(127\.[^"]+)"', body)) if code == 200 else set()

    # Stop early when the sidecar died, or retried in a loop: then it will not get there.
    wait_for(lambda: served() >= expected or sidecar.process.poll() is not None or "Traceback" in sidecar.log(), 10,
             what="the pod added after the bad ones")
    log = sidecar.log()
    assert sidecar.process.poll() is None and "Traceback" not in log, log
    assert served() == expected and server_lines(sidecar) == expected, log
    skipped = [line for line in log.splitlines() if "skipping a pod the API sent" in line and says in line]
    assert len(skipped) >= 2, log  # one for the listed pod, one for the watched one
    if says != "no metadata.name":
        assert any("bad-listed" in line for line in skipped) and any("bad-watched" in line for line in skipped), log


@pytest.mark.slow
def test_unknown_fields_in_a_pod_are_ignored_and_never_rendered(kube_api: KubeApiServer, proxyctl) -> None:
    """Kubernetes adds fields in every release: a client must ignore what it does not know, not skip the pod."""
    port = free_port()
    pod = kube_api.add_pod("agent", NS, AGENT, node="node-a", ip="127.0.0.2")
    hostile = "127.0.0.66; } stream { server {"
    pod["future"] = {"podIP": hostile}
    pod["metadata"]["futureField"] = hostile
    pod["spec"]["futureField"] = [hostile]
    pod["spec"]["containers"][0]["futureField"] = hostile
    pod["status"]["podIPs"] = [{"ip": "127.0.0.2"}, {"ip": hostile}]
    pod["status"]["hostIP"] = hostile
    kube_api.put_raw_pod(pod)
    sidecar = proxyctl(f"routes:\n  - {{name: statsd, port: {port}, protocol: udp, selector: app=agent, "
                       f"namespace: {NS}}}\n")
    assert server_lines(sidecar) == {f"127.0.0.2:{port}"}
    conf = sidecar.nginx_conf()
    assert "127.0.0.66" not in conf and conf.count("stream {") == 1
