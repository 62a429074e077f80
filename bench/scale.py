"""Case scale: what a change costs with 10, 100 and 1,000 routes: parse, render, `nginx -t`, reload.

These are the steps `proxyctl run` takes for every change, done here directly with
proxyctl's own functions on real nginx; routes alternate udp and tcp, one backend each.
"""

from __future__ import annotations

import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

from bench.report import CaseResult, Table, mb, median, ms
from bench.system import children, tree_memory
from bench.udpload import nginx_log_tally
from proxyctl.backend import Backend
from proxyctl.config import Config, load_config
from proxyctl.nginx import Nginx, NginxError, stream_module
from proxyctl.render import render, worker_connections

SIZES = (10, 100, 1000)
HOST = "127.0.0.1"
# Below Linux's ephemeral range (32768-60999), so no client socket of another process takes one meanwhile.
PORT_SEARCH = range(20000, 32000)
T = TypeVar("T")


@dataclass(frozen=True)
class Round:
    routes: int
    parse: float
    render: float
    test: float
    start: float
    reload: float  # render + test + write + reload after one route's backend changed
    sighup: float  # the reload alone: SIGHUP until the new worker runs
    nginx_pss: int
    misreported: int  # start() or reload() raised, yet nginx had applied the config


def free_range(count: int) -> int:
    """The first port of `count` consecutive ports free for tcp and udp on 127.0.0.1."""
    base = PORT_SEARCH.start
    while base + count <= PORT_SEARCH.stop:
        for port in range(base, base + count):
            if not _free(port):
                base = port + 1
                break
        else:
            return base
    raise RuntimeError(f"no {count} consecutive free ports in {PORT_SEARCH}")


def _free(port: int) -> bool:
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        with socket.socket(socket.AF_INET, kind) as sock:
            try:
                sock.bind((HOST, port))
            except OSError:
                return False
    return True


def _timed(action: Callable[[], T]) -> tuple[T, float]:
    started = time.perf_counter()
    value = action()
    return value, time.perf_counter() - started


def _config_text(routes: int, base: int) -> str:
    return "routes:\n" + "".join(f"  - {{name: r{i}, port: {base + i}, protocol: {'udp' if i % 2 else 'tcp'}, "
                                 f"selector: app=agent-{i}}}\n" for i in range(routes))


def _endpoints(config: Config, base: int, moved: int | None = None) -> dict[str, list[Backend]]:
    """One backend per route on 127.0.0.2; route `moved`'s pod on 127.0.0.3, as after a replacement."""
    return {route.key: [Backend("127.0.0.3" if i == moved else "127.0.0.2", base + i)]
            for i, route in enumerate(config.routes)}


def _applied_anyway(nginx: Nginx, workers_before: set[int], timeout: float = 5.0) -> bool:
    """After start()/reload() raised: did a new worker start all the same?"""
    assert nginx.process is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if nginx.running and set(children(nginx.process.pid)) - workers_before:
            return True
        time.sleep(0.01)
    return False


def _round(routes: int, module: str | None) -> Round:
    base = free_range(routes)
    text = _config_text(routes, base)
    config, parse = _timed(lambda: load_config(text))
    misreported = 0
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as directory:
        nginx = Nginx(Path(directory))
        conf, render_time = _timed(lambda: render(config, _endpoints(config, base), nginx.state_dir, module))
        _, test = _timed(lambda: nginx.test(conf))
        nginx.write(conf)
        try:
            started = time.perf_counter()
            try:
                nginx.start()
            except NginxError:
                if not _applied_anyway(nginx, set()):
                    raise
                misreported += 1
            start = time.perf_counter() - started
            pss = _settled_pss(nginx)

            def change() -> None:
                text = render(config, _endpoints(config, base, moved=routes // 2), nginx.state_dir, module)
                nginx.test(text)
                nginx.write(text)

            _, prepare = _timed(change)
            assert nginx.process is not None
            workers = set(children(nginx.process.pid))
            started = time.perf_counter()
            try:
                nginx.reload()
            except NginxError:
                if not _applied_anyway(nginx, workers):
                    raise
                misreported += 1
            sighup = time.perf_counter() - started
        finally:
            nginx.stop(grace=5)
    return Round(routes, parse, render_time, test, start, prepare + sighup, sighup, pss, misreported)


def _settled_pss(nginx: Nginx, timeout: float = 5.0) -> int:
    """nginx's PSS once its worker has finished initialising (two equal readings 50 ms apart)."""
    assert nginx.process is not None
    deadline = time.monotonic() + timeout
    last = -1
    while time.monotonic() < deadline:
        now = tree_memory(nginx.process.pid).pss
        if now == last:
            return now
        last = now
        time.sleep(0.05)
    return last


def run(quick: bool) -> CaseResult:
    repeats = 1 if quick else 3
    module = stream_module()
    rounds: list[Round] = []
    with nginx_log_tally() as log:
        for _ in range(repeats):
            for routes in SIZES:
                done = _round(routes, module)
                rounds.append(done)
                print(f"  {routes:>5} routes: parse {ms(done.parse)}, render {ms(done.render)}, nginx -t "
                      f"{ms(done.test)}, start {ms(done.start)}, change {ms(done.reload)}, nginx PSS "
                      f"{mb(done.nginx_pss)}" + (f", {done.misreported} misreported failure(s)" if done.misreported
                                                 else ""), flush=True)
    rows = []
    for routes in SIZES:
        mine = [r for r in rounds if r.routes == routes]
        times = [ms(median([getattr(r, step) for r in mine])) for step in ("parse", "render", "test", "sighup",
                                                                            "reload", "start")]
        rows.append([f"{routes:,}", *times, f"{worker_connections(routes, None):,}",
                     mb(median([r.nginx_pss for r in mine])), f"{sum(r.misreported for r in mine)} of {2 * len(mine)}"])
    about = (f"Routes alternate udp and tcp, ports from a free range on {HOST}, one backend each; {repeats} round(s), "
             "medians. *parse*: `load_config` (YAML and validation), done on every config file change; *render*: "
             "`proxyctl.render.render`; *nginx -t*: `Nginx.test` (a process that parses the whole config); "
             "*SIGHUP*: `Nginx.reload` until the new worker runs; *change*: render + `nginx -t` + write + reload after "
             "one route's backend moved, what a pod replacement costs. *start*: `Nginx.start` to the first worker. "
             "*nginx PSS*: master and worker once settled. The last column counts `start()`/`reload()` calls that "
             "raised NginxError although nginx had applied the config (a new worker ran).")
    said = [f"{n} x `{message}`" for message, n in sorted(log.tally.items())]
    notes = [f"nginx logged (warn and worse, all rounds): {'; '.join(said)}."] if said else []
    return CaseResult("scale", "Scale: routes per config", about, notes=notes,
                      tables=[Table(["routes", "parse", "render", "nginx -t", "SIGHUP", "change", "start",
                                     "worker_connections", "nginx PSS", "misreported failures"], rows, "rrrrrrrrrr")])
