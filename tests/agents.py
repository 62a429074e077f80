"""Node agents and their clients for rollout tests, numbering every datagram and record.

The statsd agent is the real Etsy statsd daemon from npm, installed on first use into
`.cache/agents/` (git-ignored) and logging every datagram it receives (`dumpMessages`).
The fluent agent is a small forward-protocol receiver: fluentd is a Ruby gem and
fluent-bit no Debian package, so neither can be installed here. The clients are the real
libraries applications use: the `datadog` DogStatsd client and `fluent-logger`, without
acks, as most applications run it.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable

import msgpack
from datadog.dogstatsd.base import DogStatsd
from fluent.sender import FluentSender

from tests.support import accept_each, free_port, wait_for

STATSD_VERSION = "0.9.0"
CACHE = Path(__file__).resolve().parent.parent / ".cache" / "agents"
_SEQ = re.compile(r"DEBUG: rollout:1\|c\|#seq:(\d+)$")


def statsd_daemon() -> Path:
    """The statsd daemon's stats.js, installed from npm the first time (a few seconds)."""
    script = CACHE / "node_modules" / "statsd" / "stats.js"
    if not script.is_file():
        CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--loglevel=error", "--prefix", str(CACHE),
                        f"statsd@{STATSD_VERSION}"], check=True, timeout=600, stdout=subprocess.DEVNULL)
    return script


class StatsdAgent:
    """The statsd daemon on `host:port` (UDP); `seqs` holds the numbers of the datagrams it got."""

    def __init__(self, host: str, port: int, workdir: Path) -> None:
        self.host, self.port = host, port
        config = workdir / f"statsd-{host}-{port}.js"
        config.write_text(json.dumps({"address": host, "port": port, "mgmt_address": host,
                                      "mgmt_port": free_port(host), "dumpMessages": True, "backends": [],
                                      "flushInterval": 3_600_000}))
        # A file, not a pipe: node writes to a pipe synchronously, and a reader that falls behind
        # would stall the daemon until its socket buffer overflows.
        self.log = workdir / f"statsd-{host}-{port}.log"
        self._seqs: set[int] = set()
        self._probed = False
        self._read_up_to = 0
        with self.log.open("wb") as output:
            self.process = subprocess.Popen(["node", str(statsd_daemon()), str(config)], stdout=output,
                                            stderr=subprocess.STDOUT)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            wait_for(lambda: probe.sendto(b"probe:1|c", (host, port)) and self._read() and self._probed, 20,
                     interval=0.05, what=f"statsd listening on {host}:{port}")

    @property
    def seqs(self) -> set[int]:
        self._read()
        return self._seqs

    def _read(self) -> bool:
        """Take in the complete lines the daemon has logged since the last call."""
        with self.log.open("rb") as output:
            output.seek(self._read_up_to)
            data = output.read()
        complete = data[:data.rfind(b"\n") + 1]
        self._read_up_to += len(complete)
        for line in complete.decode(errors="replace").splitlines():
            if match := _SEQ.search(line):
                self._seqs.add(int(match.group(1)))
            elif "DEBUG: probe:1|c" in line:
                self._probed = True
        return True

    def stop(self) -> None:
        """Stop as a pod's container does on SIGTERM."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class ForwardAgent:
    """A fluent forward-protocol (v1) receiver on `host:port`: Message, Forward and
    PackedForward modes; `seqs` holds the `seq` field of every record it got."""

    def __init__(self, host: str, port: int) -> None:
        self.server = socket.create_server((host, port))
        self.server.settimeout(0.1)
        self.seqs: set[int] = set()
        self._connections: list[socket.socket] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        accept_each(self.server, self._stop, self._serve)

    def _serve(self, conn: socket.socket) -> None:
        self._connections.append(conn)
        thread = threading.Thread(target=self._receive, args=(conn,), daemon=True)
        self._threads.append(thread)
        thread.start()

    def _receive(self, conn: socket.socket) -> None:
        unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
        conn.settimeout(0.5)
        while True:
            try:
                data = conn.recv(65536)
            except socket.timeout:
                if self._stop.is_set():
                    break
                continue
            except OSError:
                break
            if not data:
                break
            unpacker.feed(data)
            for message in unpacker:
                self._take(message)
        conn.close()

    def _take(self, message: list) -> None:
        entries = message[1]
        if isinstance(entries, bytes):  # PackedForward: a stream of [time, record]
            unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
            unpacker.feed(entries)
            entries = list(unpacker)
        elif not isinstance(entries, list):  # Message mode: [tag, time, record, option?]
            entries = [[entries, message[2]]]
        for _, record in entries:
            if isinstance(record, dict) and isinstance(record.get("seq"), int):
                self.seqs.add(record["seq"])

    def stop(self) -> None:
        """Shut down as an agent does: stop accepting, end each connection, read what is in flight."""
        self.server.close()
        for conn in self._connections:
            try:
                conn.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        self._stop.set()
        for thread in self._threads:
            thread.join(5)


class Load:
    """A client library sending numbered items at a steady rate; remembers when each was sent."""

    def __init__(self, rate: float, send: Callable[[int], object], finish: Callable[[], object] = lambda: None,
                 limit: float = 120.0) -> None:
        self.rate = rate
        self.sent: list[float] = []  # send time of item n, by n
        self._send, self._finish = send, finish
        self._stop = threading.Event()
        self._limit = limit  # seconds: a load never runs longer than this
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        started = time.monotonic()
        while not self._stop.is_set() and time.monotonic() - started < self._limit:
            due = started + len(self.sent) / self.rate
            if (wait := due - time.monotonic()) > 0:
                time.sleep(wait)
            self.sent.append(time.monotonic())
            self._send(len(self.sent) - 1)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._finish()


def dogstatsd_load(port: int, rate: float) -> Load:
    """`rollout:1|c|#seq:N` datagrams from the DogStatsd client to 127.0.0.1:port."""
    client = DogStatsd(host="127.0.0.1", port=port, disable_telemetry=True,
                       origin_detection_enabled=False)  # inside a container it would tag each datagram with the container id
    return Load(rate, lambda n: client.increment("rollout", tags=[f"seq:{n}"]), client.close_socket)


def fluent_load(port: int, rate: float) -> Load:
    """Records `{"seq": N}` from fluent-logger to 127.0.0.1:port, without acks. It keeps what it
    could not send and sends it with the next record; stopping it sends what it still holds."""
    sender = FluentSender("rollout", host="127.0.0.1", port=port, timeout=1.0)
    return Load(rate, lambda n: sender.emit("record", {"seq": n}), sender.close)
