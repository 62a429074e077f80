"""Case udp-one: the highest rate one client socket can send through proxyctl's nginx with no loss.

The rate steps up until a contender loses a datagram (or the generator falls short of the
rate, which bounds the direct path); both contenders step together, in alternating order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

from bench.report import CaseResult, Table, median
from bench.udp_many_clients import Trial, run_trial
from bench.udpload import DOGSTATSD_DATAGRAM, SINK_RCVBUF, rmem_max_at_least
from proxyctl.nginx import stream_module

if TYPE_CHECKING:
    from matplotlib.axes import Axes

CONTENDERS = ("direct", "proxyctl")
RATES = (5_000, 10_000, 15_000, 20_000, 25_000, 30_000, 40_000, 50_000, 60_000, 80_000, 100_000, 120_000,
         150_000, 200_000, 250_000, 300_000)
ABOUT = ("One client socket sends {size}-byte datagrams for {seconds:g} s at each step of "
         "{first}/s ... {last}/s; a contender stops at its first step that loses a datagram, or at which the "
         "generator cannot keep the rate. The figure is the last step with every datagram delivered, median of "
         "{repeats} round(s).")


@dataclass(frozen=True)
class Ceiling:
    """One contender's climb in one round: the last clean step and what ended the climb."""

    contender: str
    rate: int
    stopped_by: str
    lost: bool  # False: the generator, not the contender, ended the climb


def _climb(seconds: float, module: str | None, round_number: int) -> list[Ceiling]:
    clean = {c: 0 for c in CONTENDERS}
    stopped: dict[str, tuple[str, bool]] = {}
    for step, rate in enumerate(RATES):
        order = CONTENDERS if (step + round_number) % 2 == 0 else CONTENDERS[::-1]
        for contender in order:
            if contender in stopped:
                continue
            trial = run_trial(contender, rate, seconds, 1, 1, module)
            print(f"  {contender:9} {rate:>8,}/s  delivered {trial.delivered:,}/{trial.sent.sent:,}  "
                  f"sent at {trial.sent.rate:,.0f}/s", flush=True)
            reason = _stop_reason(trial)
            if reason:
                stopped[contender] = reason
            else:
                clean[contender] = rate
        if len(stopped) == len(CONTENDERS):
            break
    return [Ceiling(c, clean[c], *stopped.get(c, (f"none up to {RATES[-1]:,}/s", False))) for c in CONTENDERS]


def _stop_reason(trial: Trial) -> tuple[str, bool] | None:
    """Why the climb ends at this trial, and whether by a loss; None: it goes on."""
    if not trial.sent.reached:
        return f"the generator sent only {trial.sent.rate:,.0f}/s", False
    lost = trial.sent.sent - trial.delivered
    if lost:
        where = f"{trial.listen_drops:,} at nginx's socket, " if trial.contender != "direct" else ""
        return f"{trial.rate:,}/s: {lost:,} lost ({where}{trial.sink_drops:,} at the sink's)", True
    return None


def _plot(ceilings: Sequence[Ceiling]) -> Callable[[Axes], None]:
    def plot(ax: Axes) -> None:
        values = [median([c.rate for c in ceilings if c.contender == name]) / 1000 for name in CONTENDERS]
        bars = ax.barh(CONTENDERS, values, color=["tab:blue", "tab:orange"])
        labels = [f" {value:.0f}k/s" + ("" if any(c.lost for c in ceilings if c.contender == name)
                                         else "\n (the bench's ceiling)") for name, value in zip(CONTENDERS, values)]
        ax.bar_label(bars, labels=labels, fontsize=8)
        ax.set_xlabel("datagrams/s (thousands)")
        ax.set_title("UDP, one client: highest rate with zero loss")
        ax.invert_yaxis()
        ax.set_xlim(0, max(values) * 1.4 or 1)
    return plot


def run(quick: bool) -> CaseResult:
    seconds, repeats = (1.0, 1) if quick else (2.0, 3)
    module = stream_module()
    ceilings: list[Ceiling] = []
    with rmem_max_at_least(SINK_RCVBUF):
        for round_number in range(repeats):
            ceilings += _climb(seconds, module, round_number)
    direct = median([c.rate for c in ceilings if c.contender == "direct"])
    rows = []
    for name in CONTENDERS:
        mine = [c for c in ceilings if c.contender == name]
        best = median([c.rate for c in mine])
        rows.append([name, f"{best:,.0f}/s", f"{best / direct:.2f}" if direct else "-",
                     ", ".join(f"{c.rate:,}" for c in mine), "; ".join(sorted({c.stopped_by for c in mine}))])
    about = ABOUT.format(size=len(DOGSTATSD_DATAGRAM), seconds=seconds, first=f"{RATES[0]:,}", last=f"{RATES[-1]:,}",
                         repeats=repeats)
    return CaseResult("udp-one", "UDP, one client", about,
                      tables=[Table(["contender", "zero-loss rate", "x direct", "per round", "what stopped the climb"],
                                    rows, "lrrrl")],
                      plot=_plot(ceilings))
