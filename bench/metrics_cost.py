"""Case metrics-cost: what /metrics costs, side by side with earlier versions in one run.

Each version runs as `proxyctl run` (the earlier ones exported from git into a temporary
directory) with three routes, as footprint does, while a client GETs /metrics every second:
idle memory (PSS of proxyctl and its nginx) 3 s after ready, then 2,000 UDP clients at
30,000 datagrams/s through its UDP route, as udp-many does. Rounds alternate the versions,
so a noisy machine shifts them all alike.
"""

from __future__ import annotations

import tempfile
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from bench.footprint import AGENTS, IDLE, MEMORY_TARGET_KIB, NS
from bench.report import CaseResult, Table, Target, mb, median, ms
from bench.rollout import export
from bench.system import Memory, memory, tree_memory
from bench.udpload import SINK_RCVBUF, CountingSink, raise_fd_limit, rmem_max_at_least, send_paced, udp_drops
from tests.harness import Proxyctl
from tests.kubeapi import KubeApiServer
from tests.support import free_port, http_get

VERSIONS = [  # (git revision or None for this checkout, what it is)
    ("bb88c51", "bb88c51, before per-route traffic metrics"),
    ("ef4f7ad", "ef4f7ad, previous release"),
    (None, "this checkout"),
]
CLIENTS, RATE = 2000, 30_000
SCRAPE_EVERY = 1.0  # seconds, a busy Prometheus's interval; the PodMonitor example says 30 s
SINK_HOST = "127.0.0.2"
TARGET_DELIVERED = 0.999


@dataclass(frozen=True)
class Trial:
    version: str
    proxyctl: Memory
    nginx: Memory
    sent: int
    sent_rate: float
    delivered: int
    route_drops: int  # the kernel's count at the route's listening socket
    idle_scrapes: list[float]  # seconds each /metrics GET took before the load
    loaded_scrapes: list[float]  # and during it
    failed_scrapes: int
    metrics_bytes: int

    @property
    def fraction(self) -> float:
        return self.delivered / self.sent if self.sent else 0.0


class Scraper:
    """GETs /metrics every `SCRAPE_EVERY` s in a thread until stopped, for at most `limit` s."""

    def __init__(self, port: int, limit: float = 60.0) -> None:
        self.port, self.limit = port, limit
        self.took: list[tuple[float, float]] = []  # (when asked, seconds to the whole answer)
        self.failed = 0
        self.size = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="scraper", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        started = time.monotonic()
        while not self._stop.is_set() and time.monotonic() - started < self.limit:
            asked = time.monotonic()
            code, text = http_get(self.port, "/metrics")
            self.took.append((asked, time.monotonic() - asked))
            self.failed += code != 200
            self.size = len(text.encode())
            self._stop.wait(max(0.0, asked + SCRAPE_EVERY - time.monotonic()))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def between(self, start: float, end: float) -> list[float]:
        return [took for asked, took in self.took if start <= asked < end]


def _config(udp_port: int, sink_port: int) -> str:
    """footprint's three routes; the UDP one sends to the sink, which lives for the whole case."""
    routes = [f"  - {{name: dogstatsd, port: {udp_port}, protocol: udp, selector: app=dogstatsd, namespace: {NS}, "
              f"targetPort: {sink_port}}}\n"]
    routes += [f"  - {{name: {name}, port: {free_port()}, protocol: {protocol}, selector: app={name}, "
               f"namespace: {NS}}}\n" for name, protocol in AGENTS if protocol == "tcp"]
    return "routes:\n" + "".join(routes)


def run_trial(root: Path, api: KubeApiServer, sink: CountingSink, version: str, source: Path | None,
              seconds: float) -> Trial:
    # PYTHONSAFEPATH: the working directory's own proxyctl must not shadow the one at `source`.
    env = {"PYTHONPATH": str(source), "PYTHONSAFEPATH": "1"} if source is not None else {}
    with ExitStack() as stack:
        for attempt in range(1, 4):  # a port chosen free can be taken by another program before nginx binds it
            udp_port = free_port()
            sidecar = Proxyctl(root / str(attempt), api, _config(udp_port, sink.address[1]), env)
            stack.callback(sidecar.kill)
            try:
                sidecar.start()
                break
            except AssertionError as error:
                sidecar.kill()
                if attempt == 3 or "Address already in use" not in str(error):
                    raise
                print(f"  {version}: a port was taken before nginx bound it; again on other ports", flush=True)
        scraper = Scraper(sidecar.health_port, limit=IDLE + seconds * 3 + 30)
        stack.callback(scraper.stop)
        time.sleep(IDLE)  # idle on purpose, scraped meanwhile: the figure is the resting footprint
        assert sidecar.process is not None
        masters = sidecar.nginx_pids()
        nginx = sum((tree_memory(m) for m in masters[1:]), tree_memory(masters[0]))
        proxyctl = memory(sidecar.process.pid)
        before, load_started = sink.count, time.monotonic()
        sent = send_paced(("127.0.0.1", udp_port), RATE, seconds, CLIENTS, processes=2)
        load_ended = time.monotonic()
        delivered = sink.settle(before + sent.sent) - before
        drops = udp_drops(("127.0.0.1", udp_port))
        scraper.stop()
        sidecar.stop()
    return Trial(version, proxyctl, nginx, sent.sent, sent.rate, delivered, drops, scraper.between(0, load_started),
                 scraper.between(load_started, load_ended), scraper.failed, scraper.size)


def run(quick: bool) -> CaseResult:
    rounds, seconds = (1, 2.0) if quick else (3, 3.0)
    raise_fd_limit(CLIENTS + 256)
    trials: list[Trial] = []
    notes: list[str] = []
    with ExitStack() as stack, rmem_max_at_least(SINK_RCVBUF) as rmem:
        root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-metrics-cost-")))
        sources: dict[str, Path | None] = {}
        for revision, label in VERSIONS:
            if revision is None:
                sources[label] = None
                continue
            (root / revision).mkdir()
            source = export(revision, root / revision)
            if source is None:
                notes.append(f"no git history here to export {revision} from: left out")
            else:
                sources[label] = source
        api = KubeApiServer()
        api.start()
        stack.callback(api.stop)
        for name, _ in AGENTS:
            api.add_pod(f"{name}-x1", NS, {"app": name}, node="node-a", ip=SINK_HOST)
        sink = stack.enter_context(CountingSink((SINK_HOST, free_port(SINK_HOST))))
        print(f"  {rmem.describe(SINK_RCVBUF)}")
        for k in range(rounds):
            for label, source in sources.items():
                trial = run_trial(root / f"{k}-{len(trials)}", api, sink, label, source, seconds)
                trials.append(trial)
                print(f"  {label:38} delivered {trial.delivered:>7,}/{trial.sent:<7,} {trial.fraction:8.3%} at "
                      f"{trial.sent_rate:,.0f}/s, route socket drops {trial.route_drops:,}; PSS proxyctl "
                      f"{mb(trial.proxyctl.pss)}, nginx {mb(trial.nginx.pss)}; /metrics GET idle "
                      f"{_took(trial.idle_scrapes)}, under load {_took(trial.loaded_scrapes)}", flush=True)
    return _result(trials, list(sources), rounds, seconds, notes, rmem.describe(SINK_RCVBUF))


def _took(seconds: list[float]) -> str:
    return f"{ms(median(seconds))} (n={len(seconds)})" if seconds else "-"


def _result(trials: list[Trial], versions: list[str], rounds: int, seconds: float, notes: list[str],
            rmem: str) -> CaseResult:
    rows = []
    for version in versions:
        cell = [t for t in trials if t.version == version]
        pss = median([t.proxyctl.pss + t.nginx.pss for t in cell])
        rows.append([version, f"{median([t.fraction for t in cell]):.3%}", f"{median([t.route_drops for t in cell]):,.0f}",
                     f"{median([t.sent_rate for t in cell]):,.0f}", mb(median([t.proxyctl.pss for t in cell])),
                     mb(median([t.nginx.pss for t in cell])), mb(pss),
                     mb(median([t.proxyctl.uss + t.nginx.uss for t in cell])),
                     _took([s for t in cell for s in t.idle_scrapes]),
                     _took([s for t in cell for s in t.loaded_scrapes]), f"{median([t.metrics_bytes for t in cell]):,.0f}",
                     str(sum(t.failed_scrapes for t in cell))])
    this = [t for t in trials if t.version == versions[-1]]
    delivered = median([t.fraction for t in this])
    pss = median([t.proxyctl.pss + t.nginx.pss for t in this])
    notes.append(rmem)
    about = (f"Each version as `proxyctl run` with footprint's three routes (one UDP, two TCP), /metrics asked for "
             f"every {SCRAPE_EVERY:g} s throughout, {rounds} round(s) alternating the versions. *PSS* is read "
             f"{IDLE:g} s after /readyz (see footprint for what PSS means here); then {CLIENTS:,} clients send "
             f"DogStatsD datagrams to the UDP route at {RATE:,}/s for {seconds:g} s. *Delivered* is counted at the "
             "sink over what the kernel accepted from the clients; *route socket drops* is the kernel's count at the "
             "route's listening socket. Medians over the rounds. PSS moves with whatever else maps nginx's and Python's "
             "pages on the machine at the time; USS (private pages only) does not, so it compares the versions.")
    return CaseResult(
        "metrics-cost", "What /metrics costs", about,
        tables=[Table(["version", "delivered", "route socket drops", "sent/s", "PSS proxyctl", "PSS nginx",
                       "PSS together", "USS together", "/metrics GET idle", f"/metrics GET, {CLIENTS:,} clients sending",
                       "/metrics bytes", "failed GETs"], rows, "lrrrrrrrrrrr")],
        targets=[Target(f"this checkout, scraped every {SCRAPE_EVERY:g} s: >= 99.9 % delivered at {RATE // 1000}k/s",
                        f"{delivered:.3%}", delivered >= TARGET_DELIVERED),
                 Target(f"this checkout, scraped every {SCRAPE_EVERY:g} s: idle <= 50 MB PSS", mb(pss),
                        pss <= MEMORY_TARGET_KIB)],
        notes=notes)
