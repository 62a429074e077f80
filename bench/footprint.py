"""Case footprint: what an idle proxyctl with three routes costs: memory, start-up, API requests."""

from __future__ import annotations

import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from bench.report import CaseResult, Table, Target, mb, median, ms
from bench.system import Memory, children, memory, tree_memory
from tests.harness import Proxyctl
from tests.kubeapi import KubeApiServer, RequestRecord
from tests.support import free_port

NS = "monitoring"
AGENTS = (("dogstatsd", "udp"), ("fluentd", "tcp"), ("otel", "tcp"))
IDLE = 3.0  # seconds after /readyz before memory is read: imports done, first reload behind it
STEADY_WATCH_TIMEOUT = 2.0  # seconds; the default is 300
DEFAULT_WATCH_TIMEOUT = 300.0
TEN_MINUTES = 600.0
MEMORY_TARGET_KIB, READY_TARGET = 50 * 1024, 1.0


@dataclass(frozen=True)
class Start:
    ready_after: float
    requests: int  # to the API server, until ready
    proxyctl: Memory
    nginx: Memory
    nginx_processes: int


def _config(watch_timeout: str = "") -> str:
    routes = "".join(f"  - {{name: {name}, port: {free_port()}, protocol: {protocol}, selector: app={name}, "
                     f"namespace: {NS}}}\n" for name, protocol in AGENTS)
    return (f"watchTimeout: {watch_timeout}\n" if watch_timeout else "") + "routes:\n" + routes


def _start(root: Path, api: KubeApiServer, config: str, stack: ExitStack) -> tuple[Proxyctl, float]:
    """Start proxyctl; seconds from the process start to /readyz 200 (polled every 5 ms, for at most 20 s)."""
    sidecar = Proxyctl(root, api, config)
    stack.callback(sidecar.kill)
    started = time.monotonic()
    sidecar.start(wait_ready=False)
    while sidecar.get("/readyz")[0] != 200:
        if time.monotonic() - started > 20:
            raise RuntimeError(f"proxyctl not ready in 20 s:\n{sidecar.log()}")
        time.sleep(0.005)
    return sidecar, time.monotonic() - started


def run(quick: bool) -> CaseResult:
    starts_wanted, steady = (2, 10.0) if quick else (5, 30.0)
    starts: list[Start] = []
    with ExitStack() as stack:
        api = KubeApiServer()
        api.start()
        stack.callback(api.stop)
        for name, _ in AGENTS:
            api.add_pod(f"{name}-x1", NS, {"app": name}, node="node-a", ip="127.0.0.2")
        root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-footprint-")))
        for k in range(starts_wanted):
            with ExitStack() as one:
                before = api.count()
                sidecar, ready_after = _start(root / f"start-{k}", api, _config(), one)
                requests = api.count() - before
                time.sleep(IDLE)  # idle on purpose: the figure is the resting footprint
                assert sidecar.process is not None
                masters = sidecar.nginx_pids()  # one nginx per route
                nginx = sum((tree_memory(m) for m in masters[1:]), tree_memory(masters[0]))
                starts.append(Start(ready_after, requests, memory(sidecar.process.pid), nginx,
                                    sum(1 + len(children(m)) for m in masters)))
                sidecar.stop()
            print(f"  start {k + 1}: ready after {ms(ready_after)}; PSS proxyctl {mb(starts[-1].proxyctl.pss)}, "
                  f"nginx {mb(starts[-1].nginx.pss)}", flush=True)

        # Steady state: the watches end every watchTimeout and are made again; count what that costs.
        sidecar, _ = _start(root / "steady", api, _config(f"{STEADY_WATCH_TIMEOUT:g}s"), stack)
        before = api.count()
        time.sleep(steady)  # the load here is time itself: requests made while nothing changes
        steady_requests = api.requests[before:]
        sidecar.stop()
    return _result(starts, steady_requests, steady)


def _requests_per_second(requests: Sequence[RequestRecord]) -> float:
    """Summed over the watches, each one's rate from its first to its last request in the window.

    Counting requests in a fixed window would be off by up to one per watch (whether a boundary
    falls just inside or just outside); the spacing of the requests themselves is not.
    """
    by_watch: dict[tuple[str, str], list[float]] = {}
    for request in requests:
        by_watch.setdefault((request.path, request.query.get("labelSelector", "")), []).append(request.time)
    return sum((len(times) - 1) / (max(times) - min(times)) for times in by_watch.values() if len(times) > 1)


def _result(starts: list[Start], steady: Sequence[RequestRecord], window: float) -> CaseResult:
    proxyctl = Memory(*(int(median([getattr(s.proxyctl, f) for s in starts])) for f in ("rss", "pss", "uss")))
    nginx = Memory(*(int(median([getattr(s.nginx, f) for s in starts])) for f in ("rss", "pss", "uss")))
    both = proxyctl + nginx
    ready = median([s.ready_after for s in starts])
    processes = int(median([s.nginx_processes for s in starts]))
    memory_rows = [[name, mb(m.rss), mb(m.pss), mb(m.uss)]
                   for name, m in (("proxyctl (python)", proxyctl), (f"nginx ({processes} processes)", nginx),
                                   ("together", both))]
    per_period_per_route = _requests_per_second(steady) * STEADY_WATCH_TIMEOUT / len(AGENTS)
    per_ten_minutes = per_period_per_route * TEN_MINUTES / DEFAULT_WATCH_TIMEOUT * len(AGENTS)
    api_rows = [
        ["until ready (node from NODE_NAME; a list and a watch per route)",
         f"{median([s.requests for s in starts]):.0f}"],
        [f"steady state: {window:g} s at watchTimeout {STEADY_WATCH_TIMEOUT:g}s", f"{len(steady)} "
         f"({sum(1 for r in steady if r.is_watch)} watches)"],
        ["per watchTimeout per route (from the spacing of each watch's requests)", f"{per_period_per_route:.2f}"],
        [f"per 10 min at the default 5m, {len(AGENTS)} routes (x {TEN_MINUTES / DEFAULT_WATCH_TIMEOUT:g} periods "
         f"x {len(AGENTS)} routes)", f"{per_ten_minutes:.1f}"],
    ]
    about = (f"Three routes (one udp, two tcp) to pods that exist, {len(starts)} starts. *Ready* is from starting the "
             "`proxyctl run` process (Python start-up and imports included) to `/readyz` answering 200. Memory is "
             f"read from /proc/PID/smaps_rollup {IDLE:g} s after ready, median over the starts: RSS counts shared "
             "pages in full, PSS divides each among the processes mapping it, USS is private pages only. Here the "
             "benchmark's own Python maps the same interpreter and libraries, which lowers proxyctl's PSS; in a pod "
             "nothing outside it maps them, so a container's charge lies between PSS and RSS. API requests: the "
             "server is asked to end each watch within watchTimeout, and proxyctl then watches again from the last "
             "resourceVersion, so the steady-state cost is one request per watch (one per route with distinct "
             f"selectors) per watchTimeout. Measured at {STEADY_WATCH_TIMEOUT:g}s and scaled to 10 minutes at 5m.")
    return CaseResult(
        "footprint", "Footprint, idle, three routes", about,
        tables=[Table(["process", "RSS", "PSS", "USS"], memory_rows, "lrrr"),
                Table(["start", "to /readyz 200"], [[f"median of {len(starts)}", ms(ready)],
                                                     ["each", ", ".join(ms(s.ready_after) for s in starts)]], "lr"),
                Table(["API requests", "count"], api_rows, "lr")],
        targets=[Target("proxyctl + nginx idle <= 50 MB PSS (RSS printed too)",
                        f"PSS {mb(both.pss)} (RSS {mb(both.rss)}, USS {mb(both.uss)})", both.pss <= MEMORY_TARGET_KIB),
                 Target("ready < 1 s after start", f"median {ms(ready)}", ready < READY_TARGET)])
