"""UDP load on loopback: a paced many-socket sender, a counting sink, and nginx on any config.

The sender and the sink each run in their own processes so that Python's per-datagram cost
is spread over the cores instead of stealing the GIL from each other, and so that a sink
that falls behind shows up as kernel drops on its socket (counted here) rather than as a
slow sender. Everything stays on 127.0.0.0/8; every loop is bounded in count and in time.
"""

from __future__ import annotations

import ctypes
import ipaddress
import itertools
import logging
import multiprocessing
import multiprocessing.connection
import multiprocessing.synchronize
import re
import resource
import select
import socket
import tempfile
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.sharedctypes import RawArray
from pathlib import Path
from typing import Callable, Iterator

from proxyctl.nginx import Nginx

Address = tuple[str, int]

# A typical DogStatsD metric with tags: 100 bytes, like what an application's client sends.
DOGSTATSD_DATAGRAM = (b"app.requests.count:1|c|#env:prod,service:web,version:2.14.1,region:eu-west-1,"
                      b"pod:web-7d9f8b6c4-x2k9p")

SINK_RCVBUF = 8 << 20
RMEM_MAX = Path("/proc/sys/net/core/rmem_max")

# forkserver: children fork from a small single-threaded server, not from a caller that runs
# nginx's log-reader thread, so a lock held by that thread can never deadlock a child.
_MP = multiprocessing.get_context("forkserver")
_LOOPBACK = ipaddress.ip_network("127.0.0.0/8")


def _is_loopback(host: str) -> bool:
    """Only 127.0.0.0/8 may receive the bench's traffic."""
    return ipaddress.ip_address(host) in _LOOPBACK


# --- limits ------------------------------------------------------------------------------


def raise_fd_limit(wanted: int) -> int:
    """Raise RLIMIT_NOFILE to at least `wanted` if allowed (one fd per client socket); the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= wanted:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, max(hard, wanted)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


@dataclass(frozen=True)
class RmemMax:
    """net.core.rmem_max before and during the run: it caps every SO_RCVBUF request."""

    before: int
    now: int
    error: str | None = None

    def describe(self, wanted: int) -> str:
        if self.now > self.before:
            return f"net.core.rmem_max raised {self.before} -> {self.now} for this run (restored at exit)"
        if self.now >= wanted:
            return f"net.core.rmem_max = {self.now}, enough for {wanted}"
        return f"net.core.rmem_max = {self.now} < {wanted} and NOT raised ({self.error}); SO_RCVBUF is capped"


@contextmanager
def rmem_max_at_least(wanted: int) -> Iterator[RmemMax]:
    """Raise net.core.rmem_max to `wanted` (like `sysctl -w`) if permitted; put it back afterwards."""
    before = int(RMEM_MAX.read_text())
    error = None
    if before < wanted:
        try:
            RMEM_MAX.write_text(str(wanted))
        except OSError as exc:
            error = exc.strerror or str(exc)
    now = int(RMEM_MAX.read_text())
    try:
        yield RmemMax(before, now, error)
    finally:
        if now != before:
            RMEM_MAX.write_text(str(before))


def udp_drops(address: Address) -> int:
    """Datagrams the kernel dropped at the UDP socket(s) bound to `address` (full receive buffer)."""
    host, port = address
    local = f"{int.from_bytes(socket.inet_aton(host), 'little'):08X}:{port:04X}"
    drops = 0
    for line in Path("/proc/net/udp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == local:
            drops += int(fields[-1])
    return drops


# --- the sink ------------------------------------------------------------------------------


def _sink_main(address: Address, rcvbuf: int, counts: ctypes.Array[ctypes.c_longlong],
               ready: multiprocessing.connection.Connection, stop: multiprocessing.synchronize.Event) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.bind(address)
    sock.setblocking(False)
    ready.send(sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    buffer = bytearray(65536)
    recv_into = sock.recv_into
    datagrams = size = 0
    while not stop.is_set():
        try:
            # One syscall per datagram and no objects kept: the count is exact and cheap.
            while True:
                size += recv_into(buffer)
                datagrams += 1
                if not datagrams & 1023:
                    counts[0], counts[1] = datagrams, size
        except BlockingIOError:
            counts[0], counts[1] = datagrams, size
        poller.poll(50)
    sock.close()


class CountingSink:
    """A UDP backend in its own process that counts datagrams and bytes, and keeps nothing else."""

    def __init__(self, address: Address, rcvbuf: int = SINK_RCVBUF, start_timeout: float = 10.0) -> None:
        if not _is_loopback(address[0]):
            raise ValueError(f"the sink must be on loopback, not {address[0]}")
        self.address = address
        self._counts = RawArray("q", 2)
        self._stop = _MP.Event()
        receiver, sender = _MP.Pipe(duplex=False)
        self._process = _MP.Process(target=_sink_main, args=(address, rcvbuf, self._counts, sender, self._stop),
                                    name="udp-sink", daemon=True)
        self._process.start()
        sender.close()
        if not receiver.poll(start_timeout):
            self._process.kill()
            raise RuntimeError(f"the sink on {address} did not start within {start_timeout}s")
        self.rcvbuf: int = receiver.recv()
        receiver.close()

    @property
    def count(self) -> int:
        """Datagrams received so far (updated at least every 1024 datagrams and whenever idle)."""
        return self._counts[0]

    @property
    def bytes(self) -> int:
        return self._counts[1]

    def settle(self, expected: int, quiet: float = 0.5, timeout: float = 15.0, interval: float = 0.02) -> int:
        """The count once `expected` arrived or it stopped growing for `quiet` s (at most `timeout` s)."""
        deadline = time.monotonic() + timeout
        last, changed_at = self.count, time.monotonic()
        while last < expected and time.monotonic() < deadline:
            time.sleep(interval)
            current = self.count
            if current != last:
                last, changed_at = current, time.monotonic()
            elif time.monotonic() - changed_at >= quiet:
                break
        return last

    def close(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._process.join(timeout)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()

    def __enter__(self) -> CountingSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- the sender ----------------------------------------------------------------------------


@dataclass(frozen=True)
class SendResult:
    """What the generator managed: it may fall short of the plan on a busy box, and says so."""

    requested_rate: float
    planned: int
    attempted: int
    failed: int
    duration: float

    @property
    def sent(self) -> int:
        """Datagrams the kernel accepted from the clients."""
        return self.attempted - self.failed

    @property
    def rate(self) -> float:
        return self.attempted / self.duration if self.duration > 0 else 0.0

    @property
    def reached(self) -> bool:
        """True when every planned datagram went out at (at least 98% of) the requested rate."""
        return self.attempted == self.planned and self.rate >= 0.98 * self.requested_rate


def _sender_main(target: Address, clients: int, rate: float, planned: int, payload: bytes, slice_seconds: float,
                 give_up_after: float, control: multiprocessing.connection.Connection) -> None:
    raise_fd_limit(clients + 64)
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(clients)]
    for sock in sockets:
        sock.connect(target)  # one distinct source port per client, fixed for the whole run
    control.send("ready")
    start: float = control.recv()
    sends = itertools.cycle([sock.send for sock in sockets])
    attempted = failed = 0
    finished = start
    next_slice = start
    time.sleep(max(0.0, start - time.monotonic()))
    while attempted < planned:
        now = time.monotonic()
        if now - start > give_up_after:
            break
        # Datagram i is due at start + i/rate: send everything due so far, round-robin over clients.
        due = min(planned, int((now - start) * rate))
        for _ in range(due - attempted):
            try:
                next(sends)(payload)
            except OSError:
                failed += 1
        if due > attempted:
            attempted, finished = due, time.monotonic()
        next_slice += slice_seconds
        delay = next_slice - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        else:
            next_slice = time.monotonic()  # behind: catch up in the next burst, no sleep debt
    for sock in sockets:
        sock.close()
    control.send((attempted, failed, finished - start))


def send_paced(target: Address, rate: float, seconds: float, clients: int, payload: bytes = DOGSTATSD_DATAGRAM,
               processes: int = 1, slice_seconds: float = 0.002, setup_timeout: float = 30.0) -> SendResult:
    """Send `rate` datagrams/s for `seconds` from `clients` sockets, split over `processes` processes.

    Each process paces its share in `slice_seconds` slices and gives up at 1.5x `seconds` (+1 s),
    so the load is bounded in count and in time even when the box cannot keep up.
    """
    if not _is_loopback(target[0]):
        raise ValueError(f"load may only go to loopback, not {target[0]}")
    planned = round(rate * seconds)
    if planned < 1 or clients < 1:
        raise ValueError(f"nothing to send: {rate}/s for {seconds} s from {clients} clients")
    processes = max(1, min(processes, clients, planned))
    give_up_after = seconds * 1.5 + 1.0
    workers: list[tuple[multiprocessing.process.BaseProcess, multiprocessing.connection.Connection]] = []
    try:
        for k in range(processes):
            share_clients = clients // processes + (k < clients % processes)
            share_planned = planned // processes + (k < planned % processes)
            parent, child = _MP.Pipe()
            process = _MP.Process(target=_sender_main, name=f"udp-sender-{k}", daemon=True, args=(
                target, share_clients, rate * share_planned / planned, share_planned, payload, slice_seconds,
                give_up_after, child))
            process.start()
            child.close()
            workers.append((process, parent))
        for worker, control in workers:
            if not control.poll(setup_timeout) or control.recv() != "ready":
                raise RuntimeError(f"{worker.name} did not open its sockets within {setup_timeout}s")
        start = time.monotonic() + 0.05
        for _, control in workers:
            control.send(start)
        attempted = failed = 0
        duration = 0.0
        for worker, control in workers:
            if not control.poll(give_up_after + 10):
                raise RuntimeError(f"{worker.name} did not report within {give_up_after + 10}s")
            a, f, d = control.recv()
            attempted, failed, duration = attempted + a, failed + f, max(duration, d)
        return SendResult(rate, planned, attempted, failed, duration)
    finally:
        for worker, control in workers:
            worker.join(5)
            if worker.is_alive():
                worker.kill()
                worker.join()
            control.close()


# --- nginx -----------------------------------------------------------------------------------


_PREFIX = re.compile(r"^(\d+#\d+: )?(\*\d+ )?")  # pid#tid, connection number: differ per line


class NginxLog(logging.Handler):
    """Tallies nginx's warnings and errors by message; thousands of identical alerts stay a few counters."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.tally: Counter[str] = Counter()

    def emit(self, record: logging.LogRecord) -> None:
        message = _PREFIX.sub("", record.getMessage().removeprefix("nginx: "))
        self.tally[message.split(", client:")[0]] += 1


@dataclass(frozen=True)
class RunningNginx:
    nginx: Nginx
    log: NginxLog


@contextmanager
def nginx_log_tally() -> Iterator[NginxLog]:
    """Count what nginx logs at warn and worse instead of printing it (an overloaded nginx logs an
    alert per dropped datagram)."""
    logger = logging.getLogger("proxyctl.nginx")
    handler, propagate, level = NginxLog(), logger.propagate, logger.level
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate
        logger.setLevel(level)


@contextmanager
def nginx_running(config_for: Callable[[Path], str]) -> Iterator[RunningNginx]:
    """Run nginx on `config_for(state_dir)` in a fresh temporary directory; stop it on exit.

    The config must log to stderr (`error_log stderr ...`): that is how `Nginx` sees workers start,
    and how the bench counts nginx's own complaints such as `worker_connections are not enough`.
    """
    with tempfile.TemporaryDirectory(prefix="bench-nginx-") as directory, nginx_log_tally() as log:
        state_dir = Path(directory)
        text = config_for(state_dir)
        nginx = Nginx(state_dir)
        nginx.test(text)
        nginx.write(text)
        try:
            nginx.start()
            yield RunningNginx(nginx, log)
        finally:
            nginx.stop(grace=5)
