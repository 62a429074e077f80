"""Fixtures: real nginx from a rendered config, and real backends on 127.0.0.x."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence, TypeVar

import pytest
from hypothesis import settings

from proxyctl.backend import Backend
from proxyctl.config import Config
from proxyctl.discovery import Discovery
from proxyctl.kube import Identity
from proxyctl.nginx import Nginx, stream_module
from proxyctl.render import render
from tests.kubeapi import KubeApiServer, kube_api  # noqa: F401  (fixture)
from tests.harness import Proxyctl
from tests.promtool import find_promtool
from tests.support import TcpEcho, UdpSink

# Fuzz tests try the same inputs on every run, so the suite is a steady gate;
# `pytest --hypothesis-profile=explore` draws new ones and prints the seed of any failure.
settings.register_profile("gate", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile("gate")

Server = TypeVar("Server", UdpSink, TcpEcho)
RunNginx = Callable[[Config, Mapping[str, Sequence[Backend]]], Nginx]
MakeDiscovery = Callable[..., Discovery]


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


def _servers(kind: Callable[[str, int], Server]) -> Callable[[], Iterator[Callable[[str, int], Server]]]:
    """A fixture making backends of one kind on demand, all closed at the end of the test."""

    def fixture() -> Iterator[Callable[[str, int], Server]]:
        made: list[Server] = []

        def make(host: str, port: int = 0) -> Server:
            made.append(kind(host, port))
            return made[-1]

        yield make
        for server in made:
            server.close()

    return fixture


udp_sinks = pytest.fixture(_servers(UdpSink), name="udp_sinks")
tcp_echoes = pytest.fixture(_servers(TcpEcho), name="tcp_echoes")


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


@pytest.fixture
def discover(kube_api: KubeApiServer, tmp_path: Path) -> Iterator[MakeDiscovery]:
    """Start a Discovery for a config, as node-a, with the API server's kubeconfig; stopped at the end."""
    started: list[Discovery] = []
    kubeconfig = kube_api.write_kubeconfig(tmp_path / "kubeconfig")

    def make(config: Config, watch_timeout: float | None = None, env: dict[str, str] | None = None) -> Discovery:
        if watch_timeout is not None:
            config = config.model_copy(update={"watch_timeout": watch_timeout})
        discovery = Discovery(env or {"KUBECONFIG": kubeconfig}, Identity("node-a", "default"),
                              config.watch_timeout, lambda: None)
        discovery.set_config(config)
        started.append(discovery)
        return discovery

    yield make
    for discovery in started:
        discovery.stop()


def backends(discovery: Discovery, route: str = "dogstatsd") -> list[str]:
    """What `discovery` says `route` forwards to now, as text."""
    return [str(b) for b in discovery.endpoints().get(route, [])]


@pytest.fixture
def promtool() -> str:
    """promtool's path; under `make test` a test that asks for it fails without it (tests/promtool.py)."""
    return find_promtool()
