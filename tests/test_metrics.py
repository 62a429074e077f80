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
from proxyctl.nginx import upstream_failure
from proxyctl.status import RouteStatus, Status
from proxyctl.traffic import RouteTraffic
from tests.harness import Proxyctl
from tests.kubeapi import KubeApiServer
from tests.support import free_port, tcp_exchange, wait_for

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


def test_promtool_finds_nothing_to_say(kube_api: KubeApiServer, proxyctl, udp_sinks, tcp_echoes,
                                       promtool: str) -> None:
    port = free_port()
    kube_api.add_pod("agent", NS, AGENT, node="node-a", ip="127.0.0.2")
    udp_sinks("127.0.0.2", port)
    tcp_echoes("127.0.0.2", port)
    sidecar = proxyctl(routes(port))
    kube_api.add_pod("agent-2", NS, AGENT, node="node-a", ip="127.0.0.3")
    wait_for(lambda: sidecar.metric("proxyctl_last_reload_duration_seconds") is not None, 5, what="a reload")
    result = subprocess.run([promtool, "check", "metrics"], input=sidecar.get("/metrics")[1],
                            capture_output=True, text=True)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_label_values_are_escaped_as_the_text_format_wants() -> None:
    odd = 'a"b\\c\nd'
    status = Status([], [], [RouteStatus(odd, 1, "udp", ["127.0.0.2:1"])], 0, 0, True, 0, 0,
                           {odd: 1.5}, frozenset({odd}))
    traffic = [RouteTraffic(odd, "udp", 0, 0, 0, upstream_failures={"timeout": 2})]
    families = {f.name: f for f in text_string_to_metric_families(exposition(status, traffic))}
    for name in ("proxyctl_route_backends", "proxyctl_route_on_fallback", "proxyctl_watch_last_event_age_seconds",
                 "proxyctl_route_no_backend_datagrams", "proxyctl_route_sessions"):
        (sample, *_) = families[name].samples
        assert sample.labels == {"route": odd}
    failures = {s.labels["reason"]: s.value for s in families["proxyctl_route_upstream_failures"].samples
                if s.name.endswith("_total")}
    assert failures == {"connect_failed": 0, "timeout": 2, "no_live_upstreams": 0, "out_of_connections": 0}
    assert {s.labels["route"] for s in families["proxyctl_route_upstream_failures"].samples} == {odd}


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


def queued(port: int) -> int:
    """Bytes waiting in the receive queues of the sockets listening on `port` on 127.0.0.1."""
    rows = (line.split() for line in Path("/proc/net/udp").read_text().splitlines()[1:])
    return sum(int(fields[4].split(":")[1], 16) for fields in rows
               if fields[1] == f"{LOOPBACK_HEX['/proc/net/udp']}:{port:04X}")


def send_unanswered(port: int, count: int) -> None:
    """`count` datagrams from one connected socket, in batches nginx reads before the next (none may
    overflow its socket); the client gets no answer and no error back."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.connect(("127.0.0.1", port))
        for start in range(0, count, 500):
            for _ in range(min(500, count - start)):
                client.send(b"page.views:1|c")
            wait_for(lambda: queued(port) == 0, 5, what="nginx read the batch")
        client.settimeout(0.2)
        with pytest.raises(socket.timeout):  # not an empty datagram, not ECONNREFUSED from an ICMP error
            client.recv(100)


def test_datagrams_sent_while_a_route_has_no_backend_are_counted_exactly_across_nginx_restarts(
        kube_api: KubeApiServer, proxyctl, udp_sinks, tmp_path: Path) -> None:
    port = free_port()
    sink = udp_sinks("127.0.0.2", port)
    sidecar = proxyctl(routes(port), start=False).start(wait_ready=False)  # not ready: no backend

    def dropped() -> float | None:
        return sidecar.metric("proxyctl_route_no_backend_datagrams_total", '{route="statsd"}')

    def without_backend() -> float:
        value = sidecar.metric("proxyctl_route_no_backend_seconds_total", '{route="statsd"}')
        assert value is not None
        return value

    wait_for(lambda: dropped() == 0, 20, what="the route served without a backend")
    first = 5_000  # more than a block of the tally file holds: proxyctl must free blocks as it grows
    send_unanswered(port, first)
    wait_for(lambda: dropped() == first, 5, what=f"{first} datagrams counted")
    assert kernel_drops(port) == 0  # every datagram reached nginx: the count is nginx's alone

    master = sidecar.nginx_pid("statsd")
    os.kill(master, signal.SIGKILL)
    wait_for(lambda: sidecar.nginx_pid("statsd") != master and "nginx started again" in sidecar.log(), 15,
             what="the route's nginx started again")
    assert dropped() == first
    send_unanswered(port, 7)
    wait_for(lambda: dropped() == first + 7, 5, what="datagrams after the restart counted")
    assert kernel_drops(port) == 0

    tally = sidecar.state_dir / "routes" / "statsd" / "statsd.no-backend"
    wait_for(lambda: tally.stat().st_blocks * 512 <= tally.stat().st_blksize, 15, interval=0.2,
             what="the tally file's blocks freed")
    assert tally.stat().st_size == first + 7

    waited = without_backend()
    assert waited > 0
    kube_api.add_pod("agent", NS, AGENT, node="node-a", ip="127.0.0.2")
    wait_for(lambda: sidecar.get("/readyz")[0] == 200, 10, what="ready with a backend")
    # The old worker wrote what it held when it exited: still exactly what was sent.
    assert dropped() == first + 7
    sent = 0

    def delivered() -> bool:  # the old worker may take datagrams ~100 ms longer: those are dropped, and counted
        nonlocal sent
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.sendto(b"delivered:1|c", ("127.0.0.1", port))
        sent += 1
        return bool(sink.received)

    wait_for(delivered, 5, interval=0.01, what="a datagram at the backend")
    wait_for(lambda: sidecar.metric("proxyctl_route_sessions_total", '{route="statsd"}') == len(sink.received),
             5, what="the forwarded datagrams counted")
    wait_for(lambda: dropped() + len(sink.received) == first + 7 + sent, 5,  # the old worker writes as it exits
             what="each datagram forwarded or counted as dropped")
    stopped = without_backend()
    assert stopped >= waited and without_backend() == stopped  # it stopped growing with a backend

    log = sidecar.log()
    assert log.count("route statsd has no backend: nginx drops the datagrams") == 1
    assert log.count("route statsd has a backend again") == 1
    assert log.count("route forward has no backend: nothing listens on port") == 1


def test_a_connect_refused_by_a_backend_is_an_upstream_failure_of_that_route_only(
        kube_api: KubeApiServer, proxyctl, tcp_echoes) -> None:
    refusing, working = free_port(), free_port()
    tcp_echoes("127.0.0.2", working)
    kube_api.add_pod("closed", NS, {"app": "closed"}, node="node-a", ip="127.0.0.3")  # nothing listens there
    kube_api.add_pod("agent", NS, AGENT, node="node-a", ip="127.0.0.2")
    sidecar = proxyctl(f"routes:\n  - {{name: logs, port: {refusing}, protocol: tcp, selector: app=closed, "
                       f"namespace: {NS}}}\n"
                       f"  - {{name: forward, port: {working}, protocol: tcp, selector: app=agent, namespace: {NS}}}\n")

    def failures() -> dict[tuple[str, str], float]:
        families = {f.name: f for f in text_string_to_metric_families(sidecar.get("/metrics")[1])}
        return {(s.labels["route"], s.labels["reason"]): s.value
                for s in families["proxyctl_route_upstream_failures"].samples}

    reasons = {"connect_failed", "timeout", "no_live_upstreams", "out_of_connections"}
    assert failures() == {(route, reason): 0 for route in ("logs", "forward") for reason in reasons}
    assert tcp_exchange(working, b"ping") == b"127.0.0.2:ping"
    for attempt in range(1, 4):
        assert tcp_exchange(refusing, b"lost") == b""  # nginx accepted, then closed: its backend refused
        wait_for(lambda: failures()[("logs", "connect_failed")] == attempt, 5, what=f"failure {attempt} counted")
    assert {key: value for key, value in failures().items() if value} == {("logs", "connect_failed"): 3}
    wait_for(lambda: sidecar.metric("proxyctl_route_sessions_total", '{route="logs"}') == 3, 5,
             what="the failed sessions counted as sessions too")
    assert sidecar.metric("proxyctl_route_sessions_total", '{route="forward"}') == 1

    # nginx logged each; proxyctl passes the first on and holds back the rest for a minute.
    shown = [line for line in sidecar.log().splitlines() if "connect() failed (111: Connection refused)" in line]
    assert len(shown) == 1 and "ERROR proxyctl.nginx: nginx logs: " in shown[0], shown
    assert "shown at most once every 60s" in shown[0]


def test_nginx_error_lines_are_read_as_upstream_failures_by_reason() -> None:
    lines = {  # as nginx 1.22 logs them (the first two seen in these tests; the rest from its source)
        '2026/12/03 00:12:33 [error] 14771#14771: *14 connect() failed (111: Connection refused) while connecting '
        'to upstream, client: 127.0.0.1, server: 127.0.0.1:47314, upstream: "127.0.0.9:47313"': "connect_failed",
        "2026/12/03 00:12:33 [error] 7#7: *3 connect() to 10.0.0.9:24224 failed (113: No route to host) while "
        "connecting to upstream": "connect_failed",
        "2026/12/03 00:12:33 [error] 7#7: *3 upstream timed out (110: Connection timed out) while connecting to "
        "upstream": "timeout",
        "2026/12/03 00:12:33 [error] 7#7: *9 no live upstreams while connecting to upstream": "no_live_upstreams",
        "2026/12/03 00:12:33 [alert] 7#7: 1024 worker_connections are not enough": "out_of_connections",
        "2026/12/03 00:12:33 [alert] 7#7: *5 socket() failed (24: Too many open files) while connecting to "
        "upstream": "out_of_connections",
        "2026/12/03 00:12:33 [warn] 7#7: 1024 worker_connections are not enough, reusing connections": None,
        "2026/12/03 00:12:33 [info] 7#7: *2 udp timed out, packets from/to client:1/0": None,
        "2026/12/03 00:12:33 [info] 7#7: *2 connection timed out (110: Connection timed out)": None,
        "2026/12/03 00:12:33 [notice] 7#7: start worker process 9": None,
    }
    assert {line: upstream_failure(line) for line in lines} == lines


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
