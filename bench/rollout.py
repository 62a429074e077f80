"""Case rollout: what a DaemonSet rolling update of the agent costs, before and after, in one run.

tests/rollout.py plays the rollout (real statsd from npm, the DogStatsd client at 1,000
datagrams/s, fluent-logger without acks, the test API server); this case plays each
scenario with the proxyctl of `BEFORE` (exported from git into a temporary directory) and
with this checkout's, and puts the two side by side, phase by phase.
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

from bench.report import CaseResult, Table, Target
from tests.rollout import UDP_RATE, Outcome, Phase, StartUp, Timing, play, start_without_local_pod

BEFORE = "087c0c6"  # main before terminating pods served, TCP refused and anyNode fell back in time
REPOSITORY = Path(__file__).resolve().parent.parent
SCENARIOS = [  # (title, strategy, whenNoLocalPod, API delay)
    ("maxUnavailable, reject", "maxUnavailable", "reject", 0.0),
    ("maxSurge, reject", "maxSurge", "reject", 0.0),
    ("maxUnavailable, anyNode, API 300 ms late", "maxUnavailable", "anyNode", 0.3),
]


def export(revision: str, into: Path) -> Path | None:
    """The sources at `revision`, from this repository's git history; None when there is none."""
    archive = subprocess.run(["git", "-C", str(REPOSITORY), "archive", revision], capture_output=True)
    if archive.returncode != 0:
        return None
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def _cell(phase: Phase | None, protocol: str) -> str:
    if phase is None:
        return "-"
    sent, received = (phase.udp_sent, phase.udp_received) if protocol == "udp" else (phase.tcp_sent, phase.tcp_received)
    return f"{sent} / {received} / {sent - received}"


def _rows(title: str, before: Outcome | None, after: Outcome) -> list[list[str]]:
    earlier = {p.name: p for p in before.phases} if before else {}
    rows = []
    for phase in after.phases:
        old = earlier.get(phase.name)
        rows.append([f"{title}: {phase.name}", _cell(old, "udp"), _cell(phase, "udp"), _cell(old, "tcp"),
                     _cell(phase, "tcp")])
    return rows


def _seconds(value: float | None, wait: float) -> str:
    return f"{value:.2f} s" if value is not None else f"not within {wait:g} s"


def run(quick: bool) -> CaseResult:
    timing = Timing(steady=0.5, after=1.0) if quick else Timing()
    wait = 5.0
    rows, targets, notes = [], [], []
    with tempfile.TemporaryDirectory(prefix="bench-rollout-") as temporary:
        root = Path(temporary)
        (root / "before").mkdir()
        source = export(BEFORE, root / "before")
        if source is None:
            notes.append(f"no git history here to export {BEFORE} from: the before column is empty")
        outcomes: dict[str, Outcome] = {}
        for i, (title, strategy, policy, delay) in enumerate(SCENARIOS):
            before = None
            if source is not None:
                before = play(root / f"{i}-before", strategy, policy, delay, source, timing)
            after = play(root / f"{i}-after", strategy, policy, delay, None, timing)
            outcomes[title] = after
            rows += _rows(title, before, after)
            print(f"  {title}: done", flush=True)
        starts: dict[str, StartUp | None] = {
            "before": start_without_local_pod(root / "start-before", source, wait) if source else None,
            "after": start_without_local_pod(root / "start-after", None, wait),
        }
    start_rows = [[label, _seconds(s.ready_after, wait), _seconds(s.traffic_after, wait)]
                  for label, s in starts.items() if s is not None]

    surge, slow = outcomes["maxSurge, reject"], outcomes["maxUnavailable, anyNode, API 300 ms late"]
    unavailable = outcomes["maxUnavailable, reject"]
    serving = {p.name: p for p in unavailable.phases}
    draining = serving["old pod terminating, Ready"]
    gap_from, gap_to = unavailable.marks["old pod not Ready, agent exiting"], unavailable.marks["new pod Ready"]
    outside = [at for at in unavailable.udp_lost_at if not gap_from <= at < gap_to + 0.25]
    started = starts["after"]
    assert started is not None
    targets += [
        Target("maxUnavailable, reject: 0 lost while the old pod terminates, Ready",
               f"UDP {draining.udp_lost}, TCP {draining.tcp_lost}", draining.udp_lost == draining.tcp_lost == 0),
        Target("maxUnavailable, reject: UDP lost only while no agent serves (+250 ms to reload)",
               f"{unavailable.lost('udp')} lost, {len(outside)} outside; the gap held "
               f"{(gap_to - gap_from) * UDP_RATE:.0f}", not outside),
        Target("maxUnavailable, reject: fluent-logger loses no record",
               f"{unavailable.lost('tcp')} lost", unavailable.lost("tcp") == 0),
        Target("maxSurge: 0 lost", f"UDP {surge.lost('udp')}, TCP {surge.lost('tcp')}",
               surge.lost("udp") == surge.lost("tcp") == 0),
        Target("anyNode, API 300 ms late: 0 lost", f"UDP {slow.lost('udp')}, TCP {slow.lost('tcp')}",
               slow.lost("udp") == slow.lost("tcp") == 0),
        Target("anyNode with no local pod at start: /readyz 200 and traffic at another node within 2 s",
               f"ready {_seconds(started.ready_after, wait)}, traffic {_seconds(started.traffic_after, wait)}",
               started.ready_after is not None and started.traffic_after is not None
               and max(started.ready_after, started.traffic_after) < 2.0),
    ]
    about = (f"A DaemonSet rolling update of the node agent, played on the test API server while the DogStatsd "
             f"client sends {UDP_RATE:,.0f} datagrams/s and fluent-logger (no acks) 50 records/s through "
             "`proxyctl run`. Each pod is a 127.0.0.x address running the statsd daemon from npm and a fluent "
             f"forward receiver. Phases: the old pod terminates but stays Ready for {timing.terminating:g} s, is "
             f"no longer Ready for {timing.exiting:g} s while its agent exits, then (maxUnavailable) no pod for "
             f"{timing.gap:g} s until the new one is Ready; with maxSurge the new pod is Ready first. "
             f"**before** is proxyctl at {BEFORE}, **after** this checkout, in the same run. "
             "Cells: sent / received / lost.")
    return CaseResult(
        "rollout", "Agent rollout", about,
        tables=[Table(["scenario: phase", "UDP before", "UDP after", "TCP before", "TCP after"], rows, "lrrrr"),
                Table(["anyNode, no local pod at start", "/readyz 200 after", "first datagram at node-b after"],
                      start_rows, "lrr")],
        targets=targets, notes=notes)
