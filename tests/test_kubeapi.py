"""Checks the test API server against the real ``kubernetes`` client, so that
other tests can rely on it behaving like a real API server."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import urllib3
from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

from tests.kubeapi import KubeApiServer
from tests.support import wait_for


@pytest.fixture
def core(kube_api: KubeApiServer, tmp_path: Path) -> Iterator[client.CoreV1Api]:
    """A CoreV1Api configured the way the sidecar is: from a kubeconfig file."""
    api_client = config.new_client_from_config(
        config_file=kube_api.write_kubeconfig(tmp_path / "kubeconfig"))
    yield client.CoreV1Api(api_client)
    api_client.close()


@pytest.fixture
def labelled_pods(kube_api: KubeApiServer) -> None:
    kube_api.add_pod("web-front", labels={"app": "web", "tier": "front"}, node="node-a")
    kube_api.add_pod("web-back", labels={"app": "web", "tier": "back"}, node="node-b")
    kube_api.add_pod("db", labels={"app": "db"}, node="node-a")
    kube_api.add_pod("web-other", namespace="other", labels={"app": "web"}, node="node-a")


def names(pod_list: client.V1PodList) -> list[str]:
    return sorted(pod.metadata.name for pod in pod_list.items)


def summary(event: dict[str, Any]) -> tuple[str, str | None]:
    return event["type"], event["raw_object"]["metadata"].get("name")


def status_message(error: ApiException) -> str:
    return json.loads(error.body)["message"]


# -- lists and reads --------------------------------------------------------

@pytest.mark.parametrize("selector, expected", [
    ("", ["db", "web-back", "web-front"]),
    ("app=web", ["web-back", "web-front"]),
    ("app==web", ["web-back", "web-front"]),
    ("app!=web", ["db"]),
    ("tier in (front, back)", ["web-back", "web-front"]),
    ("tier notin (front)", ["db", "web-back"]),  # notin matches pods without the key
    ("tier!=front", ["db", "web-back"]),  # so does !=
    ("tier", ["web-back", "web-front"]),
    ("!tier", ["db"]),
    ("app=web,tier!=front", ["web-back"]),
    ("app in (web,db),!tier", ["db"]),
])
def test_list_with_label_selector(core: client.CoreV1Api, labelled_pods: None,
                                  selector: str, expected: list[str]) -> None:
    assert names(core.list_namespaced_pod("default", label_selector=selector)) == expected


@pytest.mark.parametrize("selector, expected", [
    ("spec.nodeName=node-a", ["db", "web-front"]),
    ("spec.nodeName!=node-a", ["web-back"]),
    ("metadata.name=db", ["db"]),
    ("spec.nodeName=node-a,metadata.name=db", ["db"]),
])
def test_list_with_field_selector(core: client.CoreV1Api, labelled_pods: None,
                                  selector: str, expected: list[str]) -> None:
    assert names(core.list_namespaced_pod("default", field_selector=selector)) == expected


def test_list_all_namespaces(core: client.CoreV1Api, kube_api: KubeApiServer,
                             labelled_pods: None) -> None:
    result = core.list_pod_for_all_namespaces(label_selector="app=web",
                                              field_selector="spec.nodeName=node-a")
    assert [(p.metadata.namespace, p.metadata.name) for p in result.items] == [
        ("default", "web-front"), ("other", "web-other")]
    assert result.metadata.resource_version == str(kube_api.resource_version)


@pytest.mark.parametrize("kwargs", [
    {"label_selector": "app in (web"},
    {"field_selector": "spec.unknown=x"},
])
def test_bad_selector_is_a_400(core: client.CoreV1Api, kwargs: dict[str, str]) -> None:
    with pytest.raises(ApiException) as error:
        core.list_namespaced_pod("default", **kwargs)
    assert error.value.status == 400


def test_read_pod(core: client.CoreV1Api, kube_api: KubeApiServer) -> None:
    kube_api.add_pod("web", node="node-b", ip="127.0.0.5", ready=False,
                     ports=[{"name": "metrics", "containerPort": 9090}])

    pod = core.read_namespaced_pod("web", "default")

    assert pod.spec.node_name == "node-b"
    assert pod.status.pod_ip == "127.0.0.5"
    assert [ip.ip for ip in pod.status.pod_ips] == ["127.0.0.5"]
    assert {c.type: c.status for c in pod.status.conditions}["Ready"] == "False"
    port = pod.spec.containers[0].ports[0]
    assert (port.name, port.container_port, port.protocol) == ("metrics", 9090, "TCP")
    assert pod.metadata.resource_version == str(kube_api.resource_version)
    assert pod.metadata.deletion_timestamp is None

    kube_api.update_pod("default", "web", terminating=True, ready=True)
    pod = core.read_namespaced_pod("web", "default")
    assert pod.metadata.deletion_timestamp is not None
    assert {c.type: c.status for c in pod.status.conditions}["Ready"] == "True"


def test_read_missing_pod_is_a_404(core: client.CoreV1Api) -> None:
    with pytest.raises(ApiException) as error:
        core.read_namespaced_pod("missing", "default")
    assert error.value.status == 404
    assert status_message(error.value) == 'pods "missing" not found'


def test_raw_pod_is_served_as_stored(core: client.CoreV1Api, kube_api: KubeApiServer) -> None:
    broken = {"metadata": {"name": "broken", "namespace": "default", "labels": "oops"},
              "spec": {"containers": "not-a-list"}}
    kube_api.put_raw_pod(broken)

    response = core.list_namespaced_pod("default", label_selector="app",
                                        _preload_content=False)
    assert json.loads(response.data)["items"] == []  # bad labels never match
    response = core.list_namespaced_pod("default", _preload_content=False)
    assert json.loads(response.data)["items"] == [broken]


# -- watches ----------------------------------------------------------------

def test_watch_replays_changes_made_after_the_list(core: client.CoreV1Api,
                                                   kube_api: KubeApiServer) -> None:
    kube_api.add_pod("a")
    rv = core.list_namespaced_pod("default").metadata.resource_version
    kube_api.add_pod("b")
    kube_api.update_pod("default", "a", ready=False)
    kube_api.delete_pod("default", "b")

    w = watch.Watch()
    seen = []
    for event in w.stream(core.list_namespaced_pod, "default", resource_version=rv,
                          timeout_seconds=5):
        seen.append(summary(event))
        if len(seen) == 3:
            w.stop()

    assert seen == [("ADDED", "b"), ("MODIFIED", "a"), ("DELETED", "b")]
    assert w.resource_version == str(kube_api.resource_version)


def test_watch_reports_pods_entering_and_leaving_the_selection(
        core: client.CoreV1Api, kube_api: KubeApiServer) -> None:
    kube_api.add_pod("a", labels={"app": "web"}, node="node-a")
    rv = core.list_namespaced_pod("default").metadata.resource_version
    kube_api.update_pod("default", "a", labels={"app": "db"})
    kube_api.update_pod("default", "a", labels={"app": "web"})
    kube_api.update_pod("default", "a", node="node-b")

    def watch_events(**selectors: str) -> list[dict[str, Any]]:
        w = watch.Watch()
        events = []
        for event in w.stream(core.list_namespaced_pod, "default", resource_version=rv,
                              timeout_seconds=5, **selectors):
            events.append(event)
            if len(events) == 3:
                w.stop()
        return events

    by_label = watch_events(label_selector="app=web")
    assert [summary(e) for e in by_label] == [
        ("DELETED", "a"), ("ADDED", "a"), ("MODIFIED", "a")]
    # Like a real server, the DELETED object is the last state that matched.
    assert by_label[0]["object"].metadata.labels == {"app": "web"}

    by_node = watch_events(field_selector="spec.nodeName=node-a")
    assert [summary(e) for e in by_node] == [
        ("MODIFIED", "a"), ("MODIFIED", "a"), ("DELETED", "a")]
    assert by_node[2]["object"].spec.node_name == "node-a"


def test_watch_without_resource_version_lists_then_follows(
        core: client.CoreV1Api, kube_api: KubeApiServer) -> None:
    kube_api.add_pod("a")
    w = watch.Watch()
    seen = []
    # Each change is made only after the previous event arrived, so these
    # are live events, not replayed history.
    next_change = iter([
        lambda: kube_api.add_pod("live"),
        lambda: kube_api.update_pod("default", "live", ip="127.0.0.9"),
        lambda: kube_api.delete_pod("default", "live"),
        w.stop,
    ])
    for event in w.stream(core.list_namespaced_pod, "default", timeout_seconds=5):
        seen.append(summary(event))
        next(next_change)()

    assert seen == [("ADDED", "a"), ("ADDED", "live"), ("MODIFIED", "live"),
                    ("DELETED", "live")]


def test_bookmarks_and_server_side_timeout(core: client.CoreV1Api,
                                           kube_api: KubeApiServer) -> None:
    kube_api.bookmark_interval = 0.2
    kube_api.add_pod("a")
    rv = str(kube_api.resource_version)
    w = watch.Watch()
    started = time.monotonic()

    events = list(w.stream(core.list_namespaced_pod, "default", resource_version=rv,
                           timeout_seconds=1, allow_watch_bookmarks=True))

    assert 0.9 <= time.monotonic() - started < 3
    assert len(events) >= 3
    assert {e["type"] for e in events} == {"BOOKMARK"}
    assert events[-1]["raw_object"] == {"kind": "Pod", "apiVersion": "v1",
                                        "metadata": {"resourceVersion": rv}}
    assert kube_api.count(watch=True) == 1  # a timeout_seconds watch is not retried


def test_no_bookmarks_unless_asked(core: client.CoreV1Api, kube_api: KubeApiServer) -> None:
    kube_api.bookmark_interval = 0.1
    assert list(watch.Watch().stream(core.list_namespaced_pod, "default",
                                     resource_version=str(kube_api.resource_version),
                                     timeout_seconds=1)) == []


def test_watch_from_compacted_resource_version_is_410(core: client.CoreV1Api,
                                                      kube_api: KubeApiServer) -> None:
    old_rv = core.list_namespaced_pod("default").metadata.resource_version
    kube_api.add_pod("a")
    kube_api.compact()

    # On the wire: HTTP 200 and a single ERROR event carrying the 410 Status.
    response = core.list_namespaced_pod("default", watch=True, resource_version=old_rv,
                                        _preload_content=False)
    assert response.status == 200
    [line] = response.data.decode().splitlines()
    event = json.loads(line)
    assert event["type"] == "ERROR"
    assert event["object"]["code"] == 410
    assert event["object"]["reason"] == "Expired"
    assert event["object"]["message"] == (
        f"too old resource version: {old_rv} ({kube_api.resource_version})")

    # Watch.stream turns the ERROR event into an ApiException ...
    with pytest.raises(ApiException) as error:
        list(watch.Watch().stream(core.list_namespaced_pod, "default",
                                  resource_version=old_rv, timeout_seconds=1))
    assert error.value.status == 410
    assert "Expired: too old resource version" in error.value.reason
    assert kube_api.count(watch=True) == 2

    # ... and without timeout_seconds it first retries once from the same rv.
    with pytest.raises(ApiException):
        list(watch.Watch().stream(core.list_namespaced_pod, "default",
                                  resource_version=old_rv))
    assert kube_api.count(watch=True) == 4

    # Watching from the compaction point itself is fine.
    w = watch.Watch()
    current_rv = str(kube_api.resource_version)
    kube_api.add_pod("b")
    for event in w.stream(core.list_namespaced_pod, "default",
                          resource_version=current_rv, timeout_seconds=5):
        assert summary(event) == ("ADDED", "b")
        w.stop()


# -- auth -------------------------------------------------------------------

def test_wrong_token_is_401_until_the_token_matches(core: client.CoreV1Api,
                                                    kube_api: KubeApiServer,
                                                    tmp_path: Path) -> None:
    kube_api.rotate_token("rotated")
    with pytest.raises(ApiException) as error:
        core.list_namespaced_pod("default")
    assert error.value.status == 401
    assert json.loads(error.value.body)["reason"] == "Unauthorized"

    token_file = kube_api.write_token_file(tmp_path / "token")
    kubeconfig = kube_api.write_kubeconfig(tmp_path / "rotated", token_file=token_file)
    with config.new_client_from_config(config_file=kubeconfig) as rotated_client:
        assert client.CoreV1Api(rotated_client).list_namespaced_pod("default").items == []

    kube_api.rotate_token("test-token")
    assert core.list_namespaced_pod("default").items == []


# -- faults -----------------------------------------------------------------

def test_forbidden_namespace(core: client.CoreV1Api, kube_api: KubeApiServer) -> None:
    kube_api.add_pod("dns", namespace="kube-system")
    kube_api.forbid_namespace("kube-system")

    with pytest.raises(ApiException) as error:
        core.list_namespaced_pod("kube-system")
    assert error.value.status == 403
    assert status_message(error.value) == (
        'pods is forbidden: User "system:serviceaccount:default:proxyctl" cannot list '
        'resource "pods" in API group "" in the namespace "kube-system"')

    with pytest.raises(ApiException) as error:
        list(watch.Watch().stream(core.list_namespaced_pod, "kube-system",
                                  timeout_seconds=1))
    assert error.value.status == 403
    assert "cannot watch resource" in status_message(error.value)

    with pytest.raises(ApiException) as error:
        core.read_namespaced_pod("dns", "kube-system")
    assert status_message(error.value).startswith('pods "dns" is forbidden')

    assert names(core.list_namespaced_pod("default")) == []
    kube_api.allow_namespace("kube-system")
    assert names(core.list_namespaced_pod("kube-system")) == ["dns"]


def test_fail_next(core: client.CoreV1Api, kube_api: KubeApiServer) -> None:
    kube_api.fail_next(2)
    for _ in range(2):  # the client does not retry 500s
        with pytest.raises(ApiException) as error:
            core.list_namespaced_pod("default")
        assert error.value.status == 500
        assert json.loads(error.value.body)["reason"] == "InternalError"
    core.list_namespaced_pod("default")

    kube_api.fail_next(1, status=403)
    with pytest.raises(ApiException) as error:
        core.list_pod_for_all_namespaces()
    assert status_message(error.value).endswith(
        'cannot list resource "pods" in API group "" at the cluster scope')
    assert [r.status for r in kube_api.requests] == [500, 500, 200, 403]


def test_reset_next(core: client.CoreV1Api, kube_api: KubeApiServer) -> None:
    # urllib3 retries an idempotent GET after a reset (3 times by default),
    # so a single reset is invisible to the caller ...
    kube_api.reset_next(1)
    core.list_namespaced_pod("default")
    assert [r.status for r in kube_api.requests] == [None, 200]

    # ... and only four in a row make the call fail.
    kube_api.reset_next(4)
    with pytest.raises(urllib3.exceptions.MaxRetryError) as error:
        core.list_namespaced_pod("default")
    assert isinstance(error.value.reason, urllib3.exceptions.ProtocolError)
    assert [r.status for r in kube_api.requests[2:]] == [None] * 4

    core.list_namespaced_pod("default")


def test_reset_watches_cuts_open_streams(core: client.CoreV1Api,
                                         kube_api: KubeApiServer) -> None:
    kube_api.add_pod("a")
    with pytest.raises(urllib3.exceptions.ProtocolError):
        for _ in watch.Watch().stream(core.list_namespaced_pod, "default", timeout_seconds=5):
            kube_api.reset_watches()
    assert kube_api.open_watches == 0


def test_stalled_watch_hits_the_client_read_timeout(core: client.CoreV1Api,
                                                    kube_api: KubeApiServer) -> None:
    kube_api.add_pod("a")
    kube_api.stall_watches = True
    started = time.monotonic()
    with pytest.raises(urllib3.exceptions.ReadTimeoutError):
        list(watch.Watch().stream(core.list_namespaced_pod, "default",
                                  allow_watch_bookmarks=True, _request_timeout=(2, 0.5)))
    assert time.monotonic() - started < 3
    assert [(r.is_watch, r.status) for r in kube_api.requests] == [(True, 200)]


def test_stall_freezes_open_streams_until_switched_off(core: client.CoreV1Api,
                                                       kube_api: KubeApiServer) -> None:
    kube_api.add_pod("a")
    with pytest.raises(urllib3.exceptions.ReadTimeoutError):
        for _ in watch.Watch().stream(core.list_namespaced_pod, "default",
                                      _request_timeout=(2, 0.5)):
            kube_api.stall_watches = True
            kube_api.add_pod("b")  # must not be delivered while stalled

    kube_api.stall_watches = False
    w = watch.Watch()
    for event in w.stream(core.list_namespaced_pod, "default", _request_timeout=(2, 0.5)):
        if summary(event) == ("ADDED", "b"):
            w.stop()


def test_delay(core: client.CoreV1Api, kube_api: KubeApiServer) -> None:
    kube_api.delay = 0.3
    started = time.monotonic()
    core.list_namespaced_pod("default")
    assert time.monotonic() - started >= 0.3


def test_stop_and_start(core: client.CoreV1Api, kube_api: KubeApiServer) -> None:
    kube_api.add_pod("a")
    # Stopping closes open watch streams mid-stream (no clean end of the chunked body).
    with pytest.raises(urllib3.exceptions.ProtocolError):
        for _ in watch.Watch().stream(core.list_namespaced_pod, "default", timeout_seconds=5):
            kube_api.stop()

    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", kube_api.port), timeout=1)
    with pytest.raises(urllib3.exceptions.MaxRetryError) as error:
        core.list_namespaced_pod("default")
    assert isinstance(error.value.reason, urllib3.exceptions.NewConnectionError)

    kube_api.start()
    assert names(core.list_namespaced_pod("default")) == ["a"]


def test_request_log(core: client.CoreV1Api, kube_api: KubeApiServer) -> None:
    kube_api.add_pod("a")
    core.list_namespaced_pod("default", label_selector="app=web")
    w = watch.Watch()
    for _ in w.stream(core.list_pod_for_all_namespaces, timeout_seconds=5):
        w.stop()
    wait_for(lambda: kube_api.open_watches == 0, 5)

    first, second = kube_api.requests
    assert (first.method, first.path, first.is_watch, first.status) == (
        "GET", "/api/v1/namespaces/default/pods", False, 200)
    assert first.query["labelSelector"] == "app=web"
    assert second.is_watch and second.query["watch"] == "true"
    assert kube_api.count(watch=True) == 1
    assert kube_api.count(path_contains="/namespaces/default/") == 1


def test_a_list_records_its_resource_version_and_a_malformed_one_is_a_400(core: client.CoreV1Api,
                                                                          kube_api: KubeApiServer) -> None:
    core.list_namespaced_pod("default", resource_version="0")
    core.list_namespaced_pod("default")
    with pytest.raises(ApiException) as error:
        core.list_namespaced_pod("default", resource_version="12; drop")
    assert error.value.status == 400
    assert [r.query.get("resourceVersion") for r in kube_api.requests] == ["0", None, "12; drop"]


def test_fail_next_with_retry_after(kube_api: KubeApiServer) -> None:
    kube_api.fail_next(1, 429, retry_after="3")
    # urllib3 as the kubernetes client configures it by default would wait and retry by itself
    pool = urllib3.PoolManager(retries=False)
    response = pool.request("GET", f"{kube_api.url}/api/v1/namespaces/default/pods",
                            headers={"Authorization": f"Bearer {kube_api.token}"})
    assert response.status == 429 and response.headers["Retry-After"] == "3"
    assert json.loads(response.data)["code"] == 429


def test_end_watches_at_once_and_send_raw(core: client.CoreV1Api, kube_api: KubeApiServer) -> None:
    kube_api.end_watches_at_once = True
    started = time.monotonic()
    assert list(watch.Watch().stream(core.list_namespaced_pod, "default", timeout_seconds=5)) == []
    assert time.monotonic() - started < 1
    kube_api.end_watches_at_once = False
    response = core.list_namespaced_pod("default", watch=True, timeout_seconds=5, _preload_content=False)
    wait_for(lambda: kube_api.open_watches == 1, 5)
    kube_api.send_raw(b"not JSON")
    assert response.readline().strip() == b"not JSON"
    response.close()
