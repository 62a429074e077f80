"""Real nginx, started from a rendered config, forwarding real traffic on loopback."""

from __future__ import annotations

import socket

import pytest

from proxyctl.backend import Backend
from proxyctl.config import load_config
from proxyctl.render import has_ipv6_loopback
from tests.support import free_port, tcp_exchange, wait_for


def _config(*routes: str) -> str:
    return "routes:\n" + "".join(routes)


def test_udp_datagrams_reach_two_backends_in_turn(run_nginx, udp_sinks) -> None:
    port = free_port()
    a, b = udp_sinks("127.0.0.2", port), udp_sinks("127.0.0.3", port)
    config = load_config(f"routes:\n  - {{name: dogstatsd, port: {port}, protocol: udp, selector: app=dd-agent}}\n")
    run_nginx(config, {"dogstatsd": [Backend("127.0.0.2", port), Backend("127.0.0.3", port)]})

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        for i in range(10):
            client.sendto(f"page.views:{i}|c".encode(), ("127.0.0.1", port))
            wait_for(lambda: len(a.received) + len(b.received) == i + 1, 5, what=f"datagram {i}")

    assert len(a.received) == 5 and len(b.received) == 5
    assert sorted(a.received + b.received) == sorted(f"page.views:{i}|c".encode() for i in range(10))


def test_tcp_route_round_trips_bytes(run_nginx, tcp_echoes) -> None:
    port = free_port()
    backend = tcp_echoes("127.0.0.2", port)
    config = load_config(f"routes:\n  - {{port: {port}, protocol: tcp, selector: app=fluentd}}\n")
    run_nginx(config, {f"tcp-{port}": [Backend(*backend.address)]})

    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        for message in (b"first", b"second" * 1000):
            conn.sendall(message)
            expected = b"127.0.0.2:" + message
            received = b""
            while len(received) < len(expected):
                received += conn.recv(65536)
            assert received == expected


def test_same_port_serves_tcp_and_udp_at_once(run_nginx, udp_sinks, tcp_echoes) -> None:
    port = free_port()
    sink, echo = udp_sinks("127.0.0.2", port), tcp_echoes("127.0.0.3", port)
    config = load_config(
        f"routes:\n  - {{port: {port}, protocol: udp, selector: app=a}}\n"
        f"  - {{port: {port}, protocol: tcp, selector: app=b}}\n"
    )
    run_nginx(config, {f"udp-{port}": [Backend("127.0.0.2", port)], f"tcp-{port}": [Backend("127.0.0.3", port)]})

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.sendto(b"hits:1|c", ("127.0.0.1", port))
    assert tcp_exchange(port, b"ping") == b"127.0.0.3:ping"
    wait_for(lambda: sink.received == [b"hits:1|c"], 5, what="datagram at the udp backend")
    assert echo.connections == 1


def test_route_without_backend_refuses_tcp_and_drops_udp(run_nginx, udp_sinks) -> None:
    tcp_port, udp_port = free_port(), free_port()
    config = load_config(
        f"routes:\n  - {{port: {tcp_port}, protocol: tcp, selector: app=gone}}\n"
        f"  - {{port: {udp_port}, protocol: udp, selector: app=gone}}\n"
    )
    run_nginx(config, {})  # nginx -t accepted it, or this would raise

    # Refused, not accepted and closed: a client that buffers keeps its data and retries.
    with pytest.raises(ConnectionRefusedError):
        tcp_exchange(tcp_port, b"hello")

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.settimeout(0.3)
        client.sendto(b"hits:1|c", ("127.0.0.1", udp_port))
        try:
            reply = client.recv(100)
        except (socket.timeout, ConnectionRefusedError):
            reply = None
    assert reply is None
    # The UDP port stays bound by nginx: no other program gets its datagrams.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as squatter, pytest.raises(OSError):
        squatter.bind(("127.0.0.1", udp_port))


def test_ipv6_backend_is_bracketed_and_reachable(run_nginx, tcp_echoes) -> None:
    port = free_port()
    try:
        server = tcp_echoes("::1", port)
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc}")
    # Listening on 127.0.0.1 only: the backend holds [::1]:port.
    config = load_config(f"listenAddress: 127.0.0.1\nroutes:\n  - {{port: {port}, protocol: tcp, selector: app=v6}}\n")
    run_nginx(config, {f"tcp-{port}": [Backend("::1", port)]})
    assert tcp_exchange(port, b"six") == b"::1:six"
    assert server.connections == 1


def test_default_config_takes_datagrams_sent_to_ipv6_loopback(run_nginx, udp_sinks) -> None:
    """Where `localhost` resolves to ::1 first, statsd clients send there."""
    if not has_ipv6_loopback():
        pytest.skip("no IPv6 loopback here")
    port = free_port()
    sink = udp_sinks("127.0.0.2", port)
    config = load_config(f"routes:\n  - {{name: dogstatsd, port: {port}, protocol: udp, selector: app=dd-agent}}\n")
    run_nginx(config, {"dogstatsd": [Backend("127.0.0.2", port)]})

    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as client:
        client.sendto(b"v6.hits:1|c", ("::1", port))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.sendto(b"v4.hits:1|c", ("127.0.0.1", port))
    wait_for(lambda: sorted(sink.received) == [b"v4.hits:1|c", b"v6.hits:1|c"], 5, what="both datagrams")


def test_hash_keeps_each_client_socket_on_one_backend_and_spreads_the_sockets(run_nginx, udp_sinks) -> None:
    """Every client of the sidecar is 127.0.0.1: hashing the address alone would send all of
    them to one backend. The address and port keep a socket's datagrams together instead."""
    port = free_port()
    a, b = udp_sinks("127.0.0.2", port), udp_sinks("127.0.0.3", port)
    config = load_config(f"routes:\n  - {{name: statsd, port: {port}, protocol: udp, selector: app=a, "
                         f"balance: hash}}\n")
    run_nginx(config, {"statsd": [Backend("127.0.0.2", port), Backend("127.0.0.3", port)]})

    for client_number in range(20):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            for i in range(3):
                client.sendto(f"client{client_number}:{i}|c".encode(), ("127.0.0.1", port))
            wait_for(lambda: len(a.received) + len(b.received) == 3 * (client_number + 1), 5,
                     what=f"client {client_number}'s datagrams")
    for sink in (a, b):
        clients = {datagram.split(b":")[0] for datagram in sink.received}
        assert clients and len(sink.received) == 3 * len(clients), sink.received  # whole sockets only
