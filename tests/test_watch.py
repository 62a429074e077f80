"""The list/watch machinery against the test API server (the real kubernetes client over real
HTTP), and its pure layers (events, backoff) on their own."""

from __future__ import annotations

import io
import logging
import time
from pathlib import Path

import pytest
import urllib3

from proxyctl.config import Config, load_config
from proxyctl.kube import Gone, ReadTimeout, StatusError, TransportError, status_error
from proxyctl.watch import OUTCOMES, Backoff, MalformedEvent, WatchKey, _lines, event, outcome
from tests.conftest import MakeDiscovery, backends
from tests.kubeapi import KubeApiServer
from tests.support import wait_for

NS = "kube-system"
AGENT = {"app": "dd-agent"}
DOGSTATSD = "{name: dogstatsd, port: 8125, protocol: udp, selector: app=dd-agent, namespace: kube-system}"
KEY = WatchKey(NS, "app=dd-agent", "node-a")


def routes(*lines: str, watch_timeout: float = 60.0) -> Config:
    """A config of these routes, with `watchTimeout` in seconds."""
    return load_config(f"watchTimeout: {watch_timeout}\nroutes:\n" + "".join(f"  - {line}\n" for line in lines))


def watch_versions(kube_api: KubeApiServer) -> list[str]:
    return [r.query.get("resourceVersion", "") for r in kube_api.requests if r.is_watch]


# --- resumption ----------------------------------------------------------------------------------------


def test_a_cut_watch_resumes_from_the_newest_version_its_events_and_bookmarks_brought(
        kube_api: KubeApiServer, discover: MakeDiscovery) -> None:
    kube_api.bookmark_interval = 0.2
    discovery = discover(routes(DOGSTATSD))
    assert discovery.wait_synced(10)
    wait_for(lambda: kube_api.open_watches == 1, 10, what="an open watch")
    listed = watch_versions(kube_api)[-1]
    watch = discovery.watches[KEY]

    kube_api.add_pod("agent", NS, AGENT, node="node-a", ip="127.0.0.2")
    wait_for(lambda: backends(discovery) == ["127.0.0.2:8125"], 10, what="the event")
    after_event = str(kube_api.resource_version)
    kube_api.reset_watches()
    wait_for(lambda: len(watch_versions(kube_api)) == 2, 10, what="the resumed watch")
    assert watch_versions(kube_api)[-1] == after_event != listed

    # A change this watch does not see moves the resourceVersion on; only a bookmark tells of it.
    kube_api.add_pod("web", "default", {"app": "web"})
    wait_for(lambda: watch.version == str(kube_api.resource_version), 10, what="a bookmark")
    kube_api.reset_watches()
    wait_for(lambda: len(watch_versions(kube_api)) == 3, 10, what="the watch resumed after the bookmark")
    assert watch_versions(kube_api)[-1] == str(kube_api.resource_version)
    assert kube_api.count(watch=False) == 1  # resumed, never relisted


def test_lists_are_served_from_the_watch_cache_and_a_relist_is_not_older_than_what_was_seen(
        kube_api: KubeApiServer, discover: MakeDiscovery) -> None:
    kube_api.add_pod("agent", NS, AGENT, node="node-a", ip="127.0.0.2")
    discovery = discover(routes(DOGSTATSD))
    assert discovery.wait_synced(10)
    wait_for(lambda: kube_api.open_watches == 1, 10, what="an open watch")
    kube_api.update_pod(NS, "agent", ip="127.0.0.3")
    wait_for(lambda: backends(discovery) == ["127.0.0.3:8125"], 10, what="the change")
    seen = str(kube_api.resource_version)

    kube_api.fail_next(1, 410)  # an HTTP 410, not an ERROR event: the resumed watch is told its version is gone
    kube_api.reset_watches()
    wait_for(lambda: kube_api.count(watch=False) == 2, 10, what="a relist after the HTTP 410")
    lists = [r.query.get("resourceVersion") for r in kube_api.requests if not r.is_watch]
    assert lists == ["0", seen]  # never "" (a quorum read from etcd)
    wait_for(lambda: kube_api.open_watches == 1, 10, what="watching again")
    assert backends(discovery) == ["127.0.0.3:8125"]


# --- not spinning, backing off, waiting as told ------------------------------------------------------------------------


def test_a_server_that_ends_every_watch_at_once_is_not_hammered(kube_api: KubeApiServer,
                                                                discover: MakeDiscovery) -> None:
    discovery = discover(routes(DOGSTATSD))
    assert discovery.wait_synced(10)
    wait_for(lambda: kube_api.open_watches == 1, 10, what="an open watch")
    kube_api.end_watches_at_once = True
    kube_api.reset_watches()
    before = kube_api.count(watch=True)
    time.sleep(3.0)  # the span the request rate is measured over, not a wait for state
    made = kube_api.count(watch=True) - before
    print(f"{made} watch requests in 3 s against a server that ends every watch at once")
    assert made <= 15, f"{made} watch requests in 3 s"  # backoff doubles from 0.2 s: about 5
    kube_api.end_watches_at_once = False
    kube_api.add_pod("agent", NS, AGENT, node="node-a", ip="127.0.0.2")
    wait_for(lambda: backends(discovery) == ["127.0.0.2:8125"], 15, what="watching again")


@pytest.mark.parametrize("status", [429, 503])
def test_retry_after_is_honoured(kube_api: KubeApiServer, discover: MakeDiscovery, status: int) -> None:
    discovery = discover(routes(DOGSTATSD))
    assert discovery.wait_synced(10)
    wait_for(lambda: kube_api.open_watches == 1, 10, what="an open watch")
    kube_api.fail_next(1, status, retry_after="2")
    kube_api.reset_watches()
    wait_for(lambda: kube_api.count(status=status) == 1, 10, what=f"the {status}")
    told = next(r.time for r in kube_api.requests if r.status == status)
    # Wait for the request itself: a watch is recorded once its headers are sent, a moment after it counts as open.
    retried = wait_for(lambda: min((r.time for r in kube_api.requests if r.time > told), default=None), 10,
                       what="the request after the wait")
    print(f"Retry-After: 2 with {status}: retried {retried - told:.2f} s later")
    assert 2.0 <= retried - told < 3.5  # 2 s and a jitter of up to 0.2 s, on a busy machine


def test_backoff_retries_fast_first_then_spreads_up_to_its_cap() -> None:
    backoff = Backoff(first=0.2, cap=30.0)
    firsts = [Backoff(first=0.2, cap=30.0).next() for _ in range(1000)]
    assert max(firsts) <= 0.2 and sum(firsts) / len(firsts) == pytest.approx(0.1, abs=0.02)
    later = [backoff.next() for _ in range(30)][10:]  # 0.2 × 2⁹ is past the cap
    assert max(later) <= 30.0 and sum(later) / len(later) > 8  # uniform over [0, 30]
    assert all(Backoff().next(retry_after=5) >= 5 for _ in range(100))
    assert all(Backoff(cap=30.0).next(retry_after=3600) <= 30.0 + 0.2 for _ in range(100))


def test_a_failure_to_rebuild_the_client_after_a_401_is_retried(
        kube_api: KubeApiServer, discover: MakeDiscovery, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    token = Path(kube_api.write_token_file(tmp_path / "token"))
    kubeconfig = kube_api.write_kubeconfig(tmp_path / "kubeconfig-token-file", token_file=token)
    kube_api.add_pod("agent", NS, AGENT, node="node-a", ip="127.0.0.2")
    discovery = discover(routes(DOGSTATSD), env={"KUBECONFIG": kubeconfig})
    assert discovery.wait_synced(10)

    token.unlink()  # mid-rotation: the token file is not there when the client is rebuilt
    kube_api.rotate_token("rotated")
    kube_api.reset_watches()
    wait_for(lambda: any(str(token) in r.getMessage() for r in caplog.records), 10,
             what="the failed rebuild said, naming the missing file")
    kube_api.update_pod(NS, "agent", ip="127.0.0.3")
    token.write_text("rotated")
    wait_for(lambda: backends(discovery) == ["127.0.0.3:8125"], 20, what="recovery once the token is back")
    assert not any(r.exc_info for r in caplog.records)


# --- malformed events ----------------------------------------------------------------------------------------------


MALFORMED = [
    b"this is not JSON",
    b"[1, 2]",
    b'{"type": "ADDED", "object": [1]}',
    b'{"type": "MODIFIED", "object": "pod"}',
    b'{"type": "ERROR", "object": 5}',
    b'{"type": "SURPRISE", "object": {"metadata": {"resourceVersion": "7"}}}',
    b'{"type": "MODIFIED", "object": {"metadata": {"name": "agent", "resourceVersion": [1]}}}',
    b'{"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": {"a": 1}}}}',
    b'{"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": true}}}',
    b'{"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "12; drop"}}}',
]


@pytest.mark.parametrize("line", MALFORMED)
def test_a_malformed_watch_line_is_a_malformed_event(line: bytes) -> None:
    with pytest.raises(MalformedEvent):
        event(line)


def test_events_keep_a_numeric_version_and_error_events_raise_their_status() -> None:
    assert event(b'{"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": 42}}}').version == "42"
    with pytest.raises(Gone):
        event(b'{"type": "ERROR", "object": {"kind": "Status", "code": 410, "message": "too old"}}')
    with pytest.raises(StatusError) as raised:
        event(b'{"type": "ERROR", "object": {"code": "x", "message": "odd"}}')
    assert raised.value.status == 500


def test_lines_are_split_across_chunks_and_the_last_needs_no_newline() -> None:
    body = b'{"a": 1}\n\n{"b"' + b': 2}\n  \n{"c": 3}'
    response = urllib3.HTTPResponse(body=io.BytesIO(body), preload_content=False)
    assert list(_lines(response)) == [b'{"a": 1}', b'{"b": 2}', b'{"c": 3}']


def test_malformed_watch_events_are_skipped_and_the_watch_lives_on(
        kube_api: KubeApiServer, discover: MakeDiscovery, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    kube_api.add_pod("agent", NS, AGENT, node="node-a", ip="127.0.0.2")
    discovery = discover(routes(DOGSTATSD))
    assert discovery.wait_synced(10)
    wait_for(lambda: kube_api.open_watches == 1, 10, what="an open watch")
    for line in MALFORMED:
        kube_api.send_raw(line)
    kube_api.update_pod(NS, "agent", ip="127.0.0.3")
    wait_for(lambda: backends(discovery) == ["127.0.0.3:8125"], 10, what="the change after the malformed lines")
    kube_api.reset_watches()  # and the version it resumes from is a real one
    kube_api.update_pod(NS, "agent", ip="127.0.0.4")
    wait_for(lambda: backends(discovery) == ["127.0.0.4:8125"], 10, what="the change after the resumption")
    skipped = [r.getMessage() for r in caplog.records if "skipping a watch event" in r.getMessage()]
    assert len(skipped) == len(MALFORMED)
    assert kube_api.count(watch=False) == 1 and kube_api.count(status=400) == 0
    assert not any(r.exc_info for r in caplog.records)


# --- what Discovery keeps across changes of the config --------------------------------------------------------------


def test_watch_restarts_never_go_down_when_a_watch_is_closed(kube_api: KubeApiServer,
                                                             discover: MakeDiscovery) -> None:
    discovery = discover(routes(DOGSTATSD))
    assert discovery.wait_synced(10)
    wait_for(lambda: kube_api.open_watches == 1, 10, what="an open watch")
    kube_api.reset_watches()
    wait_for(lambda: discovery.restarts == 1, 10, what="a restart counted")
    discovery.set_config(routes(DOGSTATSD.replace("dd-agent", "other-agent")))
    assert discovery.restarts == 1


def test_changing_only_watch_timeout_keeps_serving_and_applies_from_the_next_request(
        kube_api: KubeApiServer, discover: MakeDiscovery) -> None:
    kube_api.add_pod("agent", NS, AGENT, node="node-a", ip="127.0.0.2")
    discovery = discover(routes(DOGSTATSD, watch_timeout=60.0))
    assert discovery.wait_synced(10)
    wait_for(lambda: kube_api.open_watches == 1, 10, what="an open watch")

    discovery.set_config(routes(DOGSTATSD, watch_timeout=30.0))
    assert backends(discovery) == ["127.0.0.2:8125"]  # at once: no route is emptied meanwhile
    kube_api.reset_watches()
    wait_for(lambda: kube_api.count(watch=True) == 2, 10, what="the next watch request")
    assert [r.query.get("timeoutSeconds") for r in kube_api.requests if r.is_watch] == ["60", "30"]
    assert kube_api.count(watch=False) == 1 and backends(discovery) == ["127.0.0.2:8125"]


def test_each_kind_of_failure_is_one_request_outcome() -> None:
    assert outcome(None) == "ok"
    assert [outcome(status_error(code, "")) for code in (401, 403, 404, 410, 429, 500, 503)] == [
        "unauthorized", "forbidden", "client_error", "gone", "throttled", "server_error", "server_error"]
    assert outcome(ReadTimeout("")) == "timeout"
    assert outcome(TransportError("")) == "transport_error"
    assert outcome(MalformedEvent("")) == "malformed"
    assert outcome(KeyError("a bug")) == "unexpected"
    assert set(OUTCOMES) == {"ok", "unauthorized", "forbidden", "client_error", "gone", "throttled", "server_error",
                             "timeout", "transport_error", "malformed", "unexpected"}
