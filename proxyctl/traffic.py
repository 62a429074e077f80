"""Per-route traffic the kernel already counts, read from /proc/net when /metrics is scraped.

nginx's open-source stream module counts nothing, and counting in Python would mean
per-datagram work in every pod. The kernel keeps what matters per socket: the datagrams a
UDP socket dropped because its receive buffer was full (`drops` in /proc/net/udp), and the
TCP connections a port has open (ESTABLISHED in /proc/net/tcp). Parsing is pure (text →
values); `Meter` reads the files and keeps the running totals.

A route's sockets are the ones bound to its port on its listen addresses. nginx keeps its
listening sockets across reloads, but a restarted nginx opens new ones whose count starts
at 0, so drops are summed per socket (by inode): a counter never decreases. Drops a dying
socket took after the last scrape are not seen.

What the kernel does not count per route (datagrams nginx forwarded, or read and dropped
for want of a backend), nginx counts in a tally file: see `Tally`.
"""

from __future__ import annotations

import ctypes
import ipaddress
import logging
import os
import socket
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Collection, Iterable, Sequence

UDP_TABLES = ("/proc/net/udp", "/proc/net/udp6")
TCP_TABLES = ("/proc/net/tcp", "/proc/net/tcp6")
RMEM_MAX = "/proc/sys/net/core/rmem_max"
ESTABLISHED = 0x01  # include/net/tcp_states.h
SESSIONS, NO_BACKEND = "sessions", "no-backend"  # the tally files' kinds
TALLY_KINDS = (SESSIONS, NO_BACKEND)
_FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE = 0x01, 0x02  # include/uapi/linux/falloc.h
_libc = ctypes.CDLL(None, use_errno=True)  # ctypes is loaded anyway (nginx.py): no memory added
_fallocate = getattr(_libc, "fallocate64", None) or _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]

log = logging.getLogger("proxyctl.traffic")

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class Socket:
    """One row of /proc/net/{udp,tcp}{,6}: what a route's figures are made of."""

    address: Address
    port: int
    state: int
    inode: int
    drops: int  # 0 for TCP rows, which have no such column


@dataclass(frozen=True)
class RouteTraffic:
    name: str
    protocol: str
    receive_drops: int  # UDP: total since proxyctl started, over every socket the route had
    receive_buffer: int  # UDP: bytes granted to each listening socket
    connections: int  # TCP: ESTABLISHED now
    sessions: int = 0  # UDP datagrams / TCP connections nginx forwarded, counted as each ends
    no_backend_datagrams: int = 0  # UDP: read and dropped by nginx while the route had no backend
    no_backend_seconds: float = 0.0  # how long the route has gone without a backend, in total
    upstream_failures: dict[str, int] = field(default_factory=dict)  # reason → failures nginx logged


def sockets(table: str, ports: Collection[int] | None = None) -> list[Socket]:
    """The rows of one /proc/net/{udp,tcp}{,6} text, only those local to `ports` when given;
    rows it cannot read are skipped.

    The port is looked at first: a node agent's pod may hold thousands of sockets, and
    decoding every address cost ~10 µs a row.
    """
    rows = []
    for line in table.splitlines()[1:]:
        fields = line.split()
        try:
            host, port = fields[1].split(":")
            if ports is not None and int(port, 16) not in ports:
                continue
            rows.append(Socket(_address(host), int(port, 16), int(fields[3], 16), int(fields[9]),
                               int(fields[12]) if len(fields) == 13 else 0))
        except (IndexError, ValueError):
            continue
    return rows


def _address(hexadecimal: str) -> Address:
    """The kernel prints addresses as 32-bit words in its own byte order (`%08X` each)."""
    words = [int(hexadecimal[i:i + 8], 16) for i in range(0, len(hexadecimal), 8)]
    if len(words) == 1:
        return ipaddress.IPv4Address(socket.inet_ntop(socket.AF_INET, struct.pack("=I", *words)))
    if len(words) == 4:
        return ipaddress.IPv6Address(socket.inet_ntop(socket.AF_INET6, struct.pack("=4I", *words)))
    raise ValueError(f"not an address: {hexadecimal}")


def _on(row: Socket, hosts: Sequence[Address], port: int) -> bool:
    """Whether `row` is local to `port` on one of `hosts`; a wildcard host takes every address."""
    return row.port == port and any(h == row.address or h.is_unspecified and h.version == row.address.version
                                    for h in hosts)


def udp_drops(rows: Iterable[Socket], hosts: Sequence[Address], port: int) -> dict[int, int]:
    """inode → datagrams dropped, for the unconnected UDP sockets listening on `port`.

    nginx's sockets toward backends are connected (ESTABLISHED) and have ports of their own.
    """
    return {r.inode: r.drops for r in rows if r.state != ESTABLISHED and _on(r, hosts, port)}


def established(rows: Iterable[Socket], hosts: Sequence[Address], port: int) -> int:
    """TCP connections accepted on `port`: client sockets have the port as their remote end."""
    return sum(1 for r in rows if r.state == ESTABLISHED and _on(r, hosts, port))


def granted_receive_buffer(requested: int, rmem_max: int) -> int:
    """What SO_RCVBUF gives: the kernel caps the request at net.core.rmem_max and doubles it
    for its bookkeeping (net/core/sock.c, `__sock_set_rcvbuf`); `ss -m` shows it as `rb`.

    Computed, not read: /proc/net/udp does not show it and asking each socket would need
    nginx's file descriptors.
    """
    return 2 * min(requested, rmem_max)


class RunningTotal:
    """A counter over sockets that come and go: each socket adds what it counted since last seen."""

    def __init__(self) -> None:
        self.total = 0
        self._last: dict[int, int] = {}  # inode → its count when last seen

    def update(self, counts: dict[int, int]) -> int:
        for inode, count in counts.items():
            before = self._last.get(inode, 0)
            self.total += count - before if count >= before else count  # a reused inode: a new socket
        self._last = dict(counts)
        return self.total


def tally_path(directory: Path, route: str, kind: str) -> Path:
    """The tally file of `kind` (SESSIONS, NO_BACKEND) for `route`, in the directory nginx keeps its state in."""
    return directory / f"{route}.{kind}"


class Tally:
    """Sessions counted by nginx itself, in a file it appends one byte to per session: the
    file's apparent size is the count. `access_log FILE proxyctl_tally buffer=32k flush=1s`
    with an empty `log_format proxyctl_tally ''` writes just the newline.

    Why this way: it costs nothing in Python per datagram, and nginx writes its buffer to
    a file about once a second, where a pipe could block nginx or lose counts when full.
    The file outlives nginx restarts (nginx appends to it; a worker writes its buffer when
    it exits), and `free` gives back its blocks (fallocate PUNCH_HOLE with KEEP_SIZE: the
    size stays, the disk or tmpfs memory goes), so it holds only what was counted since the
    last `free`. At 30,000 datagrams/s, nginx's CPU with and without the access_log could
    not be told apart (README, Observability). Not chosen: a socket proxyctl owns and never
    reads, sent what a route without backend gets, whose kernel drop counter would count
    only what overflows its receive buffer, not what waits in it.
    """

    def __init__(self) -> None:
        self._totals: dict[Path, RunningTotal] = {}
        self._cannot_free: set[Path] = set()
        self._lock = threading.Lock()  # two scrapes at once must not count a delta twice

    def count(self, path: Path) -> int:
        """Sessions in `path` since this proxyctl started; never decreases, even when the file is replaced."""
        try:
            stat = path.stat()
            counts = {stat.st_ino: stat.st_size}
        except OSError:  # nginx has not counted anything yet
            counts = {}
        with self._lock:
            return self._totals.setdefault(path, RunningTotal()).update(counts)

    def free(self, path: Path) -> None:
        """Give back the blocks of what nginx wrote before the last one: the count is the size, not the bytes."""
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        except OSError:
            return
        try:
            stat = os.fstat(fd)
            whole = stat.st_size - stat.st_size % stat.st_blksize
            if stat.st_blocks * 512 <= stat.st_blksize or not whole:
                return  # nothing but the block nginx writes to now
            freed = _fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, 0, whole) == 0
            if not freed and path not in self._cannot_free:  # said once per file
                self._cannot_free.add(path)
                log.warning("cannot free the blocks of %s (%s): it grows by a byte per datagram counted",
                            path, os.strerror(ctypes.get_errno()))
        finally:
            os.close(fd)

    @staticmethod
    def start(path: Path) -> None:
        """An empty `path`: what an earlier proxyctl counted is not ours, and nginx need not create the file
        (a reload that must create one fails on a full disk)."""
        try:
            path.write_bytes(b"")
        except OSError as exc:  # nginx will say too, and the state dir's trouble is retried as a whole
            log.warning("cannot empty %s: %s", path, exc.strerror)


class Meter:
    """Reads the kernel's tables on demand and keeps each route's running totals."""

    def __init__(self, tally: Tally) -> None:
        self.tally = tally
        self._drops: dict[str, RunningTotal] = {}
        self._dropping: set[str] = set()  # routes whose drops rose at the latest scrape: said once per spell
        self._lock = threading.Lock()  # two scrapes at once must not count a delta twice

    @staticmethod
    def _read(paths: Sequence[str], ports: Collection[int]) -> list[Socket]:
        rows = []
        for path in paths:
            try:
                rows += sockets(Path(path).read_text(), ports)
            except OSError:  # no IPv6 in this pod: no udp6 table
                continue
        return rows

    def sample(self, routes: Sequence[tuple[str, str, int, Path]], listen: Sequence[str],
               requested_buffer: int) -> list[RouteTraffic]:
        """Figures for `routes` (name, protocol, port, nginx's state dir) listening on `listen` addresses."""
        hosts = [ipaddress.ip_address(a) for a in listen]
        udp_ports = {port for _, protocol, port, _ in routes if protocol == "udp"}
        tcp_ports = {port for _, protocol, port, _ in routes if protocol == "tcp"}
        udp = self._read(UDP_TABLES, udp_ports) if udp_ports else []
        tcp = self._read(TCP_TABLES, tcp_ports) if tcp_ports else []
        try:
            buffer = granted_receive_buffer(requested_buffer, int(Path(RMEM_MAX).read_text()))
        except (OSError, ValueError):
            buffer = 0
        result = []
        with self._lock:
            for name, protocol, port, directory in routes:
                sessions = self.tally.count(tally_path(directory, name, SESSIONS))
                if protocol == "udp":
                    counter = self._drops.setdefault(name, RunningTotal())
                    before = counter.total
                    total = counter.update(udp_drops(udp, hosts, port))
                    self._say_drops(name, total - before, buffer)
                    dropped = self.tally.count(tally_path(directory, name, NO_BACKEND))
                    result.append(RouteTraffic(name, protocol, total, buffer, 0, sessions, dropped))
                else:
                    result.append(RouteTraffic(name, protocol, 0, 0, established(tcp, hosts, port), sessions))
        return result

    def _say_drops(self, route: str, dropped: int, buffer: int) -> None:
        """One warning when a route starts dropping, not one per scrape while it goes on."""
        if dropped and route not in self._dropping:
            log.warning("route %s: the kernel dropped %d datagrams since the last scrape: nginx did not read them "
                        "before its %d-byte receive buffer filled (net.core.rmem_max caps it; see /metrics "
                        "proxyctl_route_udp_receive_drops_total)", route, dropped, buffer)
            self._dropping.add(route)
        elif not dropped:
            self._dropping.discard(route)
