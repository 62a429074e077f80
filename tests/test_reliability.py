"""Reliability of `proxyctl run`: traffic keeps flowing through API faults, reloads under load and churn.

Every test runs the real process against the test API server with real nginx and real
backends on 127.0.0.x, while a steady UDP stream and TCP request/response traffic go
through it; every datagram and request is counted. `python -m pytest -s -m slow` prints
a table of what the traffic saw under each fault.
"""

from __future__ import annotations

import json
import os
import random
import re
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import pytest

from proxyctl.watch import BACKOFF_MAX
from tests import kubeapi
from tests.harness import Proxyctl
from tests.kubeapi import KubeApiServer
from tests.support import UdpSink, free_port, wait_for

pytestmark = pytest.mark.slow

NS = "kube-system"
AGENT = {"app": "agent"}
OLD, NEW = "127.0.0.2", "127.0.0.3"  # the backend that serves throughout, and the one a fault hides
WATCH_TIMEOUT = 2  # seconds; a watch read times out after 1.5 × this, /healthz fails after 2 ×
OUTAGE = 30.0  # seconds the API server is down: what the issue asks for
SOAK = 60.0  # seconds of pod churn
STEPS = 100  # changes (each a reload) in the reload-under-load test


def config(port: int, extra: str = "") -> str:
    """A UDP (statsd-like) and a TCP (fluentd-like) route on one port to the same node agent."""
    return (f"watchTimeout: {WATCH_TIMEOUT}s\nroutes:\n"
            f"  - {{name: statsd, port: {port}, protocol: udp, selector: app=agent, namespace: {NS}}}\n"
            f"  - {{name: forward, port: {port}, protocol: tcp, selector: app=agent, namespace: {NS}}}\n{extra}")


# --- traffic ---------------------------------------------------------------------------------


@dataclass
class Report:
    """What the clients saw; `udp_longest_gap` is the longest run of consecutive lost datagrams, in seconds."""

    udp_sent: int = 0
    udp_delivered: int = 0
    udp_longest_gap: float = 0.0
    tcp_sent: int = 0  # requests, each on a fresh connection or on a held one
    tcp_ok: int = 0
    fresh: int = 0  # fresh connections opened
    held_opened: int = 0
    tcp_failures: list[str] = field(default_factory=list)
    health_failures: list[str] = field(default_factory=list)  # /healthz answers other than 200
    ready_failures: list[str] = field(default_factory=list)  # /readyz answers other than 200

    @property
    def udp_loss(self) -> float:
        return 1 - self.udp_delivered / self.udp_sent if self.udp_sent else 0.0


class Traffic:
    """Steady traffic through proxyctl, bounded in time, with every datagram and request accounted for.

    UDP: numbered datagrams at `udp_rate`, delivered = distinct numbers any backend got.
    TCP: a fresh connection per request at `tcp_rate`, plus `held` connections that talk
    every 20 ms and are replaced after `held_life` seconds (well inside nginx's 30 s
    worker_shutdown_timeout, which would otherwise close them on an old worker).
    /healthz and /readyz are probed every 100 ms.
    """

    def __init__(self, sidecar: Proxyctl, port: int, sinks: list[UdpSink], udp_rate: float = 200,
                 tcp_rate: float = 20, held: int = 0, held_life: float = 5.0, limit: float = 150.0) -> None:
        self.sidecar, self.port, self.sinks = sidecar, port, sinks
        self.udp_rate, self.tcp_rate, self.held_life = udp_rate, tcp_rate, held_life
        self.tag = f"t{random.randrange(1 << 30)}"
        self.report = Report()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._deadline = time.monotonic() + limit
        self._threads = [threading.Thread(target=self._udp, daemon=True),
                         threading.Thread(target=self._tcp, daemon=True),
                         threading.Thread(target=self._probe, daemon=True)]
        self._threads += [threading.Thread(target=self._hold, args=(i,), daemon=True) for i in range(held)]

    def __enter__(self) -> Traffic:
        for thread in self._threads:
            thread.start()
        wait_for(lambda: self.delivered() >= 20, 10, what="traffic flowing before the test starts")
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(15)

    def _running(self) -> bool:
        return not self._stop.is_set() and time.monotonic() < self._deadline

    def _paced(self, rate: float) -> Iterator[int]:
        """Sequence numbers on a fixed schedule (not drifting with how long each send takes)."""
        start, n = time.monotonic(), 0
        while self._running():
            if self._stop.wait(max(0.0, start + n / rate - time.monotonic())):
                return
            yield n
            n += 1

    def _udp(self) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            for n in self._paced(self.udp_rate):
                client.sendto(f"{self.tag}:{n}|c".encode(), ("127.0.0.1", self.port))
                self.report.udp_sent = n + 1

    def _tcp(self) -> None:
        for n in self._paced(self.tcp_rate):
            payload = f"{self.tag}-fresh-{n}".encode()
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=5) as conn:
                    error = exchange(conn, payload)
            except OSError as exc:
                error = f"connect: {exc!r}"
            with self._lock:
                self.report.fresh += 1
            self._count(error, f"fresh {n}")

    def _hold(self, index: int) -> None:
        while self._running():
            life_ends = time.monotonic() + self.held_life * random.uniform(0.5, 1.0)
            try:
                conn = socket.create_connection(("127.0.0.1", self.port), timeout=5)
            except OSError as exc:
                self._count(f"connect: {exc!r}", f"held {index}")
                self._stop.wait(0.02)
                continue
            with self._lock:
                self.report.held_opened += 1
            with conn:
                n = 0
                while self._running() and time.monotonic() < life_ends:
                    error = exchange(conn, f"{self.tag}-held{index}-{n}".encode())
                    self._count(error, f"held {index} request {n}")
                    if error:
                        break
                    n += 1
                    self._stop.wait(0.02)

    def _count(self, error: str | None, what: str) -> None:
        with self._lock:
            self.report.tcp_sent += 1
            if error:
                self.report.tcp_failures.append(f"{what}: {error}")
            else:
                self.report.tcp_ok += 1

    def _probe(self) -> None:
        while self._running():
            for path, failures in (("/healthz", self.report.health_failures), ("/readyz", self.report.ready_failures)):
                code, body = self.sidecar.get(path)
                if code != 200:
                    failures.append(f"{code} {body.strip()}")
            self._stop.wait(0.1)

    def delivered_numbers(self) -> set[int]:
        prefix = f"{self.tag}:".encode()
        return {int(d[len(prefix):].split(b"|")[0]) for sink in self.sinks for d in list(sink.received)
                if d.startswith(prefix)}

    def delivered(self) -> int:
        return len(self.delivered_numbers())

    def finish(self) -> Report:
        """Stop sending, give datagrams in flight a moment to land, and account for each."""
        self.stop()
        sent = self.report.udp_sent
        deadline = time.monotonic() + 2
        while self.delivered() < sent and time.monotonic() < deadline:
            time.sleep(0.02)
        delivered = self.delivered_numbers()
        longest = run = 0
        for n in range(sent):
            run = 0 if n in delivered else run + 1
            longest = max(longest, run)
        self.report.udp_delivered = len(delivered)
        self.report.udp_longest_gap = longest / self.udp_rate
        return self.report


def exchange(conn: socket.socket, payload: bytes) -> str | None:
    """One request on `conn`; None when a backend echoed it whole, else what went wrong."""
    try:
        conn.sendall(payload)
        reply = b""
        while not reply.endswith(b":" + payload):
            chunk = conn.recv(65536)
            if not chunk:
                return f"closed by the proxy after {reply!r}"
            reply += chunk
    except OSError as exc:
        return repr(exc)
    if not reply.startswith(b"127.0.0."):
        return f"unexpected reply {reply!r}"
    return None


# --- what the sidecar process shows ----------------------------------------------------------------

_STAMP = re.compile(r"^\S+ \S+ ")


def eventually(sidecar: Proxyctl, predicate: Callable[[], object], timeout: float, what: str) -> None:
    """`wait_for`, and when it times out, the sidecar's log as it is then (not as it was before waiting)."""
    try:
        wait_for(predicate, timeout, what=what)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\nproxyctl log:\n{sidecar.log()}") from None


def warnings(sidecar: Proxyctl) -> Counter[str]:
    """WARNING and ERROR lines of the log, without timestamps, counted."""
    return Counter(_STAMP.sub("", line) for line in sidecar.log().splitlines()
                   if " WARNING " in line or " ERROR " in line)


def backends(sidecar: Proxyctl) -> set[str]:
    code, body = sidecar.get("/routes")
    return {b["address"] for route in (json.loads(body)["routes"] if code == 200 else []) for b in route["backends"]}


def proc_status(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def children(pid: int) -> list[int]:
    """Live child processes of `pid` (for nginx: its workers), read from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(entry))
    return found


# --- the fault table -------------------------------------------------------------------------------

ROWS: list[str] = []


@pytest.fixture(scope="module", autouse=True)
def fault_table() -> Iterator[None]:
    """Print what traffic saw under each fault once the module is done (visible with -s)."""
    yield
    if ROWS:
        print("\n\n| fault | fault lasted | UDP delivered/sent (longest gap) | TCP ok/sent | "
              "/healthz, /readyz non-200 | reconverged after fault | warning lines |")
        print("|---|---|---|---|---|---|---|")
        print("\n".join(ROWS))


def record(fault: str, lasted: float, report: Report, reconverged: float, said: int) -> None:
    row = (f"| {fault} | {lasted:.1f} s | {report.udp_delivered}/{report.udp_sent} "
           f"({report.udp_longest_gap * 1000:.0f} ms) | {report.tcp_ok}/{report.tcp_sent} | "
           f"{len(report.health_failures)}, {len(report.ready_failures)} | {reconverged:.2f} s | {said} |")
    ROWS.append(row)
    print("\n" + row)


# --- API faults ----------------------------------------------------------------------------------------


@dataclass
class Scene:
    """What a fault needs: the API server, a place for files, and the pod change to make while it lasts."""

    kube_api: KubeApiServer
    tmp_path: Path

    def change_pods(self) -> None:
        """The change the sidecar must catch up with: a second agent pod appears."""
        self.kube_api.add_pod("agent-new", NS, AGENT, node="node-a", ip=NEW)


Fault = Callable[[Scene], None]


def stalled_watch(scene: Scene) -> None:
    api = scene.kube_api
    api.stall_watches = True
    before = api.count(watch=True)
    scene.change_pods()
    # Two replacements: the stall outlives 2 × watchTimeout, the limit /healthz checks.
    wait_for(lambda: api.count(watch=True) >= before + 2, 4 * WATCH_TIMEOUT + 5, what="two replacement watches")
    api.stall_watches = False


def resets_mid_stream(scene: Scene) -> None:
    api = scene.kube_api
    for _ in range(2):  # cut an established stream, wait for the next one, cut it again
        wait_for(lambda: api.open_watches == 1, 10, what="an open watch")
        api.reset_watches()
    scene.change_pods()
    api.reset_next(2)  # and the next two reconnects are reset before any answer
    wait_for(lambda: sum(r.status is None for r in api.requests) >= 2, 10, what="two reset requests")


def burst_of_500s(scene: Scene) -> None:
    api = scene.kube_api
    api.fail_next(5, 500)
    api.reset_watches()
    scene.change_pods()
    wait_for(lambda: api.count(status=500) >= 5, 20, what="five 500 answers")


def gone_after_compaction(scene: Scene) -> None:
    api = scene.kube_api
    lists = api.count(watch=False)
    api.add_pod("unrelated", "default", {"app": "web"})  # moves the resourceVersion past what the watch holds
    api.compact()
    api.reset_watches()  # the watch resumes from a compacted resourceVersion
    scene.change_pods()
    wait_for(lambda: api.count(watch=False) > lists, 10, what="a relist after 410 Gone")


def unauthorized_until_token_rotated(scene: Scene) -> None:
    api = scene.kube_api
    api.rotate_token("rotated-token")
    api.reset_watches()
    scene.change_pods()
    wait_for(lambda: api.count(status=401) >= 2, 10, what="two 401 answers")
    token = scene.tmp_path / "token"
    (scene.tmp_path / "token.new").write_text("rotated-token")
    os.replace(scene.tmp_path / "token.new", token)  # the kubelet swaps the projected token atomically


def forbidden_for_a_while(scene: Scene) -> None:
    api = scene.kube_api
    api.forbid_namespace(NS)
    api.reset_watches()
    scene.change_pods()
    wait_for(lambda: api.count(status=403) >= 2, 10, what="two 403 answers")
    api.allow_namespace(NS)


def api_server_down(scene: Scene) -> None:
    scene.kube_api.stop()
    scene.change_pods()
    time.sleep(OUTAGE)  # the fault's length, not a wait for state: traffic is measured meanwhile
    scene.kube_api.start()


# (fault, what the log must say exactly once, the most WARNING lines the fault may cause: each
# distinct error once; a fault started by cutting the watch also says that the stream broke)
FAULTS: list[tuple[Fault, str, int]] = [
    (stalled_watch, f"watch stalled: nothing received for {1.5 * WATCH_TIMEOUT:g}s; reconnecting", 1),
    (resets_mid_stream, "ProtocolError: ('Connection aborted.', ConnectionResetError(104", 2),
    (burst_of_500s, "API answered 500: Internal error occurred: injected failure", 2),
    (gone_after_compaction, "expired (410 Gone); listing again", 1),
    (unauthorized_until_token_rotated, "401 Unauthorized: re-reading credentials", 2),
    (forbidden_for_a_while, "403 Forbidden: grant list and watch on pods in namespace kube-system", 2),
    (api_server_down, "[Errno 111] Connection refused", 2),  # and the stream the crash cut
]


@pytest.mark.timeout(150)
@pytest.mark.parametrize("fault, said, most_warnings", FAULTS, ids=[f[0].__name__ for f in FAULTS])
def test_traffic_keeps_flowing_through_an_api_fault_and_the_sidecar_reconverges(
        fault: Fault, said: str, most_warnings: int, kube_api: KubeApiServer, proxyctl, udp_sinks, tcp_echoes,
        tmp_path: Path) -> None:
    port = free_port()
    sinks = [udp_sinks(OLD, port), udp_sinks(NEW, port)]
    tcp_echoes(OLD, port)
    tcp_echoes(NEW, port)
    kube_api.add_pod("agent-old", NS, AGENT, node="node-a", ip=OLD)
    env: dict[str, str] = {}
    if fault is unauthorized_until_token_rotated:
        token = kube_api.write_token_file(tmp_path / "token")
        env["KUBECONFIG"] = kube_api.write_kubeconfig(tmp_path / "kubeconfig-token-file", token_file=token)
    if fault is gone_after_compaction:
        kube_api.bookmark_interval = None  # no bookmark may carry the watch past the compaction
    sidecar = proxyctl(config(port), env=env)
    scene = Scene(kube_api, tmp_path)

    with Traffic(sidecar, port, sinks) as traffic:
        started = time.monotonic()
        fault(scene)
        ended = time.monotonic()
        # After a long outage the next attempt may come a whole backoff window (up to BACKOFF_MAX) later.
        eventually(sidecar, lambda: sinks[1].first_at is not None, BACKOFF_MAX + 10,
                   "traffic at the pod added during the fault")
        assert sinks[1].first_at is not None
        reconverged = max(0.0, sinks[1].first_at - ended)
        assert backends(sidecar) == {f"{OLD}:{port}", f"{NEW}:{port}"}
        # And the watch is live again: a change made after the fault is served too.
        kube_api.delete_pod(NS, "agent-new")
        eventually(sidecar, lambda: backends(sidecar) == {f"{OLD}:{port}"}, 10, "the deletion after the fault")
        eventually(sidecar, lambda: "watching again after" in sidecar.log(), 3 * WATCH_TIMEOUT, "the recovery said")
    report = traffic.finish()

    told = warnings(sidecar)
    record(fault.__name__.replace("_", " "), ended - started, report, reconverged, sum(told.values()))
    assert report.tcp_failures == [] and report.tcp_ok > 0
    assert report.udp_loss < 0.002 and report.udp_longest_gap < 0.1, report
    assert report.health_failures == []  # no watch was ever connected and silent for 2 × watchTimeout
    assert report.ready_failures == []  # nginx kept serving routes that all had a backend
    log = sidecar.log()
    assert log.count(said) == 1, log
    assert log.count("watching again after") <= 1, log
    silences = sum(n for line, n in told.items() if "no word from the API for" in line)
    assert silences <= 1, told  # a silence past watchTimeout, whatever the fault, is said once
    assert max(told.values(), default=0) == 1 and sum(told.values()) - silences <= most_warnings, told
    assert "Traceback" not in log and "unexpected error" not in log, log


@pytest.fixture
def keepalive_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    """`kube_api.keepalives = True` makes new watch streams send blank lines only: bytes, but no events."""
    original = kubeapi._Handler._stream_watch

    def stream(handler: kubeapi._Handler, watch: kubeapi._Watch) -> None:
        while getattr(handler.server.api, "keepalives", False) and not handler.server.stopping.is_set():
            handler._write_chunk(b"\n")
            handler.server.stopping.wait(0.5)
        original(handler, watch)

    monkeypatch.setattr(kubeapi._Handler, "_stream_watch", stream)


@pytest.mark.timeout(120)
def test_healthz_fails_only_while_a_watch_is_connected_but_silent_past_twice_its_timeout(
        kube_api: KubeApiServer, proxyctl, udp_sinks, tcp_echoes, keepalive_switch) -> None:
    """A stream that sends bytes but no events is never cut by the read timeout: only /healthz can tell."""
    port = free_port()
    sinks = [udp_sinks(OLD, port), udp_sinks(NEW, port)]
    tcp_echoes(OLD, port)
    tcp_echoes(NEW, port)
    kube_api.add_pod("agent-old", NS, AGENT, node="node-a", ip=OLD)
    sidecar = proxyctl(config(port))

    with Traffic(sidecar, port, sinks) as traffic:
        watches = kube_api.count(watch=True)
        kube_api.keepalives = True
        kube_api.reset_watches()
        wait_for(lambda: kube_api.count(watch=True) > watches, 10, what="the silent watch")
        silent_since = time.monotonic()
        kube_api.add_pod("agent-new", NS, AGENT, node="node-a", ip=NEW)
        wait_for(lambda: sidecar.get("/healthz")[0] == 503, 2 * WATCH_TIMEOUT + 5, interval=0.05,
                 what="/healthz failing")
        failed_after = time.monotonic() - silent_since
        assert "watch stalled: pods 'app=agent' in kube-system on node node-a" in sidecar.get("/healthz")[1]
        kube_api.keepalives = False
        ended = time.monotonic()
        wait_for(lambda: sinks[1].first_at is not None, 10, what="traffic at the pod added meanwhile")
        assert sinks[1].first_at is not None
        wait_for(lambda: sidecar.get("/healthz")[0] == 200, 5, what="/healthz 200 again")
    report = traffic.finish()

    record("watch connected, silent (blank lines only)", ended - silent_since, report,
           max(0.0, sinks[1].first_at - ended), sum(warnings(sidecar).values()))
    print(f"/healthz failed {failed_after:.1f} s into the silence (limit {2 * WATCH_TIMEOUT} s)")
    assert 2 * WATCH_TIMEOUT - 0.1 <= failed_after <= 2 * WATCH_TIMEOUT + 1.5
    assert all(f.startswith("503 watch stalled") for f in report.health_failures), report.health_failures
    assert report.ready_failures == [] and report.tcp_failures == [] and report.udp_loss < 0.002, report


@pytest.mark.timeout(60)
def test_recovery_is_said_when_it_happens(kube_api: KubeApiServer, proxyctl, udp_sinks) -> None:
    port = free_port()
    sink = udp_sinks(NEW, port)
    kube_api.add_pod("agent-old", NS, AGENT, node="node-a", ip=OLD)
    sidecar = proxyctl(config(port).replace(f"watchTimeout: {WATCH_TIMEOUT}s", "watchTimeout: 30s"))
    kube_api.forbid_namespace(NS)
    kube_api.reset_watches()
    wait_for(lambda: kube_api.count(status=403) >= 2, 10, what="two 403 answers")
    kube_api.add_pod("agent-new", NS, AGENT, node="node-a", ip=NEW)
    kube_api.allow_namespace(NS)

    def served() -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.sendto(b"probe:1|c", ("127.0.0.1", port))
        return sink.first_at is not None

    wait_for(served, 10, what="the pod added during the 403s")
    wait_for(lambda: "watching again after" in sidecar.log(), 5, what="the recovery in the log")


# --- reloads under load ------------------------------------------------------------------------------------


@pytest.mark.timeout(150)
def test_a_hundred_reloads_under_load_fail_no_tcp_request_and_lose_almost_no_udp(
        kube_api: KubeApiServer, proxyctl, udp_sinks, tcp_echoes) -> None:
    port, extra_port = free_port(), free_port()
    hosts = [f"127.0.0.{2 + i}" for i in range(5)]
    sinks = [udp_sinks(host, port) for host in hosts]
    for host in hosts:
        tcp_echoes(host, port)
    for i, host in enumerate(hosts):
        kube_api.add_pod(f"agent-{i}", NS, AGENT, node="node-a", ip=host)
    plain = config(port)
    swapped = config(port, f"  - {{name: extra, port: {extra_port}, protocol: tcp, selector: app=agent, "
                           f"namespace: {NS}}}\n")
    sidecar = proxyctl(plain)
    reloads = sidecar.metric("proxyctl_reloads_total") or 0
    started = time.monotonic()

    with Traffic(sidecar, port, sinks, udp_rate=500, tcp_rate=25, held=6, held_life=6.0) as traffic:
        ready = dict.fromkeys(range(1, len(hosts)), True)
        for step in range(STEPS):
            time.sleep(max(0.0, started + step * 0.15 - time.monotonic()))  # spread over ~15 s
            if step % 5 == 4:  # a ConfigMap swap: adds or removes a route
                sidecar.configmap.write(sidecar.with_health(swapped if step % 10 == 4 else plain))
            else:  # pod churn: agent-1..4 in turn go not-ready or ready again; agent-0 always serves
                agent = 1 + step % 4
                ready[agent] = not ready[agent]
                kube_api.update_pod(NS, f"agent-{agent}", ready=ready[agent])
            expected = reloads + step + 1
            wait_for(lambda: (sidecar.metric("proxyctl_reloads_total") or 0) >= expected, 10,
                     what=f"reload {expected}")
        done = sidecar.metric("proxyctl_reloads_total") - reloads
    report = traffic.finish()

    print(f"\n{done:.0f} reloads in {time.monotonic() - started:.1f} s under load: TCP {report.tcp_ok}/"
          f"{report.tcp_sent} requests ok ({report.fresh} on fresh connections, the rest on "
          f"{report.held_opened} held ones); UDP {report.udp_delivered}/{report.udp_sent} delivered "
          f"(loss {report.udp_loss:.3%}, longest gap {report.udp_longest_gap * 1000:.0f} ms)")
    assert done >= STEPS
    assert report.tcp_failures == [], report.tcp_failures[:5]
    assert report.held_opened >= 18  # held connections lived through reloads and were replaced meanwhile
    assert report.udp_loss < 0.001, report
    assert report.health_failures == []
    assert report.ready_failures == [], report


def test_readyz_stays_ready_while_a_config_swap_adds_a_route(kube_api: KubeApiServer, proxyctl) -> None:
    port, added = free_port(), free_port()
    kube_api.add_pod("agent", NS, AGENT, node="node-a", ip=OLD)
    kube_api.add_pod("collector", NS, {"app": "collector"}, node="node-a", ip=NEW)
    sidecar = proxyctl(config(port))
    kube_api.delay = 0.5  # the added route's first list takes a while, as on a busy API server
    sidecar.configmap.write(sidecar.with_health(config(port, (
        f"  - {{name: extra, port: {added}, protocol: tcp, selector: app=collector, namespace: {NS}}}\n"))))
    answers = []

    def added_route_served() -> bool:
        answers.append(sidecar.get("/readyz"))
        return f"{NEW}:{added}" in sidecar.get("/routes")[1]

    eventually(sidecar, added_route_served, 20, what="the added route in /routes")
    assert [a for a in answers if a[0] != 200] == []


# --- churn soak ------------------------------------------------------------------------------------------------


@pytest.mark.timeout(SOAK + 90)
def test_pod_churn_soak_leaves_no_memory_fds_or_nginx_workers_behind(kube_api: KubeApiServer, proxyctl, udp_sinks,
                                                                       tcp_echoes) -> None:
    port = free_port()
    hosts = [f"127.0.0.{40 + i}" for i in range(10)]  # pods come back on recycled IPs, as on a node
    sinks = [udp_sinks(host, port) for host in hosts]
    for host in hosts:
        tcp_echoes(host, port)
    kube_api.add_pod("agent-0", NS, AGENT, node="node-a", ip=hosts[0])
    sidecar = proxyctl(config(port))
    assert sidecar.process is not None
    pid = sidecar.process.pid
    rss_at_start = proc_status(pid, "VmRSS")

    def replace(n: int) -> None:
        """A rolling update with surge: the new pod is added before the old one goes."""
        kube_api.add_pod(f"agent-{n + 1}", NS, AGENT, node="node-a", ip=hosts[(n + 1) % len(hosts)])
        kube_api.delete_pod(NS, f"agent-{n}")

    with Traffic(sidecar, port, sinks, udp_rate=100, tcp_rate=10, limit=SOAK + 60) as traffic:
        for n in range(10):  # warm up: first reloads allocate what every later one reuses
            replace(n)
            wait_for(lambda: backends(sidecar) == {f"{hosts[(n + 1) % len(hosts)]}:{port}"}, 10,
                     what="warm-up replacement")
        rss, fds = proc_status(pid, "VmRSS"), open_fds(pid)
        reloads = sidecar.metric("proxyctl_reloads_total") or 0
        start, n = time.monotonic(), 10
        while time.monotonic() - start < SOAK:  # a replacement every 0.5 s
            time.sleep(max(0.0, start + (n - 9) * 0.5 - time.monotonic()))
            replace(n)
            n += 1
        wait_for(lambda: backends(sidecar) == {f"{hosts[n % len(hosts)]}:{port}"}, 10, what="the last pod")
        peak = proc_status(pid, "VmHWM")
    report = traffic.finish()
    churned = sidecar.metric("proxyctl_reloads_total") - reloads

    masters = [sidecar.nginx_pid(route) for route in ("statsd", "forward")]
    eventually(sidecar, lambda: all(len(children(m)) == 1 for m in masters), 15,
               "one nginx worker each: every old one has exited")
    margin = max(4096, rss // 10)  # kB
    eventually(sidecar, lambda: proc_status(pid, "VmRSS") <= rss + margin and open_fds(pid) <= fds + 2, 15,
               f"RSS within {margin} kB of {rss} kB and fds within 2 of {fds}")
    print(f"\nchurn soak: {n - 10} replacements, {churned:.0f} reloads in {SOAK:.0f} s; sidecar RSS "
          f"{rss_at_start} kB at start, {rss} kB after warm-up -> {proc_status(pid, 'VmRSS')} kB after the soak "
          f"(peak {peak} kB); fds {fds} -> {open_fds(pid)}; nginx workers: {[len(children(m)) for m in masters]}; "
          f"UDP {report.udp_delivered}/{report.udp_sent} (loss {report.udp_loss:.3%}), "
          f"TCP {report.tcp_ok}/{report.tcp_sent}")
    assert churned >= SOAK  # at least one reload per second of churn: every change was applied
    assert report.tcp_failures == [], report.tcp_failures[:5]
    assert report.udp_loss < 0.001, report
    assert report.health_failures == [] and report.ready_failures == []
    assert "Traceback" not in sidecar.log()
