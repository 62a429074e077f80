"""Case udp-many: 2,000 DogStatsD clients through nginx. Does every datagram arrive?

Three contenders on the same nginx binary, alternating within each repeat so that a noisy
box shifts them all alike:

  direct    clients send straight to the sink: the ceiling of this load generator and sink;
  proxyctl  nginx on the config `proxyctl.render.render` produces for one udp route;
  original  nginx on the kube-collocated-pod-proxy image's config (`proxy_responses 1`,
            `proxy_timeout 1s`, 1024 worker_connections), made runnable unprivileged on loopback.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, ContextManager, Sequence

from bench.report import CaseResult, Table, Target, median
from bench.udpload import (
    DOGSTATSD_DATAGRAM,
    SINK_RCVBUF,
    CountingSink,
    RunningNginx,
    SendResult,
    nginx_running,
    raise_fd_limit,
    rmem_max_at_least,
    send_paced,
    udp_drops,
)
from proxyctl.backend import Backend
from proxyctl.config import load_config
from proxyctl.nginx import stream_module
from proxyctl.render import render
from tests.support import free_port

if TYPE_CHECKING:
    from matplotlib.axes import Axes

LISTEN_HOST = "127.0.0.1"
SINK_HOST = "127.0.0.2"
CONTENDERS = ("direct", "proxyctl", "original")
CLIENTS = 2000
RATES = (10_000, 30_000, 60_000)
TARGET_RATE = 30_000
ABOUT = ("DogStatsD-sized datagrams ({size} bytes) from {clients:,} client sockets (one source port each, as many "
         "application processes would), paced at each rate for {seconds:g} s, {repeats} round(s) of the three "
         "contenders: **direct** to the sink (the ceiling of the generator and sink), **proxyctl**'s rendered config, "
         "and the **original** image's config (`proxy_responses 1`, `proxy_timeout 1s`, 1024 worker_connections), "
         "all on the same nginx. *Delivered* is datagrams counted at the sink over datagrams the kernel accepted "
         "from the clients; the drop columns are the kernel's counters for the receiving sockets.")

# The original image's nginx.conf, plus what it takes to run it here: the module line, and
# pid and log in our state directory like proxyctl's template, so it needs no root.
ORIGINAL_CONFIG = """\
{load_module}daemon off;
pid "{state_dir}/nginx.pid";
error_log stderr notice;
worker_processes 1;
events {{ worker_connections 1024; }}
stream {{ server {{ listen {listen}:{port} udp; proxy_pass {sink}:{port}; proxy_timeout 1s; proxy_responses 1; }} }}
"""


def proxyctl_config(port: int, module: str | None) -> Callable[[Path], str]:
    config = load_config(f"routes:\n  - {{name: dogstatsd, port: {port}, protocol: udp, selector: app=dd-agent}}\n")
    endpoints = {"dogstatsd": [Backend(SINK_HOST, port)]}
    return lambda state_dir: render(config, endpoints, state_dir, module)


def original_config(port: int, module: str | None) -> Callable[[Path], str]:
    load_module = f"load_module {module};\n" if module else ""
    return lambda state_dir: ORIGINAL_CONFIG.format(
        load_module=load_module, state_dir=state_dir, listen=LISTEN_HOST, sink=SINK_HOST, port=port)


@dataclass(frozen=True)
class Trial:
    """One contender at one rate: what went out, what arrived, and where the rest was lost."""

    contender: str
    rate: int
    sent: SendResult
    delivered: int
    listen_drops: int
    sink_drops: int
    sink_rcvbuf: int
    nginx_log: dict[str, int]

    @property
    def fraction(self) -> float:
        return self.delivered / self.sent.sent if self.sent.sent else 0.0


def run_trial(contender: str, rate: int, seconds: float, clients: int, senders: int, module: str | None) -> Trial:
    """Fresh port, sink and nginx for each trial, so nothing left over from one counts in the next."""
    port = free_port(LISTEN_HOST)
    sink_address = (SINK_HOST, port)
    nginx: ContextManager[RunningNginx | None]
    if contender == "direct":
        target, nginx = sink_address, nullcontext()
    else:
        make = proxyctl_config if contender == "proxyctl" else original_config
        target, nginx = (LISTEN_HOST, port), nginx_running(make(port, module))
    with CountingSink(sink_address) as sink, nginx as running:
        sent = send_paced(target, rate, seconds, clients, processes=senders)
        delivered = sink.settle(sent.sent)
        listen_drops = udp_drops(target) if running else 0
        sink_drops = udp_drops(sink_address)
        size = sink.bytes
        log = dict(running.log.tally) if running else {}
    if size != delivered * len(DOGSTATSD_DATAGRAM):
        raise RuntimeError(f"{contender}: {size} bytes for {delivered} datagrams: datagrams were cut or merged")
    return Trial(contender, rate, sent, delivered, listen_drops, sink_drops, sink.rcvbuf, log)


def _describe(trial: Trial) -> str:
    log = "; ".join(f"{n} x {message}" for message, n in sorted(trial.nginx_log.items(), key=lambda kv: -kv[1]))
    return (f"  {trial.contender:9} {trial.rate:>7,}/s  delivered {trial.delivered:>8,}/{trial.sent.sent:<8,} "
            f"{trial.fraction:8.2%}  sent at {trial.sent.rate:>7,.0f}/s  drops: nginx socket {trial.listen_drops:,}, "
            f"sink socket {trial.sink_drops:,}" + (f"  nginx: {log}" if log else ""))


def _cell(trials: Sequence[Trial], rate: int, contender: str) -> list[Trial]:
    return [t for t in trials if t.rate == rate and t.contender == contender]


def _table(trials: Sequence[Trial], rates: Sequence[int]) -> Table:
    rows = []
    for rate in rates:
        direct = median([t.fraction for t in _cell(trials, rate, "direct")])
        for contender in CONTENDERS:
            cell = _cell(trials, rate, contender)
            messages = sorted({m for t in cell for m in t.nginx_log})
            log = "; ".join(f"{median([t.nginx_log.get(m, 0) for t in cell]):,.0f} x {m}" for m in messages)
            fraction = median([t.fraction for t in cell])
            rows.append([f"{rate:,}", contender, f"{fraction:.2%}", f"{fraction / direct:.3f}" if direct else "-",
                         f"{median([t.sent.rate for t in cell]):,.0f}",
                         f"{median([t.listen_drops for t in cell]):,.0f}",
                         f"{median([t.sink_drops for t in cell]):,.0f}", log or "-"])
    return Table(["rate/s", "contender", "delivered", "x direct", "sent/s", "lost at nginx socket",
                  "lost at sink socket", "nginx warnings and worse"], rows, "rlrrrrrl")


def _plot(trials: Sequence[Trial], rates: Sequence[int]) -> Callable[[Axes], None]:
    def plot(ax: Axes) -> None:
        width = 0.8 / len(CONTENDERS)
        for k, contender in enumerate(CONTENDERS):
            values = [100 * median([t.fraction for t in _cell(trials, rate, contender)]) for rate in rates]
            bars = ax.bar([i + (k - 1) * width for i in range(len(rates))], values, width, label=contender)
            ax.bar_label(bars, fmt="%.1f", fontsize=7)
        ax.set_xticks(range(len(rates)), [f"{rate // 1000}k/s" for rate in rates])
        ax.set_ylim(0, 110)
        ax.set_ylabel("delivered %")
        ax.set_title(f"UDP, {CLIENTS:,} clients: datagrams delivered")
        ax.legend(fontsize=8, loc="lower left")
    return plot


def run(quick: bool) -> CaseResult:
    """Each rate, `repeats` rounds of direct, proxyctl, original."""
    rates, seconds, repeats = RATES, (1.5 if quick else 3.0), (1 if quick else 3)
    raise_fd_limit(CLIENTS + 256)
    module = stream_module()
    trials: list[Trial] = []
    with rmem_max_at_least(SINK_RCVBUF) as rmem:
        print(f"  {rmem.describe(SINK_RCVBUF)}")
        for rate in rates:
            senders = 1 if rate <= 20000 else 2
            for _ in range(repeats):
                for contender in CONTENDERS:
                    trial = run_trial(contender, rate, seconds, CLIENTS, senders, module)
                    trials.append(trial)
                    print(_describe(trial), flush=True)
    result = CaseResult(
        "udp-many", "UDP, many clients", ABOUT.format(clients=CLIENTS, size=len(DOGSTATSD_DATAGRAM), seconds=seconds,
                                                      repeats=repeats),
        tables=[_table(trials, rates)], plot=_plot(trials, rates))
    result.notes.append(f"{rmem.describe(SINK_RCVBUF)}; sink SO_RCVBUF granted "
                        f"{sorted({t.sink_rcvbuf for t in trials})} bytes (Linux grants 2 x min(request, rmem_max)).")
    short = [f"{t.contender} at {t.rate:,}/s: the generator sent {t.sent.attempted:,} of {t.sent.planned:,} at "
             f"{t.sent.rate:,.0f}/s ({t.sent.failed:,} send errors)" for t in trials if not t.sent.reached]
    result.notes.append("The load generator did NOT reach the requested rate in: " + "; ".join(short) if short else
                        "The load generator reached every requested rate (>= 98 %, every datagram sent).")
    at = {c: median([t.fraction for t in _cell(trials, TARGET_RATE, c)]) for c in CONTENDERS}
    result.targets.append(Target(
        f"proxyctl delivers >= 99.9 % at {TARGET_RATE // 1000}k datagrams/s",
        f"proxyctl {at['proxyctl']:.2%} (original config {at['original']:.2%}, direct {at['direct']:.2%})",
        at["proxyctl"] >= 0.999))
    return result
