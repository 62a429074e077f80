"""Fixtures: real nginx from a rendered config, and real backends on 127.0.0.x."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import pytest

from proxyctl.backend import Backend
from proxyctl.config import Config
from proxyctl.nginx import Nginx, stream_module
from proxyctl.render import render
from tests.kubeapi import kube_api  # noqa: F401  (fixture)
from tests.harness import Proxyctl
from tests.support import TcpEcho, UdpSink

RunNginx = Callable[[Config, Mapping[str, Sequence[Backend]]], Nginx]


@pytest.fixture(scope="session")
def nginx_stream_module() -> str | None:
    return stream_module()


@pytest.fixture
def run_nginx(tmp_path: Path, nginx_stream_module: str | None) -> Iterator[RunNginx]:
    """Start real nginx on a rendered config; stopped at the end of the test."""
    started: list[Nginx] = []

    def start(config: Config, endpoints: Mapping[str, Sequence[Backend]]) -> Nginx:
        nginx = Nginx(tmp_path)
        text = render(config, endpoints, tmp_path, nginx_stream_module)
        nginx.test(text)
        nginx.write(text)
        nginx.start()
        started.append(nginx)
        return nginx

    yield start
    for nginx in started:
        nginx.stop(grace=5)


@pytest.fixture
def udp_sinks() -> Iterator[Callable[[str, int], UdpSink]]:
    sinks: list[UdpSink] = []

    def make(host: str, port: int = 0) -> UdpSink:
        sinks.append(UdpSink(host, port))
        return sinks[-1]

    yield make
    for sink in sinks:
        sink.close()


@pytest.fixture
def tcp_echoes() -> Iterator[Callable[[str, int], TcpEcho]]:
    servers: list[TcpEcho] = []

    def make(host: str, port: int = 0) -> TcpEcho:
        servers.append(TcpEcho(host, port))
        return servers[-1]

    yield make
    for server in servers:
        server.close()


@pytest.fixture
def proxyctl(tmp_path: Path, kube_api) -> Iterator[Callable[..., Proxyctl]]:
    """Make `proxyctl run` processes against the test API server; killed at the end."""
    made: list[Proxyctl] = []

    def make(config: str | None = None, env: dict[str, str] | None = None, start: bool = True) -> Proxyctl:
        process = Proxyctl(tmp_path / f"proxyctl-{len(made)}", kube_api, config, env)
        made.append(process)
        return process.start() if start else process

    yield make
    for process in made:
        process.kill()
