"""The health server: /healthz, /readyz, /metrics (Prometheus text), /routes (JSON)."""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

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


def metrics(status: Status) -> str:
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
    lines += [f'proxyctl_route_backends{{route="{r.name}"}} {len(r.backends)}' for r in status.routes]
    return "\n".join(lines) + "\n"


def serve(address: str, status: Callable[[], Status]) -> ThreadingHTTPServer:
    """Start the server in a daemon thread; `status` is called for every request."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            current = status()
            path = self.path.split("?", 1)[0]
            if path == "/healthz":
                self._answer(*_check(current.alive_problems))
            elif path == "/readyz":
                self._answer(*_check(current.ready_problems))
            elif path == "/metrics":
                self._answer(200, metrics(current), "text/plain; version=0.0.4")
            elif path == "/routes":
                body = {"routes": [r.__dict__ for r in current.routes]}
                self._answer(200, json.dumps(body, indent=2) + "\n", "application/json")
            else:
                self._answer(404, "not found: try /healthz /readyz /metrics /routes\n")

        def _answer(self, code: int, body: str, content_type: str = "text/plain") -> None:
            data = body.encode()
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:
            log.debug("%s %s", self.address_string(), format % args)

    host, _, port = address.rpartition(":")
    server = ThreadingHTTPServer((host.strip("[]"), int(port)), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="health", daemon=True).start()
    return server


def _check(problems: list[str]) -> tuple[int, str]:
    return (503, "".join(f"{p}\n" for p in problems)) if problems else (200, "ok\n")
