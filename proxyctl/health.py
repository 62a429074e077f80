"""The health server: /healthz, /readyz, /metrics (Prometheus text), /routes (JSON)."""

from __future__ import annotations

import json
import logging
import selectors
import socket
import threading
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Callable

from proxyctl.traffic import RouteTraffic

log = logging.getLogger("proxyctl.health")


@dataclass(frozen=True)
class RouteStatus:
    name: str
    port: int
    protocol: str
    backends: list[str]


@dataclass(frozen=True)
class Status:
    """A snapshot of the sidecar, taken per request so the answers agree with each other."""

    alive_problems: list[str]
    ready_problems: list[str]
    routes: list[RouteStatus]
    reloads: int
    reload_failures: int
    config_valid: bool
    watch_restarts: int
    nginx_restarts: int
    watch_ages: dict[str, float] = field(default_factory=dict)  # route → seconds since its watch heard from the API
    on_fallback: frozenset[str] = frozenset()  # routes served by other nodes' pods (anyNode)
    last_reload_seconds: float | None = None  # how long the latest successful reload took
    last_reload_at: float | None = None  # when it ended, Unix time


def metrics(status: Status, traffic: list[RouteTraffic] | None = None) -> str:
    """The Prometheus text format (0.0.4); `traffic` is read from the kernel per scrape."""
    lines = [
        "# HELP proxyctl_reloads_total nginx reloads that applied a new config.",
        "# TYPE proxyctl_reloads_total counter",
        f"proxyctl_reloads_total {status.reloads}",
        "# HELP proxyctl_reload_failures_total configs rejected by nginx -t or by the reload.",
        "# TYPE proxyctl_reload_failures_total counter",
        f"proxyctl_reload_failures_total {status.reload_failures}",
        "# HELP proxyctl_config_valid 1 when the latest config was accepted, 0 when the last good one still serves.",
        "# TYPE proxyctl_config_valid gauge",
        f"proxyctl_config_valid {int(status.config_valid)}",
        "# HELP proxyctl_ready 1 when /readyz answers 200.",
        "# TYPE proxyctl_ready gauge",
        f"proxyctl_ready {int(not status.ready_problems)}",
        "# HELP proxyctl_watch_restarts_total watches restarted after an error, a stall or 410 Gone.",
        "# TYPE proxyctl_watch_restarts_total counter",
        f"proxyctl_watch_restarts_total {status.watch_restarts}",
        "# HELP proxyctl_nginx_restarts_total times nginx died and was started again.",
        "# TYPE proxyctl_nginx_restarts_total counter",
        f"proxyctl_nginx_restarts_total {status.nginx_restarts}",
        "# HELP proxyctl_route_backends backends nginx forwards a route to.",
        "# TYPE proxyctl_route_backends gauge",
    ]
    lines += [f"proxyctl_route_backends{_labels(r.name)} {len(r.backends)}" for r in status.routes]
    lines += _family("proxyctl_route_on_fallback", "gauge",
                     "1 while an anyNode route forwards to other nodes' pods for lack of a local one.",
                     [(r.name, int(r.name in status.on_fallback)) for r in status.routes])
    lines += _family("proxyctl_watch_last_event_age_seconds", "gauge",
                     "seconds since the route's pod watch last heard from the API: a list, event, bookmark or "
                     "a watch that ended when asked.",
                     sorted(status.watch_ages.items()))
    if status.last_reload_seconds is not None and status.last_reload_at is not None:
        lines += _family("proxyctl_last_reload_duration_seconds", "gauge",
                         "how long the latest successful nginx reload took, until its new worker ran.",
                         [(None, status.last_reload_seconds)])
        lines += _family("proxyctl_last_reload_success_timestamp_seconds", "gauge",
                         "when the latest successful nginx reload ended, in Unix time.", [(None, status.last_reload_at)])
    udp = [t for t in traffic or [] if t.protocol == "udp"]
    tcp = [t for t in traffic or [] if t.protocol == "tcp"]
    lines += _family("proxyctl_route_udp_receive_drops_total", "counter",
                     "datagrams the kernel dropped at the route's listening sockets because their receive buffer "
                     "was full.", [(t.name, t.receive_drops) for t in udp])
    lines += _family("proxyctl_route_udp_receive_buffer_bytes", "gauge",
                     "receive buffer the kernel granted each of the route's listening sockets.",
                     [(t.name, t.receive_buffer) for t in udp])
    lines += _family("proxyctl_route_tcp_connections", "gauge",
                     "TCP connections open from the application to the route's port.",
                     [(t.name, t.connections) for t in tcp])
    return "\n".join(lines) + "\n"


def _family(name: str, kind: str, text: str, samples: list[tuple[str | None, float]]) -> list[str]:
    """HELP, TYPE and one sample per route (None: the one sample without labels); nothing without samples."""
    if not samples:
        return []
    return [f"# HELP {name} {text}", f"# TYPE {name} {kind}",
            *(f"{name}{_labels(route) if route is not None else ''} {_number(value)}" for route, value in samples)]


def _labels(name: str) -> str:
    """The route label, its value escaped as the text format wants: backslash, quote, newline."""
    escaped = name.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'{{route="{escaped}"}}'


def _number(value: float) -> str:
    return str(value) if isinstance(value, int) else repr(round(value, 6))


MAX_CONNECTIONS = 512  # past this the oldest connection is closed: probes and scrapes need a handful
CONNECTION_DEADLINE = 10.0  # seconds a client has to send its request and take the answer
MAX_REQUEST = 8192  # bytes of request line and headers


@dataclass
class _Connection:
    deadline: float
    inbox: bytearray = field(default_factory=bytearray)
    outbox: bytes = b""


class Server:
    """The health server: one thread and one selector serve every connection.

    A connection costs a socket and a small buffer, never a thread; it lives at most
    CONNECTION_DEADLINE, and past MAX_CONNECTIONS the oldest is closed, so thousands of
    idle or slow clients neither exhaust memory nor delay a probe. Each answer closes its
    connection, as HTTP/1.0 servers do. A client that goes away mid-answer is forgotten
    quietly: nothing it does is an error of ours.
    """

    def __init__(self, address: str, status: Callable[[], Status],
                 traffic: Callable[[], list[RouteTraffic]] = list) -> None:
        host, _, port = address.rpartition(":")
        family, kind, proto, _, sockaddr = socket.getaddrinfo(
            host.strip("[]"), int(port), type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST | socket.AI_PASSIVE)[0]
        self._listener = socket.socket(family, kind, proto)  # AF_INET6 for [::1] and [::]
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(sockaddr)
        self._listener.listen(128)
        self._listener.setblocking(False)
        self.port: int = self._listener.getsockname()[1]
        self._status = status
        self._traffic = traffic
        self._wake, self._waker = socket.socketpair()
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._selector.register(self._wake, selectors.EVENT_READ)
        self._connections: dict[socket.socket, _Connection] = {}  # oldest first, so also by deadline
        self._stopping = False
        self._thread = threading.Thread(target=self._serve, name="health", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        """Stop serving and close every connection; returns once the server's thread has ended."""
        self._stopping = True
        if self._thread.is_alive():
            self._waker.send(b"\0")
            self._thread.join(5)

    def _serve(self) -> None:
        try:
            while not self._stopping:
                for key, events in self._selector.select(timeout=1.0):
                    if key.fileobj is self._listener:
                        self._accept()
                    elif key.fileobj is not self._wake:
                        self._serve_connection(key.fileobj, events)  # type: ignore[arg-type]
                self._expire()
        finally:
            for connection in list(self._connections):
                self._close(connection)
            for sock in (self._listener, self._wake, self._waker):
                sock.close()
            self._selector.close()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of file descriptors, say: shed the oldest, let the client retry
                log.warning("health server cannot accept a connection: %s", exc)
                if self._connections:
                    self._close(next(iter(self._connections)))
                return
            if len(self._connections) >= MAX_CONNECTIONS:
                self._close(next(iter(self._connections)))
            connection.setblocking(False)
            self._connections[connection] = _Connection(time.monotonic() + CONNECTION_DEADLINE)
            self._selector.register(connection, selectors.EVENT_READ)

    def _expire(self) -> None:
        now = time.monotonic()
        while self._connections:
            oldest, state = next(iter(self._connections.items()))
            if state.deadline > now:
                return
            self._close(oldest)

    def _serve_connection(self, connection: socket.socket, events: int) -> None:
        state = self._connections.get(connection)
        if state is None:
            return  # closed earlier in this round, to make room for a newer one
        try:
            if events & selectors.EVENT_READ and not state.outbox:
                data = connection.recv(4096)
                if not data:
                    self._close(connection)
                    return
                state.inbox += data
                answer = self._answer(bytes(state.inbox))
                if answer is None:
                    return
                state.outbox = answer
                self._selector.modify(connection, selectors.EVENT_WRITE)
            state.outbox = state.outbox[connection.send(state.outbox):]
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:  # the client reset or closed its end mid-answer: its business, not an error
            log.debug("health client went away: %s", exc)
            self._close(connection)
            return
        if not state.outbox:
            self._close(connection)

    def _close(self, connection: socket.socket) -> None:
        del self._connections[connection]
        self._selector.unregister(connection)
        connection.close()

    def _answer(self, request: bytes) -> bytes | None:
        """The whole answer to a request once its head has arrived; None while it has not."""
        head_end = request.find(b"\r\n\r\n")
        if head_end < 0:
            return _response(431, "request head too large\n") if len(request) > MAX_REQUEST else None
        parts = request[:request.find(b"\r\n")].split()
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
            return _response(400, "bad request\n")
        method, target = parts[0], parts[1].decode("latin-1")
        if method not in (b"GET", b"HEAD"):
            return _response(405, "only GET\n")
        try:
            code, body, content_type = _route(target.split("?", 1)[0], self._status(), self._traffic)
        except Exception:  # a bug behind one request must not end the server
            log.exception("health server cannot answer %s", target)
            code, body, content_type = 500, "internal error\n", "text/plain"
        return _response(code, body, content_type, head_only=method == b"HEAD")


def _route(path: str, current: Status, traffic: Callable[[], list[RouteTraffic]]) -> tuple[int, str, str]:
    if path == "/healthz":
        return (*_check(current.alive_problems), "text/plain")
    if path == "/readyz":
        return (*_check(current.ready_problems), "text/plain")
    if path == "/metrics":
        return 200, metrics(current, traffic()), "text/plain; version=0.0.4"
    if path == "/routes":
        body = {"routes": [r.__dict__ for r in current.routes]}
        return 200, json.dumps(body, indent=2) + "\n", "application/json"
    return 404, "not found: try /healthz /readyz /metrics /routes\n", "text/plain"


def _response(code: int, body: str, content_type: str = "text/plain", head_only: bool = False) -> bytes:
    data = body.encode()
    head = (f"HTTP/1.1 {code} {HTTPStatus(code).phrase}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n")
    return head.encode() + (b"" if head_only else data)


def serve(address: str, status: Callable[[], Status],
          traffic: Callable[[], list[RouteTraffic]] = list) -> Server:
    """Start the server in its thread; `status` is called for every request, `traffic` per /metrics."""
    return Server(address, status, traffic)


def _check(problems: list[str]) -> tuple[int, str]:
    return (503, "".join(f"{p}\n" for p in problems)) if problems else (200, "ok\n")
