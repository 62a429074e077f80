"""2,000 DogStatsD clients through nginx: does every datagram arrive?

Three contenders run side by side on the same nginx binary, alternating within each repeat so
that a noisy box shifts them all alike:

  direct    clients send straight to the sink: the ceiling of this load generator and sink;
  proxyctl  nginx on the config `proxyctl.render.render` produces for one udp route;
  original  nginx on the kube-collocated-pod-proxy image's config (`proxy_responses 1`,
            `proxy_timeout 1s`, 1024 worker_connections), made runnable unprivileged on loopback.

    python -m bench.udp_many_clients [--rates 10000,30000,60000] [--seconds 3] [--clients 2000] [--repeats 3]
                                     [--senders N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager, Sequence

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

LISTEN_HOST = "127.0.0.1"
SINK_HOST = "127.0.0.2"
CONTENDERS = ("direct", "proxyctl", "original")

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
    config = load_config(f"routes:\n  - {{name: dogstatsd, port: {port}, protocol: udp, selector: app=datadog-agent}}\n")
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
    return (f"{trial.contender:9} {trial.rate:>7,}/s  delivered {trial.delivered:>8,}/{trial.sent.sent:<8,} "
            f"{trial.fraction:8.2%}  sent at {trial.sent.rate:>7,.0f}/s  drops: nginx socket {trial.listen_drops:,}, "
            f"sink socket {trial.sink_drops:,}" + (f"  nginx: {log}" if log else ""))


def print_table(trials: Sequence[Trial], rates: Sequence[int], repeats: int) -> None:
    print(f"\nMedian of {repeats} repeat(s) per cell; delivered = datagrams at the sink / datagrams sent.")
    header = (f"{'rate/s':>8}  {'contender':9}  {'delivered':>9}  {'sent/s':>8}  {'lost@nginx sock':>15}  "
              f"{'lost@sink sock':>14}  nginx log, warn and worse")
    print(header)
    print("-" * len(header))
    short: list[str] = []
    for rate in rates:
        for contender in CONTENDERS:
            cell = [t for t in trials if t.rate == rate and t.contender == contender]
            if not cell:
                continue
            messages = {m for t in cell for m in t.nginx_log}
            log = "; ".join(f"{statistics.median(t.nginx_log.get(m, 0) for t in cell):,.0f} x {m}"
                            for m in sorted(messages))
            print(f"{rate:>8,}  {contender:9}  {statistics.median(t.fraction for t in cell):>9.2%}  "
                  f"{statistics.median(t.sent.rate for t in cell):>8,.0f}  "
                  f"{statistics.median(t.listen_drops for t in cell):>15,.0f}  "
                  f"{statistics.median(t.sink_drops for t in cell):>14,.0f}  {log or '-'}")
            short += [f"{contender} at {rate:,}/s: generator sent {t.sent.attempted:,} of {t.sent.planned:,} at "
                      f"{t.sent.rate:,.0f}/s ({t.sent.failed:,} send errors)" for t in cell if not t.sent.reached]
    print(f"\nlost@... = kernel drops at that socket (full receive buffer, /proc/net/udp); sink SO_RCVBUF "
          f"granted: {sorted({t.sink_rcvbuf for t in trials})} bytes (Linux grants 2 x min(request, rmem_max)).")
    if short:
        print("\nWARNING: the load generator did NOT reach the requested rate in these trials:")
        print("\n".join(f"  {line}" for line in short))
    else:
        print("\nThe load generator reached every requested rate (>= 98%, all datagrams sent).")


def _rates(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.udp_many_clients", description=__doc__.split("\n")[0])
    parser.add_argument("--rates", type=_rates, default=[10000], help="datagrams/s, comma separated (10000)")
    parser.add_argument("--seconds", type=float, default=3.0, help="sending time per trial (3)")
    parser.add_argument("--clients", type=int, default=2000, help="client sockets = distinct source ports (2000)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of direct, proxyctl, original (3)")
    parser.add_argument("--senders", type=int, default=0,
                        help="sender processes; 0 = 1 up to 20000/s, else 2 (0)")
    args = parser.parse_args(argv)
    if (not args.rates or not all(1 <= rate <= 200_000 for rate in args.rates) or not 1 <= args.clients <= 10_000
            or not 0 < args.seconds <= 30 or not 1 <= args.repeats <= 20 or not 0 <= args.senders <= 8):
        parser.error("keep --rates in 1..200000, --clients in 1..10000, --seconds in (0, 30], --repeats in 1..20, "
                     "--senders in 0..8")

    fd_limit = raise_fd_limit(args.clients + 256)
    module = stream_module()
    nginx_version = subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip()
    trials: list[Trial] = []
    started = time.monotonic()
    with rmem_max_at_least(SINK_RCVBUF) as rmem:
        print(f"{nginx_version}; {os.cpu_count()} CPUs; {args.clients:,} clients x {len(DOGSTATSD_DATAGRAM)}-byte "
              f"datagrams for {args.seconds:g} s; RLIMIT_NOFILE {fd_limit}")
        print(rmem.describe(SINK_RCVBUF))
        for rate in args.rates:
            senders = args.senders or (1 if rate <= 20000 else 2)
            for _ in range(args.repeats):
                for contender in CONTENDERS:
                    trial = run_trial(contender, rate, args.seconds, args.clients, senders, module)
                    trials.append(trial)
                    print(_describe(trial), flush=True)
    print_table(trials, args.rates, args.repeats)
    print(f"\n{len(trials)} trials in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
