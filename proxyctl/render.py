"""Rendering: (config, endpoints) → nginx.conf text. Pure, so it is tested without nginx."""

from __future__ import annotations

import importlib.resources
from pathlib import Path
from typing import Mapping, Sequence

import jinja2

from proxyctl.backend import Backend
from proxyctl.config import Config

# Each connection slot costs memory in every worker (about 6.5 MB per 16k here), so size the
# table to the routes: UDP with `proxy_responses 0` frees its slots at once; TCP holds two
# (client and upstream) for as long as a stream lives.
CONNECTIONS_PER_ROUTE = 1024
WORKER_SHUTDOWN_TIMEOUT = "30s"
# Bursts of datagrams wait here while the worker is busy (the kernel's default of ~208 KiB
# lost up to 1% at 30k datagrams/s). The kernel caps it at 2 × net.core.rmem_max.
UDP_RECEIVE_BUFFER = "4m"


def default_template() -> Path:
    """The template shipped in the wheel, or the repository's when running from a checkout."""
    shipped = importlib.resources.files("proxyctl") / "templates" / "nginx.conf.j2"
    if shipped.is_file():
        return Path(str(shipped))
    return Path(__file__).resolve().parent.parent / "templates" / "nginx.conf.j2"


def _seconds(value: float) -> str:
    return f"{round(value * 1000)}ms"


def render(
    config: Config,
    endpoints: Mapping[str, Sequence[Backend]],
    state_dir: Path,
    stream_module: str | None = None,
    template: Path | None = None,
) -> str:
    """The complete nginx.conf for `config` with `endpoints` (route name → backends)."""
    path = template or default_template()
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(path.parent),
        trim_blocks=True,
        lstrip_blocks=True,
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )
    host = config.listen_address
    return env.get_template(path.name).render(
        routes=config.routes,
        endpoints={name: sorted(backends) for name, backends in endpoints.items()},
        listen_host=f"[{host}]" if ":" in host else host,
        state_dir=state_dir,
        stream_module=stream_module,
        worker_connections=CONNECTIONS_PER_ROUTE * max(2, len(config.routes)),
        worker_shutdown_timeout=WORKER_SHUTDOWN_TIMEOUT,
        udp_receive_buffer=UDP_RECEIVE_BUFFER,
        seconds=_seconds,
    )
