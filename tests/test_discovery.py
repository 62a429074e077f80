"""Discovery against the test API server: the real kubernetes client over real HTTP."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from proxyctl.config import Config, load_config
from proxyctl import discovery as discovery_module
from proxyctl.backend import Backend
from proxyctl.discovery import Discovery
from tests.conftest import backends
from tests.kubeapi import KubeApiServer
from tests.support import wait_for

NS = "kube-system"
AGENT = {"app": "dd-agent"}


def routes(*lines: str, extra: str = "") -> Config:
    return load_config(extra + "routes:\n" + "".join(f"  - {line}\n" for line in lines))


DOGSTATSD = "{name: dogstatsd, port: 8125, protocol: udp, selector: app=dd-agent, namespace: kube-system}"


def test_only_local_ready_matching_live_pods_with_an_ip_are_backends(kube_api: KubeApiServer, discover) -> None:
    kube_api.add_pod("local", NS, AGENT, node="node-a", ip="127.0.0.2")
    kube_api.add_pod("other-node", NS, AGENT, node="node-b", ip="127.0.0.3")
    kube_api.add_pod("other-app", NS, {"app": "web"}, node="node-a", ip="127.0.0.4")
    kube_api.add_pod("not-ready", NS, AGENT, node="node-a", ip="127.0.0.5", ready=False)
    kube_api.add_pod("no-ip", NS, AGENT, node="node-a", ip=None)
    kube_api.add_pod("other-ns", "default", AGENT, node="node-a", ip="127.0.0.6")
    kube_api.add_pod("leaving", NS, AGENT, node="node-a", ip="127.0.0.7")
    kube_api.update_pod(NS, "leaving", terminating=True)

    discovery = discover(routes(DOGSTATSD))
    assert discovery.wait_synced(10)
    assert backends(discovery) == ["127.0.0.2:8125"]


def test_add_modify_delete_node_and_readiness_changes_are_followed(kube_api: KubeApiServer, discover) -> None:
    discovery = discover(routes(DOGSTATSD))
    assert discovery.wait_synced(10) and backends(discovery) == []

    def expect(expected: list[str]) -> None:
        wait_for(lambda: backends(discovery) == expected, 10, what=f"backends {expected}, have {backends(discovery)}")

    kube_api.add_pod("agent", NS, AGENT, node="node-a", ip="127.0.0.2")
    expect(["127.0.0.2:8125"])
    kube_api.update_pod(NS, "agent", ip="127.0.0.3")
    expect(["127.0.0.3:8125"])
    kube_api.update_pod(NS, "agent", ready=False)
    expect([])
    kube_api.update_pod(NS, "agent", ready=True)
    expect(["127.0.0.3:8125"])
    kube_api.update_pod(NS, "agent", node="node-b")
    expect([])
    kube_api.update_pod(NS, "agent", node="node-a")
    expect(["127.0.0.3:8125"])
    kube_api.update_pod(NS, "agent", labels={"app": "web"})
    expect([])
    kube_api.add_pod("agent-2", NS, AGENT, node="node-a", ip="127.0.0.4")
    expect(["127.0.0.4:8125"])
    kube_api.delete_pod(NS, "agent-2")
    expect([])


def test_named_target_port_resolves_per_pod_and_ipv6_is_bracketed(kube_api: KubeApiServer, discover) -> None:
    ports = [{"name": "otlp-grpc", "containerPort": 4317, "protocol": "TCP"}]
    kube_api.add_pod("otel-1", NS, {"app": "otel"}, node="node-a", ip="127.0.0.2", ports=ports)
    kube_api.add_pod("otel-2", NS, {"app": "otel"}, node="node-a", ip="fd00::5",
                     ports=[{"name": "otlp-grpc", "containerPort": 14317, "protocol": "TCP"}])
    kube_api.add_pod("otel-3", NS, {"app": "otel"}, node="node-a", ip="127.0.0.4")  # no such port: skipped
    discovery = discover(routes("{name: otel, port: 4317, protocol: tcp, selector: app=otel, "
                                "namespace: kube-system, targetPort: otlp-grpc}"))
    assert discovery.wait_synced(10)
    assert backends(discovery, "otel") == ["127.0.0.2:4317", "[fd00::5]:14317"]


def test_routes_on_one_namespace_keep_their_own_pods_and_share_watches(kube_api: KubeApiServer, discover) -> None:
    kube_api.add_pod("statsd", NS, AGENT, node="node-a", ip="127.0.0.2")
    kube_api.add_pod("fluentd", NS, {"app": "fluentd"}, node="node-a", ip="127.0.0.3")
    discovery = discover(routes(
        DOGSTATSD,
        "{name: dogstatsd-tcp, port: 8125, protocol: tcp, selector: app=dd-agent, namespace: kube-system}",
        "{name: fluentd, port: 24224, protocol: tcp, selector: 'app in (fluentd)', namespace: kube-system}",
    ))
    assert discovery.wait_synced(10)
    assert {name: [str(b) for b in found] for name, found in discovery.endpoints().items()} == {
        "dogstatsd": ["127.0.0.2:8125"],
        "dogstatsd-tcp": ["127.0.0.2:8125"],
        "fluentd": ["127.0.0.3:24224"],
    }
    assert len(discovery.watches) == 2  # the two dd-agent routes share one list + watch
    assert kube_api.count(watch=False) == 2


def test_a_watch_ended_by_the_server_resumes_without_relisting(kube_api: KubeApiServer, discover) -> None:
    discovery = discover(routes(DOGSTATSD), watch_timeout=1)
    assert discovery.wait_synced(10)
    wait_for(lambda: kube_api.count(watch=True) >= 4, 10, what="four watch requests")
    kube_api.add_pod("agent", NS, AGENT, node="node-a", ip="127.0.0.2")
    wait_for(lambda: backends(discovery) == ["127.0.0.2:8125"], 10, what="the new pod")

    assert kube_api.count(watch=False) == 1
    watches = [r for r in kube_api.requests if r.is_watch]
    assert all(r.query.get("resourceVersion") for r in watches)
    assert all(r.query.get("fieldSelector") == "spec.nodeName=node-a" for r in kube_api.requests)
    assert all(r.query.get("allowWatchBookmarks") == "true" for r in watches)


def test_410_gone_after_compaction_leads_to_exactly_one_relist(kube_api: KubeApiServer, discover) -> None:
    kube_api.add_pod("agent", NS, AGENT, node="node-a", ip="127.0.0.2")
    discovery = discover(routes(DOGSTATSD), watch_timeout=60)
    assert discovery.wait_synced(10)
    wait_for(lambda: kube_api.open_watches == 1, 10, what="an open watch")

    kube_api.add_pod("unrelated", "default", {"app": "web"})  # moves the resourceVersion on
    kube_api.compact()
    kube_api.reset_watches()  # the watch must reconnect, from a now compacted resourceVersion
    kube_api.update_pod(NS, "agent", ip="127.0.0.3")
    wait_for(lambda: backends(discovery) == ["127.0.0.3:8125"], 10, what="the change after the relist")

    assert kube_api.count(watch=False) == 2
    assert discovery.restarts >= 2  # the reset, then the 410


def test_a_stalled_watch_is_replaced_and_a_change_made_meanwhile_is_seen(kube_api: KubeApiServer, discover,
                                                                           caplog: pytest.LogCaptureFixture) -> None:
    kube_api.bookmark_interval = None
    discovery = discover(routes(DOGSTATSD), watch_timeout=1)
    assert discovery.wait_synced(10)
    wait_for(lambda: kube_api.open_watches == 1, 10, what="an open watch")

    kube_api.stall_watches = True
    kube_api.add_pod("agent", NS, AGENT, node="node-a", ip="127.0.0.2")  # not delivered: the stream is silent

    def said_stalled() -> list[float]:
        return [r.created for r in caplog.records if "watch stalled" in r.getMessage()]

    wait_for(said_stalled, 10, what="the stall reported")
    said_at = said_stalled()[0]

    def watches() -> list[float]:
        return [r.time for r in kube_api.requests if r.is_watch]

    wait_for(lambda: watches()[-1] > said_at, 10, what="a replacement watch")
    opened = max(t for t in watches() if t < said_at)  # the watch that went silent
    replaced = min(t for t in watches() if t > said_at)
    # Detected after 1.5 × watchTimeout of silence, replaced after a short backoff (≤ 0.2 s).
    assert 1.5 * 1 - 0.1 < said_at - opened < 1.5 * 1 + 0.5
    assert replaced - said_at < 0.5

    kube_api.stall_watches = False
    wait_for(lambda: backends(discovery) == ["127.0.0.2:8125"], 10, what="the change made during the stall")


def test_403_names_the_missing_permission_once(kube_api: KubeApiServer, discover,
                                               caplog: pytest.LogCaptureFixture) -> None:
    kube_api.forbid_namespace(NS)
    kube_api.add_pod("agent", NS, AGENT, node="node-a", ip="127.0.0.2")
    discovery = discover(routes(DOGSTATSD))
    wait_for(lambda: kube_api.count(path_contains=NS) >= 3, 15, what="three forbidden attempts")
    said = [r.getMessage() for r in caplog.records if "403" in r.getMessage()]
    assert len(said) == 1
    assert "grant list and watch on pods in namespace kube-system" in said[0]

    kube_api.allow_namespace(NS)
    wait_for(lambda: backends(discovery) == ["127.0.0.2:8125"], 15, what="pods once allowed")


def test_401_is_retried_with_a_re_read_token(kube_api: KubeApiServer, discover, tmp_path: Path) -> None:
    token_file = kube_api.write_token_file(tmp_path / "token")
    kubeconfig = kube_api.write_kubeconfig(tmp_path / "kubeconfig-token-file", token_file=token_file)
    kube_api.add_pod("agent", NS, AGENT, node="node-a", ip="127.0.0.2")
    discovery = discover(routes(DOGSTATSD), env={"KUBECONFIG": kubeconfig})
    assert discovery.wait_synced(10) and backends(discovery) == ["127.0.0.2:8125"]

    kube_api.rotate_token("rotated")
    kube_api.reset_watches()  # the next request carries the old token and gets 401
    kube_api.update_pod(NS, "agent", ip="127.0.0.3")
    wait_for(lambda: kube_api.count(watch=None) and any(r.status == 401 for r in kube_api.requests), 10,
             what="a 401")
    Path(token_file).write_text("rotated")  # the kubelet rotates the mounted token
    wait_for(lambda: backends(discovery) == ["127.0.0.3:8125"], 15, what="recovery with the new token")


def test_an_api_server_down_at_start_up_is_retried_until_it_comes(kube_api: KubeApiServer, discover) -> None:
    kube_api.add_pod("agent", NS, AGENT, node="node-a", ip="127.0.0.2")
    kube_api.stop()
    discovery = discover(routes(DOGSTATSD))
    assert not discovery.wait_synced(1.0)
    kube_api.start()
    wait_for(lambda: backends(discovery) == ["127.0.0.2:8125"], 15, what="pods once the API is up")


def test_any_node_falls_back_to_other_nodes_only_while_no_local_pod(kube_api: KubeApiServer, discover) -> None:
    kube_api.add_pod("local", NS, AGENT, node="node-a", ip="127.0.0.2")
    kube_api.add_pod("remote", NS, AGENT, node="node-b", ip="127.0.0.3")
    discovery = discover(routes(DOGSTATSD.replace("}", ", whenNoLocalPod: anyNode}"),
                                "{name: strict, port: 8126, protocol: udp, selector: app=dd-agent, "
                                "namespace: kube-system}"))
    assert discovery.wait_synced(10)
    assert backends(discovery) == ["127.0.0.2:8125"] and len(discovery.watches) == 1

    kube_api.delete_pod(NS, "local")
    wait_for(lambda: backends(discovery) == ["127.0.0.3:8125"], 10, what="the other node's pod")
    assert backends(discovery, "strict") == []  # reject: no fallback
    assert any(key.node is None for key in discovery.watches)

    kube_api.add_pod("local-2", NS, AGENT, node="node-a", ip="127.0.0.4")
    wait_for(lambda: backends(discovery) == ["127.0.0.4:8125"], 10, what="only the local pod again")
    wait_for(lambda: all(key.node == "node-a" for key in discovery.watches), 5, what="the fallback watch closed")


def test_steady_state_costs_one_watch_request_per_timeout(kube_api: KubeApiServer, discover) -> None:
    kube_api.add_pod("agent", NS, AGENT, node="node-a", ip="127.0.0.2")
    discovery = discover(routes(DOGSTATSD), watch_timeout=1)
    assert discovery.wait_synced(10)
    start = kube_api.count()
    wait_for(lambda: kube_api.count(watch=True) >= 5, 10, what="five watch timeouts")
    requests = kube_api.requests[start:]
    assert all(r.is_watch and r.status == 200 for r in requests)
    spans = [b.time - a.time for a, b in zip(requests, requests[1:])]
    assert all(span > 0.8 for span in spans), spans  # one request per ~1 s timeout, no more
    assert discovery.restarts == 0


def test_malformed_pods_from_the_api_are_skipped_with_a_log_line(kube_api: KubeApiServer, discover,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    good = kube_api.add_pod("good", NS, AGENT, node="node-a", ip="127.0.0.2")
    bad_ip = {**good, "metadata": {**good["metadata"], "name": "bad-ip", "uid": "bad-ip"},
              "status": {**good["status"], "podIP": "127.0.0.2; } stream {"}}
    no_status = {k: v for k, v in good.items() if k != "status"}
    no_status["metadata"] = {**good["metadata"], "name": "no-status", "uid": "no-status"}
    kube_api.put_raw_pod(bad_ip)
    kube_api.put_raw_pod(no_status)
    discovery = discover(routes(DOGSTATSD))
    assert discovery.wait_synced(10)
    assert backends(discovery) == ["127.0.0.2:8125"]
    messages = [r.getMessage() for r in caplog.records]
    assert any("bad-ip" in m and "not an IP address" in m for m in messages)
    assert any("no-status" in m and "no status" in m for m in messages)


def test_render_without_endpoints_asks_the_cluster_once(kube_api: KubeApiServer, tmp_path: Path) -> None:
    kube_api.add_pod("local", NS, AGENT, node="node-a", ip="127.0.0.2")
    kube_api.add_pod("remote", NS, AGENT, node="node-b", ip="127.0.0.3")
    config = tmp_path / "proxyctl.yaml"
    config.write_text(f"routes:\n  - {DOGSTATSD}\n")
    env = {**os.environ, "KUBECONFIG": kube_api.write_kubeconfig(tmp_path / "kubeconfig"), "NODE_NAME": "node-a"}
    result = subprocess.run([sys.executable, "-m", "proxyctl", "render", "--config", str(config)],
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "server 127.0.0.2:8125;" in result.stdout and "127.0.0.3" not in result.stdout
    assert [(r.is_watch, r.query.get("fieldSelector")) for r in kube_api.requests] == [(False, "spec.nodeName=node-a")]


ANY_NODE = DOGSTATSD.replace("}", ", whenNoLocalPod: anyNode}")


def cluster_wide(discovery: Discovery) -> bool:
    return any(key.node is None for key in discovery.watches)


def test_a_terminating_pod_still_ready_serves_until_a_staying_one_exists(kube_api: KubeApiServer, discover) -> None:
    kube_api.add_pod("old", NS, AGENT, node="node-a", ip="127.0.0.2")
    discovery = discover(routes(DOGSTATSD))
    assert discovery.wait_synced(10) and backends(discovery) == ["127.0.0.2:8125"]

    def expect(expected: list[str]) -> None:
        wait_for(lambda: backends(discovery) == expected, 10, what=f"backends {expected}, have {backends(discovery)}")

    kube_api.update_pod(NS, "old", terminating=True)  # the only local pod, Ready while it drains
    kube_api.add_pod("other-node", NS, AGENT, node="node-b", ip="127.0.0.9")
    expect(["127.0.0.2:8125"])
    kube_api.add_pod("new", NS, AGENT, node="node-a", ip="127.0.0.3", ready=False)
    expect(["127.0.0.2:8125"])  # the new one does not serve yet
    kube_api.update_pod(NS, "new", ready=True)
    expect(["127.0.0.3:8125"])  # a staying pod wins over a leaving one
    kube_api.update_pod(NS, "new", terminating=True)
    expect(["127.0.0.2:8125", "127.0.0.3:8125"])  # both leaving, both serving
    kube_api.update_pod(NS, "old", ready=False)
    expect(["127.0.0.3:8125"])  # terminating and no longer Ready: done
    kube_api.delete_pod(NS, "new")
    expect([])
    assert not cluster_wide(discovery)  # reject: never another node


def test_any_node_with_no_local_pod_at_the_first_list_falls_back_at_once(kube_api: KubeApiServer,
                                                                          discover) -> None:
    kube_api.add_pod("remote", NS, AGENT, node="node-b", ip="127.0.0.3")
    discovery = discover(routes(ANY_NODE))
    assert discovery.wait_synced(10)  # waits for the fallback the empty first list calls for
    assert backends(discovery) == ["127.0.0.3:8125"] and cluster_wide(discovery)


def test_any_node_route_added_later_with_no_local_pod_falls_back(kube_api: KubeApiServer, discover) -> None:
    kube_api.add_pod("remote", NS, AGENT, node="node-b", ip="127.0.0.3")
    discovery = discover(routes("{name: other, port: 9000, protocol: udp, selector: app=x, namespace: kube-system}"))
    assert discovery.wait_synced(10)
    discovery.set_config(routes(ANY_NODE))  # as a config change does; nobody waits for it here
    wait_for(lambda: backends(discovery) == ["127.0.0.3:8125"], 5, what="the other node's pod")


def test_any_node_lists_other_nodes_while_the_last_local_pod_terminates(kube_api: KubeApiServer, discover) -> None:
    kube_api.add_pod("local", NS, AGENT, node="node-a", ip="127.0.0.2")
    kube_api.add_pod("remote", NS, AGENT, node="node-b", ip="127.0.0.3")
    discovery = discover(routes(ANY_NODE))
    assert discovery.wait_synced(10) and not cluster_wide(discovery)

    kube_api.update_pod(NS, "local", terminating=True)
    wait_for(lambda: cluster_wide(discovery) and all(w.synced.is_set() for w in discovery.watches.values()), 10,
             what="other nodes' pods listed while the local one terminates")
    assert backends(discovery) == ["127.0.0.2:8125"]  # the terminating one still serves meanwhile
    kube_api.delete_pod(NS, "local")
    wait_for(lambda: backends(discovery) == ["127.0.0.3:8125"], 10, what="the other node's pod")

    kube_api.add_pod("local-2", NS, AGENT, node="node-a", ip="127.0.0.4")
    wait_for(lambda: backends(discovery) == ["127.0.0.4:8125"] and not cluster_wide(discovery), 10,
             what="the new local pod, and the fallback closed")


def test_any_node_keeps_what_it_serves_while_a_slow_api_lists_other_nodes(kube_api: KubeApiServer, discover,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    kube_api.add_pod("local", NS, AGENT, node="node-a", ip="127.0.0.2")
    kube_api.add_pod("remote", NS, AGENT, node="node-b", ip="127.0.0.3")
    discovery = discover(routes(ANY_NODE))
    assert discovery.wait_synced(10) and backends(discovery) == ["127.0.0.2:8125"]
    wait_for(lambda: kube_api.open_watches == 1, 10, what="the local watch open")

    kube_api.delay = 1.0  # every new request answers 1 s late; the open watch still streams
    kube_api.delete_pod(NS, "local")  # gone at once: it crashed, or was evicted
    wait_for(lambda: cluster_wide(discovery), 5, what="the fallback watch opened")
    seen = []
    wait_for(lambda: seen.append(backends(discovery)) or seen[-1] == ["127.0.0.3:8125"], 10,
             what="the other node's pod")
    assert all(b in (["127.0.0.2:8125"], ["127.0.0.3:8125"]) for b in seen), seen  # never "no backend"
    assert seen.count(["127.0.0.2:8125"]) > 10  # held while the fallback was listed
    assert any("keeping 127.0.0.2:8125 while other nodes' pods are listed" in r.getMessage() for r in caplog.records)


def test_the_hold_is_bounded_and_says_so(kube_api: KubeApiServer, discover, caplog: pytest.LogCaptureFixture,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(discovery_module, "FALLBACK_HOLD", 0.5)
    kube_api.add_pod("local", NS, AGENT, node="node-a", ip="127.0.0.2")
    kube_api.add_pod("remote", NS, AGENT, node="node-b", ip="127.0.0.3")
    discovery = discover(routes(ANY_NODE))
    assert discovery.wait_synced(10) and backends(discovery) == ["127.0.0.2:8125"]
    wait_for(lambda: kube_api.open_watches == 1, 10, what="the local watch open")

    kube_api.forbid_namespace(NS)  # other nodes' pods cannot be listed at all
    kube_api.delete_pod(NS, "local")
    wait_for(lambda: cluster_wide(discovery), 5, what="the fallback watch opened")
    assert backends(discovery) == ["127.0.0.2:8125"]
    started = time.monotonic()
    wait_for(lambda: backends(discovery) == [], 5, what="the hold to end")
    assert 0.3 < time.monotonic() - started < 1.5
    assert any("still not listed after 0.5s" in r.getMessage() for r in caplog.records)

    kube_api.allow_namespace(NS)
    wait_for(lambda: backends(discovery) == ["127.0.0.3:8125"], 15, what="the other node's pod once listed")


@pytest.mark.parametrize("ip", ["127.0.0.1", "::1", "::ffff:127.0.0.1", "0.0.0.0", "::", "224.0.0.251",
                                "ff02::1", "255.255.255.255"])
def test_a_pod_address_that_is_our_own_listener_or_no_pod_is_skipped_with_a_log_line(
        kube_api: KubeApiServer, discover, caplog: pytest.LogCaptureFixture, ip: str) -> None:
    kube_api.add_pod("odd", NS, AGENT, node="node-a", ip=ip)
    kube_api.add_pod("fine", NS, AGENT, node="node-a", ip="127.0.0.2")  # another loopback: a usable backend
    discovery = discover(routes(DOGSTATSD, "{name: same-port-tcp, port: 8126, protocol: tcp, selector: app=dd-agent, "
                                           "namespace: kube-system, targetPort: 8125}"))
    assert discovery.wait_synced(10)
    assert backends(discovery) == ["127.0.0.2:8125"]
    odd = str(Backend(ip, 8125))  # as the log writes it: bracketed, canonical
    said = [r.getMessage() for r in caplog.records if f"backend {odd} skipped" in r.getMessage()]
    assert said and said[0].startswith("route dogstatsd: ")
    if ip in ("127.0.0.1", "::1", "::ffff:127.0.0.1"):
        assert "own listener" in said[0]
        # The tcp route listens on 8126, not 8125: the same address over TCP is a fine backend.
        assert odd in backends(discovery, "same-port-tcp")
    else:
        assert "is no pod" in said[0]
    backends(discovery)
    assert len([r for r in caplog.records if f"backend {odd} skipped" in r.getMessage()]) == len(said)  # said once


def test_a_wildcard_listener_covers_every_loopback_and_the_pods_own_address(kube_api: KubeApiServer, discover,
                                                                            tmp_path: Path) -> None:
    for name, ip in (("loopback", "127.0.0.5"), ("me", "192.0.2.10"), ("neighbour", "192.0.2.11")):
        kube_api.add_pod(name, NS, AGENT, node="node-a", ip=ip)
    env = {"KUBECONFIG": kube_api.write_kubeconfig(tmp_path / "kubeconfig-pod-ip"), "POD_IP": "192.0.2.10"}
    discovery = discover(routes(DOGSTATSD, "{name: elsewhere, port: 9125, protocol: udp, selector: app=dd-agent, "
                                           "namespace: kube-system, targetPort: 7000}",
                                extra="listenAddress: 0.0.0.0\n"), env=env)
    assert discovery.wait_synced(10)
    # 0.0.0.0:8125 takes what is sent to any loopback address and to the pod's own one.
    assert backends(discovery) == ["192.0.2.11:8125"]
    # Port 7000 is none of ours: every address is fine there.
    assert backends(discovery, "elsewhere") == ["127.0.0.5:7000", "192.0.2.10:7000", "192.0.2.11:7000"]


def test_a_pod_of_another_node_in_the_local_list_is_skipped_with_a_log_line(
        kube_api: KubeApiServer, discover, caplog: pytest.LogCaptureFixture) -> None:
    kube_api.ignore_field_selector = True  # a server (or a proxy) that drops the field selector
    kube_api.add_pod("local", NS, AGENT, node="node-a", ip="127.0.0.2")
    kube_api.add_pod("remote", NS, AGENT, node="node-b", ip="127.0.0.3")
    discovery = discover(routes(DOGSTATSD))
    assert discovery.wait_synced(10)
    assert backends(discovery) == ["127.0.0.2:8125"]
    assert any(r.getMessage() == "route dogstatsd: pod remote is on node node-b, not node-a: skipped"
               for r in caplog.records)
    kube_api.delete_pod(NS, "local")
    wait_for(lambda: backends(discovery) == [], 5, what="no backend: the other node's pod is not local")


def test_one_rule_chooses_local_staying_then_local_terminating_then_other_nodes() -> None:
    """`choose`, the rule both `proxyctl run` and `proxyctl render` use, with the pod facts /routes shows."""
    route = routes(ANY_NODE).routes[0]

    def pod(name: str, node: str, ip: str, terminating: bool = False) -> discovery_module.Pod:
        return discovery_module.Pod(name, node, ip, ready=True, terminating=terminating)

    def chosen(local: list[discovery_module.Pod], everywhere: list[discovery_module.Pod] | None) -> list[tuple]:
        backends, _ = discovery_module.choose(route, "node-a", local, everywhere, [], frozenset())
        return [(str(b), b.pod, b.node, b.fallback, b.terminating) for b in backends]

    leaving, staying = pod("old", "node-a", "10.0.0.1", terminating=True), pod("new", "node-a", "10.0.0.2")
    far = pod("far", "node-b", "10.0.0.3")
    assert chosen([leaving, staying], [far]) == [("10.0.0.2:8125", "new", "node-a", False, False)]
    assert chosen([leaving], [far]) == [("10.0.0.1:8125", "old", "node-a", False, True)]
    assert chosen([], [far]) == [("10.0.0.3:8125", "far", "node-b", True, False)]
    assert chosen([], None) == []  # other nodes' pods not listed (yet): no choice among them
    assert chosen([far], None) == []  # another node's pod in the local list is no local pod
