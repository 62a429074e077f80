"""Rendering alone: what the per-route options become in nginx.conf."""

from __future__ import annotations

import re
from pathlib import Path

from proxyctl.backend import Backend
from proxyctl.config import load_config
from proxyctl.render import MAX_CONNECTIONS, render


def test_route_options_become_nginx_directives() -> None:
    config = load_config(
        "listenAddress: '::1'\nroutes:\n"
        "  - {name: logs, port: 24224, protocol: tcp, selector: app=fluentd, balance: least_conn, timeout: 1h}\n"
        "  - {name: traces, port: 6831, protocol: udp, selector: app=jaeger, balance: hash, udpResponses: 1,"
        " timeout: 500ms}\n"
    )
    text = render(config, {"logs": [Backend("fd00::5", 24224)], "traces": [Backend("10.0.0.7", 6831)]},
                  Path("/state"))
    logs = text[text.index("upstream logs"):text.index("# traces")]
    traces = text[text.index("upstream traces"):]
    assert "least_conn;" in logs and "server [fd00::5]:24224;" in logs
    assert "listen [::1]:24224;" in logs and "proxy_timeout 3600000ms;" in logs
    assert "hash $remote_addr$remote_port consistent;" in traces and "listen [::1]:6831 udp rcvbuf=4m;" in traces
    assert "proxy_responses 1;" in traces and "proxy_timeout 500ms;" in traces


def test_connection_table_grows_with_routes_within_the_cap_and_the_open_file_limit() -> None:
    def connections(routes: int, open_files: int | None = None) -> int:
        lines = "".join(f"  - {{port: {1000 + i}, protocol: udp, selector: app=a}}\n" for i in range(routes))
        text = render(load_config("routes:\n" + lines), {}, Path("/state"), open_files=open_files)
        return int(re.search(r"worker_connections (\d+);", text).group(1))

    assert connections(1) == 1024 and connections(3) == 3072
    assert connections(100) == MAX_CONNECTIONS
    assert connections(3, open_files=1024) == (1024 - 64) // 2


def _routes(extra: str = "") -> str:
    return (f"{extra}routes:\n  - {{name: logs, port: 24224, protocol: tcp, selector: app=fluentd}}\n"
            "  - {name: metrics, port: 8125, protocol: udp, selector: app=dd-agent}\n")


def test_default_listens_on_both_loopbacks_where_ipv6_exists_and_listen_address_overrides() -> None:
    backends = {"logs": [Backend("10.0.0.5", 24224)], "metrics": [Backend("10.0.0.5", 8125)]}

    def listens(config: str, ipv6_loopback: bool) -> list[str]:
        text = render(load_config(config), backends, Path("/state"), ipv6_loopback=ipv6_loopback)
        return re.findall(r"listen ([^;]+);", text)

    assert listens(_routes(), True) == ["127.0.0.1:24224", "[::1]:24224",
                                        "127.0.0.1:8125 udp rcvbuf=4m", "[::1]:8125 udp rcvbuf=4m"]
    assert listens(_routes(), False) == ["127.0.0.1:24224", "127.0.0.1:8125 udp rcvbuf=4m"]
    for address, host in (("127.0.0.1", "127.0.0.1"), ("0.0.0.0", "0.0.0.0"), ("'::'", "[::]")):
        assert listens(_routes(f"listenAddress: {address}\n"), True) == [f"{host}:24224",
                                                                           f"{host}:8125 udp rcvbuf=4m"]


def test_a_tcp_route_without_backend_has_no_listener_and_udp_keeps_its_port() -> None:
    text = render(load_config(_routes()), {}, Path("/state"), ipv6_loopback=False)
    assert "24224;" not in text and "upstream logs" not in text
    assert "listen 127.0.0.1:8125 udp" in text and 'return "";' in text


def test_each_server_tallies_its_sessions_in_a_file_of_its_route() -> None:
    """Forwarded sessions, and datagrams a UDP route without backend drops; a refusing TCP route has no server."""
    backends = {"logs": [Backend("10.0.0.5", 24224)]}
    text = render(load_config(_routes()), backends, Path("/state"), ipv6_loopback=False)
    assert "log_format proxyctl_tally '';" in text
    assert re.findall(r"access_log (\S+) proxyctl_tally buffer=32k flush=1s;", text) == [
        '"/state/logs.sessions"', '"/state/metrics.no-backend"']
