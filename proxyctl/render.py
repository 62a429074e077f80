"""Rendering: (config, endpoints) → nginx.conf text. Pure, so it is tested without nginx.

`proxyctl run` gives each route its own nginx (see dataplane.py), so it renders one route
at a time with `render_route`; `render` gives every route in one file, as `proxyctl render`
prints it.
"""

from __future__ import annotations

import functools
import importlib.resources
import socket
from pathlib import Path
from typing import Mapping, Sequence

import jinja2

from proxyctl.backend import Backend
from proxyctl.config import Config, Route
from proxyctl.traffic import NO_BACKEND, SESSIONS, tally_path

# Each connection slot costs memory in every worker (about 6.5 MB per 16k here), so size the
# table to the routes, up to a cap: UDP with `proxy_responses 0` frees its slots at once; TCP
# holds two (client and upstream) for as long as a stream lives. Each slot may need a file.
# `proxyctl run` gives each route an nginx of its own, so a route has its 1024 to itself.
CONNECTIONS_PER_ROUTE = 1024
MAX_CONNECTIONS = 16384
# Bursts of datagrams wait here while the worker is busy (the kernel's default of ~208 KiB
# lost up to 1% at 30k datagrams/s). The kernel caps it at 2 × net.core.rmem_max.
UDP_RECEIVE_BUFFER = 4 << 20  # bytes


def default_template() -> Path:
    """The template shipped in the wheel, or the repository's when running from a checkout."""
    shipped = importlib.resources.files("proxyctl") / "templates" / "nginx.conf.j2"
    if shipped.is_file():
        return Path(str(shipped))
    return Path(__file__).resolve().parent.parent / "templates" / "nginx.conf.j2"


def _seconds(value: float) -> str:
    return f"{round(value * 1000)}ms"


@functools.lru_cache(maxsize=4)
def _template(path: Path) -> jinja2.Template:
    """Compiled once: recompiling on every pod change cost ~5 ms of each reload."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(path.parent),
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )
    return env.get_template(path.name)


@functools.cache
def has_ipv6_loopback() -> bool:
    """Whether ::1 exists here: pods of IPv4-only clusters, or with IPv6 disabled, lack it."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


def listen_addresses(config: Config, ipv6_loopback: bool) -> list[str]:
    """The addresses every route listens on: `listenAddress` when the file sets it, else loopback.

    Both loopbacks by default: where `localhost` resolves to ::1 first, a client sending to
    localhost:PORT would otherwise lose every datagram without an error.
    """
    if "listen_address" in config.model_fields_set:
        return [config.listen_address]
    return ["127.0.0.1", "::1"] if ipv6_loopback else ["127.0.0.1"]


def worker_connections(routes: int, open_files: int | None) -> int:
    """Slots for `routes` routes, within the cap and within the open files nginx may have."""
    wanted = min(MAX_CONNECTIONS, CONNECTIONS_PER_ROUTE * routes)
    return wanted if open_files is None else max(64, min(wanted, (open_files - 64) // 2))


def render(
    config: Config,
    endpoints: Mapping[str, Sequence[Backend]],
    state_dir: Path,
    stream_module: str | None = None,
    template: Path | None = None,
    open_files: int | None = None,
    ipv6_loopback: bool | None = None,
) -> str:
    """The complete nginx.conf for `config` with `endpoints` (route name → backends).

    `open_files` is the open-file limit nginx inherits; the connection table stays within it.
    `ipv6_loopback` says whether ::1 exists; None asks this machine (once per process).
    """
    if ipv6_loopback is None:
        ipv6_loopback = has_ipv6_loopback()
    return _template(template or default_template()).render(
        routes=config.routes,
        endpoints={name: sorted(backends) for name, backends in endpoints.items()},
        listen_hosts=[f"[{a}]" if ":" in a else a for a in listen_addresses(config, ipv6_loopback)],
        state_dir=state_dir,
        stream_module=stream_module,
        worker_connections=worker_connections(len(config.routes), open_files),
        worker_shutdown_timeout=_seconds(max(route.drain_timeout for route in config.routes)),
        udp_receive_buffer=f"{UDP_RECEIVE_BUFFER >> 20}m",
        seconds=_seconds,
        sessions_file=lambda route: tally_path(state_dir, route.key, SESSIONS),
        no_backend_file=lambda route: tally_path(state_dir, route.key, NO_BACKEND),
    )


def render_route(
    config: Config,
    route: Route,
    backends: Sequence[Backend],
    state_dir: Path,
    stream_module: str | None = None,
    template: Path | None = None,
    open_files: int | None = None,
) -> str:
    """The nginx.conf of the nginx that serves `route` alone, keeping its pid in `state_dir`.

    Its old worker drains for the route's own `drainTimeout` after a reload.
    """
    alone = config.model_copy(update={"routes": [route]})
    return render(alone, {route.key: backends}, state_dir, stream_module, template, open_files)
