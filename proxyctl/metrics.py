"""/metrics in the Prometheus text format (0.0.4), written by hand: `prometheus_client` would
cost 0.8 MB PSS in every pod for what is a few dozen lines of text."""

from __future__ import annotations

from proxyctl.nginx import UPSTREAM_FAILURES
from proxyctl.status import Status
from proxyctl.traffic import RouteTraffic


def exposition(status: Status, traffic: list[RouteTraffic] | None = None, memory: dict[str, int] | None = None) -> str:
    """The Prometheus text format (0.0.4); `traffic` and `memory` are read from the kernel per scrape."""
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
    lines += [f"proxyctl_route_backends{_labels({'route': r.name})} {len(r.backends)}" for r in status.routes]
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
    lines += _family("proxyctl_route_sessions_total", "counter",
                     "sessions nginx forwarded, or tried to, to the route's backends, counted as each ends: a "
                     "datagram each for UDP (with udpResponses 0, the default), a connection each for TCP.",
                     [(t.name, t.sessions) for t in traffic or []])
    lines += _family("proxyctl_route_no_backend_datagrams_total", "counter",
                     "datagrams nginx read and dropped because the route had no backend.",
                     [(t.name, t.no_backend_datagrams) for t in udp])
    lines += _family("proxyctl_route_no_backend_seconds_total", "counter",
                     "seconds the route has gone without a backend: UDP datagrams are dropped meanwhile, TCP "
                     "connects refused.", [(t.name, t.no_backend_seconds) for t in traffic or []])
    lines += _family("proxyctl_route_upstream_failures_total", "counter",
                     "failures toward the route's backends that nginx logged: connect() failed, upstream timed out, "
                     "no live upstreams, out of connections or file descriptors.",
                     [({"route": t.name, "reason": reason}, t.upstream_failures.get(reason, 0))
                      for t in traffic or [] for reason, _ in UPSTREAM_FAILURES])
    lines += _discovery(status)
    lines += _family("proxyctl_route_draining_workers", "gauge",
                     "old nginx workers of the route still draining connections after reloads; each holds memory "
                     "until its connections end or drainTimeout passes.", sorted(status.draining_workers.items()))
    lines += _family("proxyctl_memory_pss_bytes", "gauge",
                     "proportional set size of proxyctl and of all its nginx processes (masters, workers, draining "
                     "workers): shared pages count once in all, so the two add up to what they cost together, the "
                     "closest per-process figure to the container's working set; RSS would count pages nginx "
                     "processes share once per process.",
                     [({"process": process}, size) for process, size in sorted((memory or {}).items())])
    return "\n".join(lines) + "\n"


def _discovery(status: Status) -> list[str]:
    """What discovery asked of the API server, and how each request ended."""
    return _family("proxyctl_kube_requests_total", "counter",
                   "list and watch requests to the Kubernetes API by how they ended: ok, gone (410), throttled (429), "
                   "unauthorized (401), forbidden (403), client_error, server_error, timeout, transport_error, "
                   "malformed, unexpected. Counted when each ends, so an open watch is not yet counted.",
                   [({"verb": verb, "outcome": outcome}, count)
                    for (verb, outcome), count in status.kube_requests.items()])


def _family(name: str, kind: str, text: str, samples: list[tuple[str | dict[str, str] | None, float]]) -> list[str]:
    """HELP, TYPE and one sample per route (a name) or per set of labels; None: the one sample
    without labels; nothing without samples."""
    if not samples:
        return []
    return [f"# HELP {name} {text}", f"# TYPE {name} {kind}",
            *(f"{name}{_labels({'route': labels} if isinstance(labels, str) else labels)} {_number(value)}"
              for labels, value in samples)]


def _labels(labels: dict[str, str] | None) -> str:
    """Labels with their values escaped as the text format wants: backslash, quote, newline."""
    if not labels:
        return ""
    return "{" + ",".join(f'{key}="{_escape(value)}"' for key, value in labels.items()) + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    return str(value) if isinstance(value, int) else repr(round(value, 6))
