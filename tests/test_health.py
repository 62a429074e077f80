"""The health server: what it answers, on IPv4 and IPv6, and what hostile or careless clients
cannot do to it (or, through it, to `proxyctl run`)."""

from __future__ import annotations

import json
import resource
import signal
import socket
import struct
import threading
import time
import urllib.error
import urllib.request
from typing import Iterator

import pytest

from proxyctl import health
from proxyctl.status import RouteStatus, Status
from tests.harness import Proxyctl
from tests.kubeapi import KubeApiServer
from tests.support import free_port, wait_for

STATUS = Status(alive_problems=[], ready_problems=["route statsd has no backend"],
                       routes=[RouteStatus("statsd", 8125, "udp", [])], reloads=3, reload_failures=1,
                       config_valid=True, watch_restarts=2, nginx_restarts=0)
IDLE_CLIENTS = 2000


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.fixture
def server(request: pytest.FixtureRequest) -> Iterator[tuple[str, health.Server]]:
    host = getattr(request, "param", "127.0.0.1")
    made = health.serve(f"{host}:0", lambda: STATUS)
    yield host, made
    made.shutdown()


@pytest.mark.parametrize("server", ["127.0.0.1", "[::1]"], indirect=True)
def test_every_path_answers_on_ipv4_and_ipv6(server: tuple[str, health.Server]) -> None:
    host, made = server
    base = f"http://{host}:{made.port}"
    assert get(f"{base}/healthz") == (200, "ok\n")
    assert get(f"{base}/readyz?verbose") == (503, "route statsd has no backend\n")
    code, text = get(f"{base}/metrics")
    assert code == 200 and "proxyctl_watch_restarts_total 2\n" in text
    assert 'proxyctl_route_backends{route="statsd"} 0\n' in text
    code, text = get(f"{base}/routes")
    assert code == 200 and json.loads(text) == {
        "routes": [{"name": "statsd", "port": 8125, "protocol": "udp", "backends": []}]}
    assert get(f"{base}/other")[0] == 404


def test_all_addresses_of_ipv6_take_ipv4_clients_too() -> None:
    made = health.serve("[::]:0", lambda: STATUS)
    try:
        assert get(f"http://[::1]:{made.port}/healthz") == (200, "ok\n")
        assert get(f"http://127.0.0.1:{made.port}/healthz") == (200, "ok\n")
    finally:
        made.shutdown()


def test_a_request_that_never_ends_its_head_is_refused(server: tuple[str, health.Server]) -> None:
    _, made = server
    with socket.create_connection(("127.0.0.1", made.port), timeout=5) as client:
        client.sendall(b"GET /" + b"a" * (health.MAX_REQUEST + 10))
        assert client.recv(100).startswith(b"HTTP/1.1 431 ")


# --- against `proxyctl run` ------------------------------------------------------------------------------


def sidecar_config(port: int) -> str:
    return f"routes:\n  - {{name: statsd, port: {port}, protocol: udp, selector: app=agent, namespace: default}}\n"


def rss_kib(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def enough_open_files(needed: int) -> None:
    """Raise this process's soft open-file limit to its hard one when `needed` files would not fit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            pytest.skip(f"the open-file limit ({hard}) is below the {needed} this test needs")
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


@pytest.fixture
def sidecar(kube_api: KubeApiServer, proxyctl) -> Proxyctl:
    kube_api.add_pod("agent", "default", {"app": "agent"}, node="node-a", ip="127.0.0.2")
    return proxyctl(sidecar_config(free_port()), env={"LOG_FORMAT": "json"})


@pytest.mark.timeout(120)
def test_thousands_of_idle_connections_neither_delay_probes_nor_grow_memory(sidecar: Proxyctl) -> None:
    enough_open_files(IDLE_CLIENTS + 200)
    assert sidecar.process is not None
    before = rss_kib(sidecar.process.pid)
    idle = []
    try:
        for _ in range(IDLE_CLIENTS):
            idle.append(socket.create_connection(("127.0.0.1", sidecar.health_port), timeout=5))
        started = time.monotonic()
        assert sidecar.get("/healthz") == (200, "ok\n")
        took = time.monotonic() - started
        grown = (rss_kib(sidecar.process.pid) - before) / 1024
    finally:
        for client in idle:
            client.close()
    print(f"/healthz took {took * 1000:.0f} ms with {IDLE_CLIENTS} idle connections; RSS grew {grown:.1f} MB")
    assert took < 1.0
    assert grown < 30


@pytest.mark.timeout(60)
def test_proxyctl_serves_health_on_an_ipv6_loopback_address(kube_api: KubeApiServer, proxyctl) -> None:
    kube_api.add_pod("agent", "default", {"app": "agent"}, node="node-a", ip="127.0.0.2")
    config = sidecar_config(free_port())
    made = proxyctl(config, start=False)
    made.configmap.write(f"health: '[::1]:{made.health_port}'\n{config}")
    made.start(wait_ready=False)
    url = f"http://[::1]:{made.health_port}"

    def ready() -> bool:
        try:
            return get(f"{url}/readyz")[0] == 200
        except OSError:
            return False

    wait_for(ready, 20, what=f"/readyz 200 on {url}")
    assert get(f"{url}/healthz") == (200, "ok\n")


def abort_mid_answer(port: int) -> None:
    """Ask, then reset the connection at once (SO_LINGER 0): the answer meets a closed socket."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.sendall(b"GET /metrics HTTP/1.1\r\nHost: proxyctl\r\n\r\n")


def assert_json_log_without_traceback(sidecar: Proxyctl) -> None:
    log = sidecar.log()
    assert "Traceback" not in log and "Fatal Python error" not in log, log
    for line in log.splitlines():
        if line.strip():
            json.loads(line)  # LOG_FORMAT=json: every line one JSON object


@pytest.mark.timeout(60)
def test_clients_that_abort_mid_answer_leave_no_traceback(sidecar: Proxyctl) -> None:
    for _ in range(300):
        abort_mid_answer(sidecar.health_port)
    assert sidecar.get("/healthz") == (200, "ok\n")
    assert_json_log_without_traceback(sidecar)


@pytest.mark.timeout(90)
def test_sigterm_with_aborting_clients_in_flight_exits_0(sidecar: Proxyctl) -> None:
    done = threading.Event()
    aborted = 0

    def clients() -> None:
        nonlocal aborted
        while not done.is_set() and aborted < 20000:
            try:
                abort_mid_answer(sidecar.health_port)
            except OSError:
                continue  # the server is going away
            aborted += 1

    threads = [threading.Thread(target=clients) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: aborted >= 50, 30, what="aborting clients under way")
        assert sidecar.stop(signal.SIGTERM, timeout=40) == 0
    finally:
        done.set()
        for thread in threads:
            thread.join()
    assert_json_log_without_traceback(sidecar)


def test_a_client_closed_to_make_room_while_it_was_sending_does_not_end_the_server(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The server is held busy while new clients queue up and the oldest one sends: then
    one round of the server accepts the new clients, closes the oldest, and meets its data."""
    monkeypatch.setattr(health, "MAX_CONNECTIONS", 2)
    busy, release = threading.Event(), threading.Event()

    def status() -> Status:
        if not busy.is_set():
            busy.set()
            release.wait(5)
        return STATUS

    made = health.serve("127.0.0.1:0", status)
    address = ("127.0.0.1", made.port)
    try:
        with socket.create_connection(address, timeout=5) as oldest, \
                socket.create_connection(address, timeout=5) as holder:
            holder.sendall(b"GET /healthz HTTP/1.1\r\n\r\n")
            assert busy.wait(5)
            with socket.create_connection(address, timeout=5), socket.create_connection(address, timeout=5):
                oldest.sendall(b"GET /healthz HTTP/1.1\r\n")
                release.set()
                assert holder.recv(100).startswith(b"HTTP/1.1 200 ")
                assert get(f"http://127.0.0.1:{made.port}/healthz") == (200, "ok\n")
    finally:
        release.set()
        made.shutdown()


def test_routes_show_the_pod_node_and_state_behind_each_backend(kube_api: KubeApiServer, proxyctl) -> None:
    kube_api.add_pod("agent-a", "default", {"app": "agent"}, node="node-a", ip="127.0.0.2")
    kube_api.add_pod("far-b", "default", {"app": "far"}, node="node-b", ip="127.0.0.4")
    port, far_port = free_port(), free_port()
    sidecar = proxyctl(sidecar_config(port) + f"  - {{name: traces, port: {far_port}, protocol: udp, "
                                              f"selector: app=far, namespace: default, whenNoLocalPod: anyNode}}\n")

    def backends() -> dict[str, list[dict[str, object]]]:
        return {r["name"]: r["backends"] for r in json.loads(sidecar.get("/routes")[1])["routes"]}

    assert backends() == {
        "statsd": [{"address": f"127.0.0.2:{port}", "pod": "agent-a", "node": "node-a", "fallback": False,
                    "terminating": False}],
        "traces": [{"address": f"127.0.0.4:{far_port}", "pod": "far-b", "node": "node-b", "fallback": True,
                    "terminating": False}],
    }
    reloads = sidecar.metric("proxyctl_reloads_total")
    kube_api.update_pod("default", "agent-a", terminating=True)  # deleted, still Ready while it drains
    wait_for(lambda: backends()["statsd"][0]["terminating"], 10, what="the pod shown terminating")
    assert backends()["statsd"] == [{"address": f"127.0.0.2:{port}", "pod": "agent-a", "node": "node-a",
                                     "fallback": False, "terminating": True}]
    assert sidecar.metric("proxyctl_reloads_total") == reloads  # the same address: nginx is not reloaded
