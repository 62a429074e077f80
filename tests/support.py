"""Real sockets on loopback for tests and benchmarks: backends, free ports, polling."""

from __future__ import annotations

import socket
import threading
import time
import urllib.error
import urllib.request
from typing import Callable, TypeVar

from proxyctl.render import has_ipv6_loopback

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout: float = 10.0, interval: float = 0.02, what: str = "") -> T:
    """Poll until `predicate()` is truthy; fail with `what` when the deadline passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)


def free_port(host: str = "127.0.0.1") -> int:
    """A port free for both TCP and UDP on `host` (routes may use the same port for both), and
    on ::1 too where it exists, since nginx listens on both loopbacks by default."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            tcp.bind((host, 0))
            port = tcp.getsockname()[1]
            if _bindable(socket.AF_INET, socket.SOCK_DGRAM, host, port) and (not has_ipv6_loopback() or all(
                    _bindable(socket.AF_INET6, kind, "::1", port) for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM))):
                return port


def _bindable(family: socket.AddressFamily, kind: socket.SocketKind, host: str, port: int) -> bool:
    with socket.socket(family, kind) as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
        return True


class UdpSink:
    """A UDP backend (a stand-in for a DogStatsD pod) that records what it receives."""

    def __init__(self, host: str, port: int = 0) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        self.sock.bind((host, port))
        self.sock.settimeout(0.1)
        self.address = self.sock.getsockname()
        self.received: list[bytes] = []
        self.first_at: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65535)
            except socket.timeout:
                continue
            except OSError:
                return
            if self.first_at is None:
                self.first_at = time.monotonic()
            self.received.append(data)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


def accept_each(server: socket.socket, stop: threading.Event, serve: Callable[[socket.socket], None]) -> None:
    """Hand each connection `server` accepts to `serve` until `stop` is set or the server is closed.

    `server` has a short timeout, so that `stop` is seen between connections.
    """
    while not stop.is_set():
        try:
            conn, _ = server.accept()
        except socket.timeout:
            continue
        except OSError:
            return
        serve(conn)


def http_get(port: int, path: str) -> tuple[int, str]:
    """GET `path` from 127.0.0.1:port: the status and body; 0 and "" when nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


class TcpEcho:
    """A TCP backend that echoes back what it gets, prefixed with its own name."""

    def __init__(self, host: str, port: int = 0, name: str = "") -> None:
        self.name = (name or host).encode()
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.server = socket.create_server((host, port), family=family)
        self.server.settimeout(0.1)
        self.address = self.server.getsockname()
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        accept_each(self.server, self._stop, self._serve)

    def _serve(self, conn: socket.socket) -> None:
        self.connections += 1
        threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    def _echo(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(30)
            try:
                while data := conn.recv(65536):
                    conn.sendall(self.name + b":" + data)
            except OSError:
                return

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.server.close()


def tcp_exchange(port: int, payload: bytes, host: str = "127.0.0.1", timeout: float = 5.0) -> bytes:
    """One request/response over a fresh TCP connection; b'' when the proxy closes it at once."""
    with socket.create_connection((host, port), timeout=timeout) as conn:
        try:
            conn.sendall(payload)
            return conn.recv(65536)
        except ConnectionResetError:
            return b""
