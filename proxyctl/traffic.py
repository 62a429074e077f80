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
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Collection, Iterable, Sequence

UDP_TABLES = ("/proc/net/udp", "/proc/net/udp6")
TCP_TABLES = ("/proc/net/tcp", "/proc/net/tcp6")
RMEM_MAX = "/proc/sys/net/core/rmem_max"
ESTABLISHED = 0x01  # include/net/tcp_states.h

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


class Meter:
    """Reads the kernel's tables on demand and keeps each route's running totals."""

    def __init__(self) -> None:
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

    def sample(self, routes: Sequence[tuple[str, str, int]], listen: Sequence[str],
               requested_buffer: int) -> list[RouteTraffic]:
        """Figures for `routes` (name, protocol, port) listening on `listen` addresses."""
        hosts = [ipaddress.ip_address(a) for a in listen]
        udp_ports = {port for _, protocol, port in routes if protocol == "udp"}
        tcp_ports = {port for _, protocol, port in routes if protocol == "tcp"}
        udp = self._read(UDP_TABLES, udp_ports) if udp_ports else []
        tcp = self._read(TCP_TABLES, tcp_ports) if tcp_ports else []
        try:
            buffer = granted_receive_buffer(requested_buffer, int(Path(RMEM_MAX).read_text()))
        except (OSError, ValueError):
            buffer = 0
        result = []
        with self._lock:
            for name, protocol, port in routes:
                if protocol == "udp":
                    counter = self._drops.setdefault(name, RunningTotal())
                    before = counter.total
                    total = counter.update(udp_drops(udp, hosts, port))
                    self._say_drops(name, total - before, buffer)
                    result.append(RouteTraffic(name, protocol, total, buffer, 0))
                else:
                    result.append(RouteTraffic(name, protocol, 0, 0, established(tcp, hosts, port)))
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
