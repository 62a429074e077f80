"""`proxyctl run` end to end: a process, the test API server, real nginx, real backends."""

from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import time

from tests.kubeapi import KubeApiServer
from tests.support import free_port, tcp_exchange, wait_for

NS = "kube-system"
AGENT = {"app": "dd-agent"}


def udp_route(port: int, name: str = "dogstatsd", extra: str = "") -> str:
    return f"  - {{name: {name}, port: {port}, protocol: udp, selector: app=dd-agent, namespace: {NS}{extra}}}\n"


def tcp_route(port: int, name: str = "fluentd", selector: str = "app=fluentd") -> str:
    return f"  - {{name: {name}, port: {port}, protocol: tcp, selector: {selector}, namespace: {NS}}}\n"


def send(port: int, payload: bytes) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.sendto(payload, ("127.0.0.1", port))


def test_udp_and_tcp_reach_node_local_pods_and_never_another_node(kube_api: KubeApiServer, proxyctl, udp_sinks,
                                                                   tcp_echoes) -> None:
    port = free_port()
    local, remote = udp_sinks("127.0.0.2", port), udp_sinks("127.0.0.3", port)
    local_tcp, remote_tcp = tcp_echoes("127.0.0.2", port), tcp_echoes("127.0.0.3", port)
    kube_api.add_pod("agent-a", NS, AGENT, node="node-a", ip="127.0.0.2")
    kube_api.add_pod("agent-b", NS, AGENT, node="node-b", ip="127.0.0.3")
    kube_api.add_pod("fluentd-a", NS, {"app": "fluentd"}, node="node-a", ip="127.0.0.2")
    kube_api.add_pod("fluentd-b", NS, {"app": "fluentd"}, node="node-b", ip="127.0.0.3")
    sidecar = proxyctl("routes:\n" + udp_route(port) + tcp_route(port))

    for i in range(20):
        send(port, f"requests:{i}|c".encode())
        assert tcp_exchange(port, b"log line") == b"127.0.0.2:log line"
    wait_for(lambda: len(local.received) == 20, 5, what="20 datagrams at the local agent")
    assert remote.received == [] and remote_tcp.connections == 0 and local_tcp.connections == 20

    routes = json.loads(sidecar.get("/routes")[1])["routes"]
    def local(pod: str) -> dict[str, object]:
        return {"address": f"127.0.0.2:{port}", "pod": pod, "node": "node-a", "fallback": False, "terminating": False}

    assert routes == [
        {"name": "dogstatsd", "port": port, "protocol": "udp", "backends": [local("agent-a")]},
        {"name": "fluentd", "port": port, "protocol": "tcp", "backends": [local("fluentd-a")]},
    ]


def test_traffic_follows_a_replaced_pod(kube_api: KubeApiServer, proxyctl, udp_sinks) -> None:
    port = free_port()
    hosts = [f"127.0.0.{10 + change}" for change in range(21)]  # each pod its own IP: no stale arrivals
    kube_api.add_pod("agent-0", NS, AGENT, node="node-a", ip=hosts[0])
    proxyctl("routes:\n" + udp_route(port))

    delays = []
    for change in range(1, 21):
        sink = udp_sinks(hosts[change], port)
        kube_api.delete_pod(NS, f"agent-{change - 1}")
        changed_at = time.monotonic()
        kube_api.add_pod(f"agent-{change}", NS, AGENT, node="node-a", ip=hosts[change])

        def arrived() -> bool:
            send(port, b"heartbeat:1|c")
            return sink.first_at is not None

        wait_for(arrived, 5, interval=0.005, what=f"traffic at the new pod {hosts[change]}")
        delays.append(sink.first_at - changed_at)
    print(f"\npod replaced -> first datagram at the new pod over {len(delays)} changes: "
          f"median {statistics.median(delays) * 1000:.0f} ms, max {max(delays) * 1000:.0f} ms")
    assert statistics.median(delays) < 1.0


def test_configmap_swap_adds_changes_and_removes_routes_and_survives_a_bad_one(kube_api: KubeApiServer, proxyctl,
                                                                              udp_sinks, tcp_echoes) -> None:
    kept, removed, added = free_port(), free_port(), free_port()
    kube_api.add_pod("agent", NS, AGENT, node="node-a", ip="127.0.0.2")
    kube_api.add_pod("fluentd", NS, {"app": "fluentd"}, node="node-a", ip="127.0.0.3")
    kube_api.add_pod("fluent-bit", NS, {"app": "fluent-bit"}, node="node-a", ip="127.0.0.4")
    sink = udp_sinks("127.0.0.2", kept)
    for host, port in (("127.0.0.3", removed), ("127.0.0.4", removed), ("127.0.0.3", added)):
        tcp_echoes(host, port)
    sidecar = proxyctl("routes:\n" + udp_route(kept) + tcp_route(removed))
    assert tcp_exchange(removed, b"x") == b"127.0.0.3:x"

    # Swap: keep dogstatsd, point fluentd elsewhere, and move it to another port.
    swapped_at = time.monotonic()
    sidecar.configmap.write(sidecar.with_health(
        "routes:\n" + udp_route(kept) + tcp_route(added, "fluentd") + tcp_route(removed, "bit", "app=fluent-bit")
    ))
    wait_for(lambda: _answers(added, b"127.0.0.3:y"), 10, what="the added route answering")
    print(f"\nconfig swap -> new route answering: {(time.monotonic() - swapped_at) * 1000:.0f} ms")
    # The changed route: nginx's old worker may accept for ~100 ms more while the new one starts.
    wait_for(lambda: _answers(removed, b"127.0.0.4:z"), 5, what="the changed route's new backend")
    send(kept, b"kept:1|c")
    wait_for(lambda: b"kept:1|c" in sink.received, 5, what="the kept route still forwarding")
    assert sidecar.metric("proxyctl_config_valid") == 1

    # A broken ConfigMap: nothing changes, and the sidecar says so.
    sidecar.configmap.write(sidecar.with_health("routes:\n  - {port: 1, protocol: tpc, selector: a=b}\n"))
    wait_for(lambda: sidecar.metric("proxyctl_config_valid") == 0, 10, what="config_valid 0")
    assert "routes[0].protocol: must be 'udp' or 'tcp', got 'tpc'" in sidecar.log()
    assert sidecar.get("/readyz")[0] == 503
    assert tcp_exchange(added, b"still") == b"127.0.0.3:still"
    send(kept, b"kept:2|c")
    wait_for(lambda: b"kept:2|c" in sink.received, 5, what="traffic through the last good config")

    # A config nginx refuses (the listen address is not on this machine): also kept out.
    sidecar.configmap.write(sidecar.with_health("listenAddress: 192.0.2.1\nroutes:\n" + udp_route(kept)))
    wait_for(lambda: "nginx -t: bind() to 192.0.2.1" in sidecar.log(), 10, what="nginx's refusal in the log")
    assert sidecar.metric("proxyctl_config_valid") == 0
    assert tcp_exchange(added, b"again") == b"127.0.0.3:again"

    # The next valid swap recovers.
    sidecar.configmap.write(sidecar.with_health("routes:\n" + udp_route(kept)))
    wait_for(lambda: sidecar.metric("proxyctl_config_valid") == 1, 10, what="config_valid 1")
    wait_for(lambda: not _answers(added, b"127.0.0.3:gone"), 10, what="the dropped route closed")
    assert sidecar.get("/readyz")[0] == 200


def _answers(port: int, expected: bytes) -> bool:
    try:
        return tcp_exchange(port, expected.split(b":", 1)[1]) == expected
    except OSError:
        return False


def test_no_reload_when_nothing_that_renders_changed(kube_api: KubeApiServer, proxyctl) -> None:
    port = free_port()
    kube_api.add_pod("agent", NS, AGENT, node="node-a", ip="127.0.0.2")
    sidecar = proxyctl("routes:\n" + udp_route(port))
    reloads = sidecar.metric("proxyctl_reloads_total")

    kube_api.add_pod("elsewhere", NS, AGENT, node="node-b", ip="127.0.0.3")  # another node: not watched
    kube_api.update_pod(NS, "agent", labels={**AGENT, "version": "2"})  # a change that renders the same
    sidecar.configmap.write(sidecar.with_health("# a comment only\nroutes:\n" + udp_route(port)))
    kube_api.add_pod("marker", NS, AGENT, node="node-a", ip="127.0.0.4")  # this one does render
    wait_for(lambda: "127.0.0.4" in sidecar.get("/routes")[1], 10, what="the marker pod")
    assert sidecar.metric("proxyctl_reloads_total") == reloads + 1


def test_nginx_killed_comes_back_and_traffic_resumes(kube_api: KubeApiServer, proxyctl, udp_sinks) -> None:
    port = free_port()
    sink = udp_sinks("127.0.0.2", port)
    kube_api.add_pod("agent", NS, AGENT, node="node-a", ip="127.0.0.2")
    sidecar = proxyctl("routes:\n" + udp_route(port))
    old_pid = sidecar.nginx_pid()

    os.kill(old_pid, signal.SIGKILL)
    wait_for(lambda: sidecar.metric("proxyctl_nginx_restarts_total") == 1, 10, what="nginx restarted")

    def forwarded() -> bool:
        send(port, b"after:1|c")
        return b"after:1|c" in sink.received

    wait_for(forwarded, 10, interval=0.05, what="traffic after the restart")
    assert sidecar.nginx_pid() != old_pid
    wait_for(lambda: sidecar.get("/readyz")[0] == 200, 5, what="ready again")


def test_sigterm_lets_an_open_tcp_conversation_finish_then_exits_0(kube_api: KubeApiServer, proxyctl,
                                                                    tcp_echoes) -> None:
    port = free_port()
    tcp_echoes("127.0.0.2", port)
    kube_api.add_pod("fluentd", NS, {"app": "fluentd"}, node="node-a", ip="127.0.0.2")
    sidecar = proxyctl("routes:\n" + tcp_route(port))

    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(b"before")
        assert conn.recv(100) == b"127.0.0.2:before"
        sidecar.process.send_signal(signal.SIGTERM)
        wait_for(lambda: _refused(port), 10, what="the listener closed to new connections")
        conn.sendall(b"during shutdown")
        assert conn.recv(100) == b"127.0.0.2:during shutdown"
    assert sidecar.process.wait(30) == 0


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return True
    return False


def test_the_original_env_var_pod_forwards_dogstatsd_from_a_real_client(kube_api: KubeApiServer, proxyctl,
                                                                        udp_sinks) -> None:
    from datadog.dogstatsd import DogStatsd

    port = free_port()
    sink = udp_sinks("127.0.0.2", port)
    kube_api.add_pod("dd-agent-x1", NS, AGENT, node="node-a", ip="127.0.0.2")
    kube_api.add_pod("dd-agent-y2", NS, AGENT, node="node-b", ip="127.0.0.3")
    # The original image's pod spec: only these variables (and the downward API's pod name).
    kube_api.add_pod("myapp", "default", {"app": "web"}, node="node-a", ip="127.0.0.9")
    proxyctl(env={"PORT": str(port), "SELECTOR": "app=dd-agent", "PROTOCOL": "udp", "NAMESPACE": NS,
                  "MY_POD_NAME": "myapp", "MY_POD_NAMESPACE": "default", "NODE_NAME": ""})

    # Inside a container the client would append its container id (`|c:...`, origin detection).
    statsd = DogStatsd(host="127.0.0.1", port=port, disable_telemetry=True, disable_buffering=True,
                       origin_detection_enabled=False)
    statsd.increment("page.views", tags=["env:test"])
    statsd.gauge("queue.depth", 7)
    wait_for(lambda: len(sink.received) == 2, 5, what="both metrics at the local agent")
    assert [d.strip() for d in sink.received] == [b"page.views:1|c|#env:test", b"queue.depth:7|g"]


def test_json_logs_are_one_object_per_line(kube_api: KubeApiServer, proxyctl) -> None:
    port = free_port()
    kube_api.add_pod("agent", NS, AGENT, node="node-a", ip="127.0.0.2")
    sidecar = proxyctl("routes:\n" + udp_route(port), env={"LOG_FORMAT": "json"})
    kube_api.update_pod(NS, "agent", ip="127.0.0.3")
    wait_for(lambda: "127.0.0.3" in sidecar.get("/routes")[1], 10, what="the change")
    assert sidecar.stop() == 0
    entries = [json.loads(line) for line in sidecar.log().splitlines()]
    assert {"time", "level", "logger", "message"} <= set(entries[0])
    assert any(e["message"].startswith("reloaded nginx: dogstatsd -> 127.0.0.3") for e in entries)
