"""A DaemonSet rolling update of a node agent, played on the test API server under traffic.

Each pod of the DaemonSet is a 127.0.0.x address running the real statsd daemon (UDP) and
a fluent forward receiver (TCP); the application side is the DogStatsd client at 1,000
datagrams/s and fluent-logger with steady records, both through `proxyctl run` and real
nginx. The rollout marks its phases as it goes, and every datagram and record counts in
the phase it was sent in, so the table says where anything was lost.
"""

from __future__ import annotations

import socket
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from tests.agents import ForwardAgent, Load, StatsdAgent, dogstatsd_load, fluent_load
from tests.harness import Proxyctl
from tests.kubeapi import KubeApiServer
from tests.support import free_port, wait_for

NS = "monitoring"
AGENT = {"app": "node-agent"}
OLD, NEW, REMOTE = "127.0.0.2", "127.0.0.3", "127.0.0.4"  # the pods' IPs; REMOTE is on node-b
UDP_RATE, TCP_RATE = 1000.0, 50.0
Strategy = Literal["maxUnavailable", "maxSurge"]


@dataclass(frozen=True)
class Timing:
    """Seconds each phase lasts."""

    steady: float = 1.0
    terminating: float = 2.0  # the old pod drains: deletionTimestamp set, still Ready, agent running
    exiting: float = 0.3  # the old pod is no longer Ready; its agent still runs, then exits
    gap: float = 2.5  # maxUnavailable: the old pod is gone and the new one not there yet
    after: float = 1.5


@dataclass(frozen=True)
class Phase:
    name: str
    udp_sent: int
    udp_received: int
    tcp_sent: int
    tcp_received: int

    @property
    def udp_lost(self) -> int:
        return self.udp_sent - self.udp_received

    @property
    def tcp_lost(self) -> int:
        return self.tcp_sent - self.tcp_received


@dataclass
class Outcome:
    phases: list[Phase]
    udp_lost_at: list[float] = field(default_factory=list)  # send times of lost datagrams, from the start
    tcp_lost_at: list[float] = field(default_factory=list)  # and of lost records
    marks: dict[str, float] = field(default_factory=dict)  # phase name → its start, from the start
    log: str = ""

    def lost(self, protocol: str) -> int:
        return sum(p.udp_lost if protocol == "udp" else p.tcp_lost for p in self.phases)


class Node:
    """The agents of one pod: statsd and a forward receiver on the pod's IP."""

    def __init__(self, ip: str, udp_port: int, tcp_port: int, workdir: Path) -> None:
        self.statsd = StatsdAgent(ip, udp_port, workdir)
        self.forward = ForwardAgent(ip, tcp_port)

    def stop(self) -> None:
        self.forward.stop()
        self.statsd.stop()


class Rollout:
    """One sidecar (this checkout's proxyctl, or the one at `source`) and the pods it routes to."""

    def __init__(self, stack: ExitStack, root: Path, source: Path | None, policy: str, api_delay: float) -> None:
        self.stack, self.root, self.api_delay = stack, root, api_delay
        root.mkdir(parents=True, exist_ok=True)
        self.api = KubeApiServer()
        self.api.start()
        stack.callback(self.api.stop)
        self.udp_target, self.tcp_target = free_port(), free_port()
        self.udp_port, self.tcp_port = free_port(), free_port()
        self.config = (
            "routes:\n"
            f"  - {{name: statsd, port: {self.udp_port}, protocol: udp, selector: app=node-agent, namespace: {NS},"
            f" targetPort: {self.udp_target}, whenNoLocalPod: {policy}}}\n"
            f"  - {{name: fluent, port: {self.tcp_port}, protocol: tcp, selector: app=node-agent, namespace: {NS},"
            f" targetPort: {self.tcp_target}, whenNoLocalPod: {policy}}}\n")
        # PYTHONSAFEPATH: the working directory's own proxyctl must not shadow the one at `source`.
        self.env = {"PYTHONPATH": str(source), "PYTHONSAFEPATH": "1"} if source is not None else {}
        self.agents: list[Node] = []
        self.started = 0.0
        self.marks: dict[str, float] = {}

    def agent(self, ip: str) -> Node:
        node = Node(ip, self.udp_target, self.tcp_target, self.root)
        self.stack.callback(node.stop)
        self.agents.append(node)
        return node

    def sidecar(self, wait_ready: bool = True) -> Proxyctl:
        sidecar = Proxyctl(self.root / "proxyctl", self.api, self.config, self.env)
        self.stack.callback(sidecar.kill)
        return sidecar.start(wait_ready)

    def mark(self, phase: str) -> None:
        self.marks[phase] = time.monotonic()

    def hold(self, phase: str, seconds: float) -> None:
        """Let `phase` last `seconds` from its mark."""
        time.sleep(max(0.0, self.marks[phase] + seconds - time.monotonic()))

    def received(self, protocol: str) -> set[int]:
        return set().union(*((a.statsd.seqs if protocol == "udp" else a.forward.seqs) for a in self.agents))

    def count(self, udp: Load, tcp: Load, sidecar: Proxyctl) -> Outcome:
        """Stop the clients, let what is in flight arrive, and count per phase."""
        udp.stop()
        tcp.stop()  # fluent-logger sends what it still holds
        for protocol, load in (("udp", udp), ("tcp", tcp)):
            try:
                wait_for(lambda: len(self.received(protocol)) == len(load.sent), 2, what=f"{protocol} in flight")
            except AssertionError:
                pass  # lost for good: the table says where
        names = list(self.marks)
        bounds = [self.marks[n] for n in names] + [float("inf")]
        udp_seen, tcp_seen = self.received("udp"), self.received("tcp")
        phases = []
        for i, name in enumerate(names):
            def within(load: Load) -> list[int]:
                return [n for n, at in enumerate(load.sent) if bounds[i] <= at < bounds[i + 1]]

            udp_in, tcp_in = within(udp), within(tcp)
            phases.append(Phase(name, len(udp_in), len(udp_seen.intersection(udp_in)),
                                len(tcp_in), len(tcp_seen.intersection(tcp_in))))
        start = names and self.marks[names[0]]
        return Outcome(phases, [at - start for n, at in enumerate(udp.sent) if n not in udp_seen],
                       [at - start for n, at in enumerate(tcp.sent) if n not in tcp_seen],
                       {n: at - start for n, at in self.marks.items()}, sidecar.log())


def play(root: Path, strategy: Strategy, policy: str = "reject", api_delay: float = 0.0,
         source: Path | None = None, timing: Timing = Timing()) -> Outcome:
    """Roll the agent DaemonSet on node-a once, under traffic, and count what arrived per phase.

    `api_delay`: every API request made after start-up is answered this much later.
    """
    with ExitStack() as stack:
        rollout = Rollout(stack, root, source, policy, api_delay)
        api = rollout.api
        old = rollout.agent(OLD)
        api.add_pod("agent-old", NS, AGENT, node="node-a", ip=OLD)
        if policy == "anyNode":
            rollout.agent(REMOTE)
            api.add_pod("agent-remote", NS, AGENT, node="node-b", ip=REMOTE)
        sidecar = rollout.sidecar()
        api.delay = api_delay
        udp, tcp = dogstatsd_load(rollout.udp_port, UDP_RATE), fluent_load(rollout.tcp_port, TCP_RATE)
        stack.callback(udp.stop)
        rollout.mark("steady")
        rollout.hold("steady", timing.steady)
        if strategy == "maxSurge":
            rollout.mark("new pod starting")
            rollout.agent(NEW)
            api.add_pod("agent-new", NS, AGENT, node="node-a", ip=NEW, ready=False)
            rollout.hold("new pod starting", 0.5)
            rollout.mark("new pod Ready")
            api.update_pod(NS, "agent-new", ready=True)
            rollout.hold("new pod Ready", timing.steady)
        rollout.mark("old pod terminating, Ready")
        api.update_pod(NS, "agent-old", terminating=True)  # SIGTERM: the agent drains, still Ready
        rollout.hold("old pod terminating, Ready", timing.terminating)
        rollout.mark("old pod not Ready, agent exiting")
        api.update_pod(NS, "agent-old", ready=False)  # its readiness fails as it shuts down
        rollout.hold("old pod not Ready, agent exiting", timing.exiting)
        gone = "no agent pod" if strategy == "maxUnavailable" else "old pod gone"
        rollout.mark(gone)
        old.stop()
        api.delete_pod(NS, "agent-old")  # the kubelet deletes the pod once its containers exited
        if strategy == "maxUnavailable":
            rollout.agent(NEW)  # starting; its pod is not there yet
            rollout.hold(gone, timing.gap)
            rollout.mark("new pod Ready")
            api.add_pod("agent-new", NS, AGENT, node="node-a", ip=NEW)
            rollout.hold("new pod Ready", timing.after)
        else:
            rollout.hold(gone, timing.after)
        return rollout.count(udp, tcp, sidecar)


@dataclass(frozen=True)
class StartUp:
    ready_after: float | None  # seconds from start to /readyz 200; None: not within the wait
    traffic_after: float | None  # seconds from start to the first datagram at the other node's agent
    log: str


def start_without_local_pod(root: Path, source: Path | None = None, wait: float = 5.0) -> StartUp:
    """anyNode, started on a node with no matching pod: how soon another node's agent serves."""
    with ExitStack() as stack:
        rollout = Rollout(stack, root, source, "anyNode", 0.0)
        remote = rollout.agent(REMOTE)
        rollout.api.add_pod("agent-remote", NS, AGENT, node="node-b", ip=REMOTE)
        started = time.monotonic()
        sidecar = rollout.sidecar(wait_ready=False)
        # One socket, bound once: a client that reopens its socket after each refusal could
        # take the route's port for itself before nginx binds it.
        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        stack.callback(probe.close)
        ready_at = traffic_at = None
        while time.monotonic() - started < wait and (ready_at is None or traffic_at is None):
            probe.sendto(b"rollout:1|c|#seq:0", ("127.0.0.1", rollout.udp_port))
            if ready_at is None and sidecar.get("/readyz")[0] == 200:
                ready_at = time.monotonic() - started
            if traffic_at is None and remote.statsd.seqs:
                traffic_at = time.monotonic() - started
            time.sleep(0.01)
        return StartUp(ready_at, traffic_at, sidecar.log())
