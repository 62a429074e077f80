"""What the sidecar reports about itself: one snapshot per request, read by /healthz, /readyz,
/metrics and /routes so their answers agree."""

from __future__ import annotations

from dataclasses import dataclass, field

from proxyctl.backend import Backend


@dataclass(frozen=True)
class RouteStatus:
    name: str
    port: int
    protocol: str
    backends: list[Backend]  # with the pod each came from, as discovery last knew it


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
    kube_requests: dict[tuple[str, str], int] = field(default_factory=dict)  # (verb, outcome) → list/watch requests
    draining_workers: dict[str, int] = field(default_factory=dict)  # route → old nginx workers still draining
