"""/metrics of a real `proxyctl run`: what the kernel counted per route, discovery and reload
gauges, read with Prometheus' own parser and promtool."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxyctl.metrics import exposition
from proxyctl.status import RouteStatus, Status
from tests.harness import Proxyctl
from tests.kubeapi import KubeApiServer
from tests.support import free_port, wait_for

NS = "monitoring"
AGENT = {"app": "agent"}
BURST, DATAGRAM = 400, 60_000  # 24 MB: three times what the route's 8 MB buffer holds (rmem_max ≥ 4 MiB)
# The loopbacks as the kernel prints them in /proc/net/udp{,6} on a little-endian machine.
LOOPBACK_HEX = {"/proc/net/udp": "0100007F", "/proc/net/udp6": "00000000000000000000000001000000"}


def routes(port: int, far_port: int | None = None) -> str:
    text = (f"routes:\n  - {{name: statsd, port: {port}, protocol: udp, selector: app=agent, namespace: {NS}}}\n"
            f"  - {{name: forward, port: {port}, protocol: tcp, selector: app=agent, namespace: {NS}}}\n")
    if far_port is not None:
        text += (f"  - {{name: traces, port: {far_port}, protocol: udp, selector: app=far, namespace: {NS},"
                 f" whenNoLocalPod: anyNode}}\n")
    return text


def kernel_drops(port: int) -> int:
    """What the kernel counted for the sockets listening on `port` on the loopbacks, read here
    independently of proxyctl."""
    total = 0
    for path, host in LOOPBACK_HEX.items():
        if Path(path).exists():
            for fields in (line.split() for line in Path(path).read_text().splitlines()[1:]):
                if fields[1] == f"{host}:{port:04X}":
                    total += int(fields[12])
    return total


def worker(master: int) -> int:
    (pid,) = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    return int(pid)


def overflow(sidecar: Proxyctl, port: int) -> int:
    """Send more than the route's socket holds while its nginx worker is stopped; returns how many
    datagrams the kernel dropped meanwhile."""
    before = kernel_drops(port)
    stopped = worker(sidecar.nginx_pid("statsd"))
    os.kill(stopped, signal.SIGSTOP)
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            for _ in range(BURST):
                client.sendto(b"x" * DATAGRAM, ("127.0.0.1", port))
    finally:
        os.kill(stopped, signal.SIGCONT)
    return kernel_drops(port) - before


def test_drops_at_a_full_socket_are_counted_as_the_kernel_counts_them_and_survive_an_nginx_restart(
        kube_api: KubeApiServer, proxyctl, udp_sinks) -> None:
    port = free_port()
    udp_sinks("127.0.0.2", port)
    kube_api.add_pod("agent", NS, AGENT, node="node-a", ip="127.0.0.2")
    sidecar = proxyctl(routes(port))

    def drops() -> float | None:
        return sidecar.metric("proxyctl_route_udp_receive_drops_total", '{route="statsd"}')

    assert drops() == 0
    counted = overflow(sidecar, port)
    assert counted > 0
    assert drops() == counted
    print(f"\n{counted} of {BURST} datagrams dropped at the full socket, and counted")

    master = sidecar.nginx_pid("statsd")
    os.kill(master, signal.SIGKILL)  # proxyctl starts it again, on new sockets that count from 0
    wait_for(lambda: sidecar.nginx_pid("statsd") != master and sidecar.get("/readyz")[0] == 200, 10,
             what="the route's nginx started again")
    assert kernel_drops(port) == 0
    assert drops() == counted
    more = overflow(sidecar, port)
    assert more > 0
    assert drops() == counted + more
    said = re.findall(r"route statsd: the kernel dropped (\d+) datagrams since the last scrape", sidecar.log())
    assert said == [str(counted), str(more)]  # a line per spell of drops, with the kernel's count


def test_tcp_connections_fallback_and_reloads_read_with_prometheus_own_parser(
        kube_api: KubeApiServer, proxyctl, udp_sinks, tcp_echoes) -> None:
    port, far_port = free_port(), free_port()
    udp_sinks("127.0.0.2", port)
    tcp_echoes("127.0.0.2", port)
    udp_sinks("127.0.0.4", far_port)
    kube_api.add_pod("agent", NS, AGENT, node="node-a", ip="127.0.0.2")
    kube_api.add_pod("far", NS, {"app": "far"}, node="node-b", ip="127.0.0.4")
    sidecar = proxyctl(routes(port, far_port))

    def connections() -> float | None:
        return sidecar.metric("proxyctl_route_tcp_connections", '{route="forward"}')

    assert connections() == 0
    clients = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(3)]
    try:
        for client in clients:
            client.sendall(b"ping")
            assert client.recv(100) == b"127.0.0.2:ping"
        assert connections() == 3
    finally:
        for client in clients:
            client.close()
    wait_for(lambda: connections() == 0, 5, what="closed connections no longer counted")

    before_reload = time.time()
    kube_api.add_pod("agent-2", NS, AGENT, node="node-a", ip="127.0.0.3")
    wait_for(lambda: sidecar.metric("proxyctl_route_backends", '{route="statsd"}') == 2, 5, what="a reload")
    families = {f.name: f for f in text_string_to_metric_families(sidecar.get("/metrics")[1])}
    values = {name: {s.labels.get("route"): s.value for s in f.samples} for name, f in families.items()}
    types = {name: f.type for name, f in families.items()}

    assert types["proxyctl_route_udp_receive_drops"] == "counter"  # the parser names a counter without _total
    assert values["proxyctl_route_udp_receive_drops"] == {"statsd": 0, "traces": 0}
    assert values["proxyctl_route_tcp_connections"] == {"forward": 0}
    assert values["proxyctl_route_on_fallback"] == {"statsd": 0, "forward": 0, "traces": 1}
    assert set(values["proxyctl_watch_last_event_age_seconds"]) == {"statsd", "forward", "traces"}
    assert all(0 <= age < 30 for age in values["proxyctl_watch_last_event_age_seconds"].values())
    assert 0 < values["proxyctl_last_reload_duration_seconds"][None] < 3
    assert before_reload <= values["proxyctl_last_reload_success_timestamp_seconds"][None] <= time.time()

    buffers = values["proxyctl_route_udp_receive_buffer_bytes"]
    if shutil.which("ss"):  # the kernel's own word on what each listening socket got
        shown = subprocess.run(["ss", "-Hnuam", f"sport = :{port}"], capture_output=True, text=True).stdout
        granted = {int(rb) for rb in re.findall(r"\brb(\d+)", shown)}
        assert granted == {buffers["statsd"]}, shown
    assert buffers["statsd"] >= 212992  # at least the kernel's default


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (Debian package prometheus)")
def test_promtool_finds_nothing_to_say(kube_api: KubeApiServer, proxyctl, udp_sinks, tcp_echoes) -> None:
    port = free_port()
    kube_api.add_pod("agent", NS, AGENT, node="node-a", ip="127.0.0.2")
    udp_sinks("127.0.0.2", port)
    tcp_echoes("127.0.0.2", port)
    sidecar = proxyctl(routes(port))
    kube_api.add_pod("agent-2", NS, AGENT, node="node-a", ip="127.0.0.3")
    wait_for(lambda: sidecar.metric("proxyctl_last_reload_duration_seconds") is not None, 5, what="a reload")
    result = subprocess.run(["promtool", "check", "metrics"], input=sidecar.get("/metrics")[1],
                            capture_output=True, text=True)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_label_values_are_escaped_as_the_text_format_wants() -> None:
    odd = 'a"b\\c\nd'
    status = Status([], [], [RouteStatus(odd, 1, "udp", ["127.0.0.2:1"])], 0, 0, True, 0, 0,
                           {odd: 1.5}, frozenset({odd}))
    families = {f.name: f for f in text_string_to_metric_families(exposition(status))}
    for name in ("proxyctl_route_backends", "proxyctl_route_on_fallback", "proxyctl_watch_last_event_age_seconds"):
        (sample,) = families[name].samples
        assert sample.labels == {"route": odd}


def test_a_stalled_api_shows_as_a_growing_watch_age_while_healthz_stays_200(
        kube_api: KubeApiServer, proxyctl, udp_sinks, tcp_echoes) -> None:
    """Each silent watch is replaced after 1.5 × watchTimeout, so /healthz never sees one silent for 2 ×;
    the age says how long the pods have not been heard of."""
    watch_timeout = 1.0
    port = free_port()
    udp_sinks("127.0.0.2", port)
    tcp_echoes("127.0.0.2", port)
    kube_api.add_pod("agent", NS, AGENT, node="node-a", ip="127.0.0.2")
    sidecar = proxyctl(f"watchTimeout: {watch_timeout:g}s\n" + routes(port))

    def age() -> float:
        value = sidecar.metric("proxyctl_watch_last_event_age_seconds", '{route="statsd"}')
        assert value is not None
        return value

    assert age() < watch_timeout
    watches = kube_api.count(watch=True)
    kube_api.stall_watches = True
    try:
        wait_for(lambda: age() > 2.5 * watch_timeout, 10, interval=0.1, what="the watch age past 2.5 × watchTimeout")
        assert sidecar.get("/healthz")[0] == 200
        assert kube_api.count(watch=True) > watches  # replaced meanwhile: a connection answered is not news
        assert kube_requests(sidecar)["watch", "timeout"] >= 1  # each replaced for its read timeout
    finally:
        kube_api.stall_watches = False
    kube_api.add_pod("agent-2", NS, AGENT, node="node-a", ip="127.0.0.3")
    wait_for(lambda: age() < watch_timeout, 10, interval=0.1, what="the age back under watchTimeout")
    again = r"INFO .*routes statsd, forward: the API is heard from again, after ([\d.]+)s of silence"
    heard_again = wait_for(lambda: re.findall(again, sidecar.log()), 5, what="the end of the silence said")
    silent = re.findall(r"WARNING .*routes statsd, forward: no word from the API for ([\d.]+)s, more than "
                        r"watchTimeout \(1s\), on pods 'app=agent' in monitoring on node node-a;", sidecar.log())
    assert len(silent) == 1 and len(heard_again) == 1  # once per spell, however long it lasts
    assert watch_timeout < float(silent[0]) < 2 * watch_timeout and float(heard_again[0]) > 2.5 * watch_timeout


def kube_requests(sidecar: Proxyctl) -> dict[tuple[str, str], float]:
    """proxyctl_kube_requests_total by (verb, outcome), read with Prometheus' parser."""
    families = {f.name: f for f in text_string_to_metric_families(sidecar.get("/metrics")[1])}
    return {(s.labels["verb"], s.labels["outcome"]): s.value for s in families["proxyctl_kube_requests"].samples
            if s.name == "proxyctl_kube_requests_total"}


def test_list_and_watch_requests_by_outcome_are_what_the_api_server_saw(
        kube_api: KubeApiServer, proxyctl) -> None:
    """Each fault ends the one open watch (a cut: transport_error), then hits the request that
    resumes it; the counts survive the watch being closed by a config change."""
    kube_api.add_pod("agent", NS, AGENT, node="node-a", ip="127.0.0.2")
    port = free_port()
    sidecar = proxyctl(routes(port))  # two routes, one selector: one watch
    cuts = 0

    def settled() -> None:
        """Once the one watch is open again, a fault set before has been met by the request before it."""
        wait_for(lambda: kube_api.open_watches == 1, 15, what="the one watch open")

    def cut() -> None:
        nonlocal cuts
        kube_api.reset_watches()
        cuts += 1
        kube_api.update_pod(NS, "agent", ready=True)  # news for the next watch, which starts the backoff afresh

    for status in (429, 500, 401, 403, 404, 410):  # 410 as an HTTP status: a relist follows
        settled()
        kube_api.fail_next(1, status, retry_after="0" if status == 429 else None)
        cut()
    settled()
    kube_api.reset_next(1)  # the resumed watch's connection is reset
    cut()
    # Watches the server ends at once, with nothing new, fail as transport errors; the last one stays open.
    settled()
    before = kube_api.count(watch=True)
    kube_api.end_watches_at_once = True
    cut()
    wait_for(lambda: kube_api.count(watch=True) >= before + 2, 10, what="watches ended at once")
    kube_api.end_watches_at_once = False
    settled()
    ended_at_once = kube_api.count(watch=True) - before - 1
    # The watch's version compacted away while it heard nothing: 410 as an ERROR event of a 200 stream.
    kube_api.stall_watches = True
    kube_api.add_pod("web", "default", {"app": "web"})
    kube_api.compact()
    compacted, compacted_at = kube_api.resource_version, time.time()
    cut()
    kube_api.stall_watches = False
    wait_for(lambda: kube_api.count(watch=False) == 3, 20, what="the relist after the ERROR event")
    settled()
    # A new selector closes that watch (proxyctl ends it: ok) and opens another.
    sidecar.configmap.write(sidecar.with_health(routes(port).replace("app=agent", "app in (agent)")))

    def new_watch_alone() -> bool:
        new = [r for r in kube_api.requests if r.is_watch and r.query.get("labelSelector") == "app in (agent)"]
        return len(new) == 1 and kube_api.open_watches == 1

    wait_for(new_watch_alone, 10, what="the new watch, the old one closed")

    outcomes = {None: "transport_error", 200: "ok", 401: "unauthorized", 403: "forbidden", 404: "client_error",
                410: "gone", 429: "throttled", 500: "server_error"}
    seen: Counter[tuple[str, str]] = Counter()
    for request in kube_api.requests:
        result = outcomes[request.status]
        if request.is_watch and request.status == 200 and request.time > compacted_at \
                and int(request.query["resourceVersion"]) < compacted:
            result = "gone"
        seen["watch" if request.is_watch else "list", result] += 1
    seen["watch", "ok"] -= cuts + ended_at_once + 1  # the open one is not counted yet
    seen["watch", "transport_error"] += cuts + ended_at_once
    expected = {key: value for key, value in seen.items() if value}
    assert expected[("watch", "gone")] == 2 and expected[("watch", "ok")] == 1

    counted: list[dict[tuple[str, str], float]] = []
    try:  # the closed watch is counted once its thread has seen it end
        wait_for(lambda: counted.append({k: v for k, v in kube_requests(sidecar).items() if v}) or
                 counted[-1] == expected, 5, what="the counts the API server saw")
    except AssertionError:
        assert counted[-1] == expected


def pss_bytes(pid: int) -> int:
    """PSS as the kernel reports it, read here independently of proxyctl."""
    (line,) = [line for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines() if line.startswith("Pss:")]
    return int(line.split()[1]) * 1024


def test_memory_and_draining_workers(kube_api: KubeApiServer, proxyctl, tcp_echoes) -> None:
    port = free_port()
    tcp_echoes("127.0.0.2", port)
    tcp_echoes("127.0.0.3", port)
    kube_api.add_pod("agent", NS, AGENT, node="node-a", ip="127.0.0.2")
    sidecar = proxyctl(routes(port))
    assert sidecar.process is not None

    def draining() -> float | None:
        return sidecar.metric("proxyctl_route_draining_workers", '{route="forward"}')

    assert draining() == 0
    with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
        client.sendall(b"ping")
        assert client.recv(100) == b"127.0.0.2:ping"
        kube_api.update_pod(NS, "agent", ip="127.0.0.3")  # a reload: the old worker keeps this connection
        wait_for(lambda: draining() == 1, 10, what="the old worker draining")
        wait_for(lambda: sidecar.metric("proxyctl_route_draining_workers", '{route="statsd"}') == 0, 10,
                 what="the UDP route's old worker, with nothing to drain, gone")
        nginx = [pid for master in sidecar.nginx_pids()
                 for pid in [master, *map(int, Path(f"/proc/{master}/task/{master}/children").read_text().split())]]
        assert len(nginx) == 5  # two masters and workers, and the old worker
        shown = {p: sidecar.metric("proxyctl_memory_pss_bytes", f'{{process="{p}"}}') for p in ("proxyctl", "nginx")}
        measured = {"proxyctl": pss_bytes(sidecar.process.pid), "nginx": sum(map(pss_bytes, nginx))}
    print(f"\nPSS shown {shown}, measured {measured}")
    for process, size in measured.items():
        assert shown[process] == pytest.approx(size, rel=0.05)  # read a moment apart
    assert 5 << 20 < measured["proxyctl"] < 200 << 20 and 0 < measured["nginx"] < 100 << 20
    wait_for(lambda: draining() == 0, 10, what="the old worker gone once its connection closed")
