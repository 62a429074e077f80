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

from proxyctl.metrics import exposition
from proxyctl.status import Status
from proxyctl.traffic import RouteTraffic
log = logging.getLogger("proxyctl.health")

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
                 traffic: Callable[[], list[RouteTraffic]] = list, memory: Callable[[], dict[str, int]] = dict) -> None:
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
        self._memory = memory
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
            code, body, content_type = _route(target.split("?", 1)[0], self._status(), self._traffic, self._memory)
        except Exception:  # a bug behind one request must not end the server
            log.exception("health server cannot answer %s", target)
            code, body, content_type = 500, "internal error\n", "text/plain"
        return _response(code, body, content_type, head_only=method == b"HEAD")


def _route(path: str, current: Status, traffic: Callable[[], list[RouteTraffic]],
           memory: Callable[[], dict[str, int]]) -> tuple[int, str, str]:
    if path == "/healthz":
        return (*_check(current.alive_problems), "text/plain")
    if path == "/readyz":
        return (*_check(current.ready_problems), "text/plain")
    if path == "/metrics":
        return 200, exposition(current, traffic(), memory()), "text/plain; version=0.0.4"
    if path == "/routes":
        return 200, json.dumps(_routes(current), indent=2) + "\n", "application/json"
    return 404, "not found: try /healthz /readyz /metrics /routes\n", "text/plain"


def _routes(current: Status) -> dict[str, object]:
    """What each route's nginx forwards to, and the pod behind each address: its node, whether
    it is another node's (the anyNode fallback) and whether it is terminating."""
    return {"routes": [{"name": r.name, "port": r.port, "protocol": r.protocol,
                        "backends": [{"address": str(b), "pod": b.pod, "node": b.node, "fallback": b.fallback,
                                      "terminating": b.terminating} for b in r.backends]}
                       for r in current.routes]}


def _response(code: int, body: str, content_type: str = "text/plain", head_only: bool = False) -> bytes:
    data = body.encode()
    head = (f"HTTP/1.1 {code} {HTTPStatus(code).phrase}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n")
    return head.encode() + (b"" if head_only else data)


def serve(address: str, status: Callable[[], Status],
          traffic: Callable[[], list[RouteTraffic]] = list, memory: Callable[[], dict[str, int]] = dict) -> Server:
    """Start the server in its thread; `status` is called for every request, `traffic` and `memory` per /metrics."""
    return Server(address, status, traffic, memory)


def _check(problems: list[str]) -> tuple[int, str]:
    return (503, "".join(f"{p}\n" for p in problems)) if problems else (200, "ok\n")
