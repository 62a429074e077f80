"""Case convergence: how soon traffic follows a change, with `proxyctl run` as a real process.

A pod replaced in the test API server is timed from the API change to the first probe
datagram arriving at the new pod's address; every replacement pod has its own 127.0.0.x,
so a datagram can only arrive there once nginx forwards to it. A config swap (the kubelet's
`..data` symlink rename) adding a tcp route is timed to the first answer through the new port.
"""

from __future__ import annotations

import select
import socket
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from bench.report import CaseResult, Table, Target, median, ms, quantile
from bench.system import children
from tests.harness import Proxyctl
from tests.kubeapi import KubeApiServer
from tests.support import TcpEcho, free_port

if TYPE_CHECKING:
    from matplotlib.axes import Axes

NS = "monitoring"
AGENT = {"app": "dogstatsd"}
SWAP_HOST = "127.0.0.3"
FIRST_POD_HOST = 10  # replacement pods get 127.0.0.10, .11, ...
WAIT = 5.0  # seconds: a change not seen by then counts as this long, and is reported
PROBE_EVERY = 0.001
CONVERGENCE_TARGET, SWAP_TARGET = 0.250, 0.500


@dataclass(frozen=True)
class Series:
    label: str
    delays: list[float]
    reloads: int
    timeouts: int


class Rig:
    """One proxyctl process, its test API server, and a probe socket aimed at the udp route."""

    def __init__(self, stack: ExitStack) -> None:
        self.api = KubeApiServer()
        self.api.start()
        stack.callback(self.api.stop)
        self.port = free_port()
        self.api.add_pod("agent-0", NS, AGENT, node="node-a", ip=self.pod_host(0))
        root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-convergence-")))
        self.base = f"routes:\n  - {{name: dogstatsd, port: {self.port}, protocol: udp, selector: app=dogstatsd, " \
                    f"namespace: {NS}}}\n"
        self.sidecar = Proxyctl(root, self.api, self.base)
        stack.callback(self.sidecar.kill)
        self.sidecar.start()
        self.probe = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        self.probe.connect(("127.0.0.1", self.port))
        self.pods = 1

    @staticmethod
    def pod_host(n: int) -> str:
        return f"127.0.0.{FIRST_POD_HOST + n}"

    def reloads(self) -> int:
        return int(self.sidecar.metric("proxyctl_reloads_total") or 0)

    def settle(self, quiet: float = 0.2, timeout: float = 5.0) -> None:
        """Until nginx runs one worker (old ones retired) and proxyctl has not reloaded for `quiet` s."""
        deadline = time.monotonic() + timeout
        last, since = self.reloads(), time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.02)
            now = self.reloads()
            if now != last:
                last, since = now, time.monotonic()
            elif time.monotonic() - since >= quiet and len(children(self.sidecar.nginx_pid("dogstatsd"))) == 1:
                return

    def replace_pod(self) -> float | None:
        """Replace the agent pod by one at a new IP; seconds until a probe arrives there (None: not in WAIT)."""
        n = self.pods
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sink:
            sink.bind((self.pod_host(n), self.port))
            started = time.monotonic()
            self.api.delete_pod(NS, f"agent-{n - 1}")
            self.api.add_pod(f"agent-{n}", NS, AGENT, node="node-a", ip=self.pod_host(n))
            self.pods += 1
            while time.monotonic() - started < WAIT:
                self.probe.send(b"probe:1|c")
                if select.select([sink], [], [], PROBE_EVERY)[0]:
                    return time.monotonic() - started
        return None

    def swap_config(self, k: int, echo_port: int) -> float | None:
        """Swap in a config whose tcp route `swap` selects pod swap-k on `echo_port`; seconds until it answers."""
        route = f"  - {{name: swap, port: {echo_port}, protocol: tcp, selector: app=swap-{k}, namespace: {NS}}}\n"
        started = time.monotonic()
        self.sidecar.configmap.write(self.sidecar.with_health(self.base + route))
        while time.monotonic() - started < WAIT:
            if _answers(echo_port):
                return time.monotonic() - started
            time.sleep(0.002)
        return None


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as conn:
            conn.sendall(b"x")
            return conn.recv(100) == f"{SWAP_HOST}:x".encode()
    except OSError:
        return False


def _series(label: str, rig: Rig, count: int, change: Callable[[int], float | None], isolated: bool) -> Series:
    delays, timeouts = [], 0
    before = rig.reloads()
    for k in range(count):
        delay = change(k)
        if delay is None:
            timeouts += 1
        delays.append(WAIT if delay is None else delay)
        if isolated:
            rig.settle()
    rig.settle()
    print(f"  {label}: median {ms(median(delays))}, p99 {ms(quantile(delays, 0.99))}, max {ms(max(delays))}",
          flush=True)
    return Series(label, delays, rig.reloads() - before, timeouts)


def _plot(series: Sequence[Series]) -> Callable[[Axes], None]:
    def plot(ax: Axes) -> None:
        for s in series:
            xs = sorted(d * 1000 for d in s.delays)
            ax.step([0.0, *xs], [0.0, *((i + 1) / len(xs) for i in range(len(xs)))], where="post",
                    label=f"{s.label} (n={len(xs)})")
        for target, label in ((CONVERGENCE_TARGET, "pod target"), (SWAP_TARGET, "swap target")):
            ax.axvline(target * 1000, color="grey", linestyle=":", linewidth=1)
            ax.text(target * 1000 + 6, 1.02, label, fontsize=7, color="grey")
        ax.set_xlim(0, max(SWAP_TARGET * 1000 * 1.1, max(d for s in series for d in s.delays) * 1000 * 1.05))
        ax.set_ylim(0, 1.08)
        ax.set_xlabel("ms from the change to the first traffic at the new backend")
        ax.set_ylabel("fraction of changes")
        ax.set_title("Convergence (cumulative)", pad=14)
        ax.legend(fontsize=7, loc="center right")
    return plot


def run(quick: bool) -> CaseResult:
    changes, swaps = (20, 8) if quick else (50, 25)
    with ExitStack() as stack:
        rig = Rig(stack)
        echoes = []
        for k in range(swaps):
            rig.api.add_pod(f"swap-{k}", NS, {"app": f"swap-{k}"}, node="node-a", ip=SWAP_HOST)
            echoes.append(TcpEcho(SWAP_HOST, free_port(SWAP_HOST)))
            stack.callback(echoes[-1].close)
        rig.settle()
        isolated = _series("pod replaced, isolated", rig, changes, lambda k: rig.replace_pod(), True)
        back_to_back = _series("pod replaced, back-to-back", rig, changes, lambda k: rig.replace_pod(), False)
        swapped = _series("config swap, new route", rig, swaps, lambda k: rig.swap_config(k, echoes[k].address[1]),
                          True)
    series = [isolated, back_to_back, swapped]
    rows = [[s.label, str(len(s.delays)), ms(median(s.delays)), ms(quantile(s.delays, 0.99)), ms(max(s.delays)),
             f"{s.reloads / len(s.delays):.2f}", str(s.timeouts)] for s in series]
    about = (f"`proxyctl run` as a process against the test API server. **Pod replaced**: the agent pod is deleted and "
             f"a ready one created at a new address (127.0.0.{FIRST_POD_HOST}, .{FIRST_POD_HOST + 1}, ...), timed "
             f"from the API change to the first probe datagram (one every {PROBE_EVERY * 1000:g} ms) arriving at the "
             "new address. *Isolated*: each change waits until the previous one has settled (one nginx worker left, "
             "no reload for 200 ms). *Back-to-back*: the next change follows the first datagram at once, so nginx's "
             "master is still inside the 100 ms it sleeps after a reload before retiring old workers, and the new "
             "reload waits for it. **Config swap**: a ConfigMap-style `..data` symlink swap that moves a tcp route to "
             "a new port and a new selector (a new watch must list), timed to the first echo through the new port. "
             f"A change not seen within {WAIT:g} s counts as {WAIT:g} s.")
    return CaseResult(
        "convergence", "Convergence", about,
        tables=[Table(["change", "n", "median", "p99", "max", "reloads per change", "not seen in 5 s"], rows,
                      "lrrrrrr")],
        targets=[Target(f"pod replaced -> first datagram at the new pod, p99 < {ms(CONVERGENCE_TARGET)} (isolated)",
                        f"p99 {ms(quantile(isolated.delays, 0.99))} (back-to-back: "
                        f"{ms(quantile(back_to_back.delays, 0.99))})",
                        quantile(isolated.delays, 0.99) < CONVERGENCE_TARGET),
                 Target(f"config swap -> new route answering, p99 < {ms(SWAP_TARGET)}",
                        f"p99 {ms(quantile(swapped.delays, 0.99))}", quantile(swapped.delays, 0.99) < SWAP_TARGET)],
        plot=_plot(series))
