"""Discovery: keep, for every route, the backends that the cluster currently offers.

One `PodWatch` per distinct (namespace, selector, node) lists the pods, then watches from
the list's resourceVersion. It resumes from the last resourceVersion when the server
ends a watch, relists only on 410 Gone, backs off with jitter on errors, and treats a
connection that delivers nothing for 1.5 × watchTimeout as dead (the client's read
timeout) — the way kopf handles resumption, and what a watch needs to never go silent.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

import urllib3
from kubernetes.client.exceptions import ApiException

from proxyctl.backend import Backend, plain_ip
from proxyctl.config import Config, Route
from proxyctl.kube import Api, Identity, identity

log = logging.getLogger("proxyctl.discovery")

BACKOFF_FIRST, BACKOFF_MAX = 0.2, 10.0


# --- pods as the data plane needs them ---------------------------------------------------


@dataclass(frozen=True)
class Pod:
    """The few facts of a pod that decide whether, and where, it is a backend."""

    name: str
    node: str
    ip: str | None
    ready: bool
    terminating: bool
    ports: Mapping[str, int] = field(default_factory=dict)

    @property
    def serving(self) -> bool:
        return self.ip is not None and self.ready and not self.terminating

    def backend(self, route: Route) -> Backend | None:
        """This pod as a backend of `route`: named target ports resolve per pod."""
        target = route.target_port or route.port
        port = self.ports.get(target) if isinstance(target, str) else target
        if not self.serving or port is None:
            return None
        assert self.ip is not None
        return Backend(self.ip, port)


def parse_pod(obj: Any) -> Pod:
    """A pod from the API's JSON; ValueError, saying what is wrong, when it is not what a pod should be."""
    if not isinstance(obj, Mapping):
        raise ValueError("not an object")
    metadata = _part(obj, "metadata", Mapping, "pod")
    name = metadata.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError("no metadata.name")
    where = f"pod {name}"
    status = obj.get("status")
    if not isinstance(status, Mapping):
        raise ValueError(f"{where}: no status")
    spec = _part(obj, "spec", Mapping, where)
    ip = status.get("podIP")
    if ip is not None:
        try:
            ip = plain_ip(ip)
        except ValueError:
            raise ValueError(f"{where}: status.podIP {ip!r} is not an IP address") from None
    ready = any(isinstance(c, Mapping) and c.get("type") == "Ready" and c.get("status") == "True"
                for c in _part(status, "conditions", list, where))
    ports: dict[str, int] = {}
    for container in _part(spec, "containers", list, where):
        for port in _part(container, "ports", list, where) if isinstance(container, Mapping) else []:
            if not isinstance(port, Mapping) or not port.get("name"):
                continue  # only named ports are looked up
            number = port.get("containerPort")
            if not isinstance(number, int) or isinstance(number, bool) or not 1 <= number <= 65535:
                raise ValueError(f"{where}: port {port['name']!r} has containerPort {number!r}")
            ports[str(port["name"])] = number
    node = spec.get("nodeName")
    return Pod(name, node if isinstance(node, str) else "", ip, ready, bool(metadata.get("deletionTimestamp")), ports)


def _part(obj: Mapping[str, Any], key: str, kind: type, where: str) -> Any:
    """`obj[key]` when it is of the expected kind; absent or null gives an empty one."""
    value = obj.get(key)
    if value is None:
        return kind() if kind is list else {}
    if not isinstance(value, kind):
        raise ValueError(f"{where}: {key} is {type(value).__name__}, not {'a list' if kind is list else 'an object'}")
    return value


def backends_of(route: Route, pods: list[Pod]) -> list[Backend]:
    return sorted({b for pod in pods if (b := pod.backend(route)) is not None})


# --- one list + watch ------------------------------------------------------------------------


@dataclass(frozen=True)
class WatchKey:
    """What one watch covers; `node=None` is the cluster-wide fallback of `whenNoLocalPod: anyNode`."""

    namespace: str
    selector: str
    node: str | None

    @classmethod
    def of(cls, route: Route, me: Identity, everywhere: bool = False) -> WatchKey:
        """The watch serving `route` from this node, or from all nodes for its anyNode fallback."""
        return cls(route.namespace or me.namespace, str(route.selector), None if everywhere else me.node)

    @property
    def path(self) -> str:
        return f"/api/v1/namespaces/{self.namespace}/pods"

    def __str__(self) -> str:
        where = f"node {self.node}" if self.node else "all nodes"
        return f"pods {self.selector!r} in {self.namespace} on {where}"


def list_pods(core: Api, key: WatchKey, read_timeout: float) -> tuple[dict[str, Pod], str]:
    """One list call: the pods of `key` (malformed ones skipped with a log line) and its resourceVersion."""
    body = core.get_json(key.path, _selectors(key), read_timeout)
    pods = {}
    for item in body.get("items") or []:
        pod = _parse(key, item)
        if pod is not None:
            pods[pod.name] = pod
    return pods, str(body["metadata"]["resourceVersion"])


def _selectors(key: WatchKey) -> dict[str, str]:
    params = {"labelSelector": key.selector}
    if key.node:
        params["fieldSelector"] = f"spec.nodeName={key.node}"
    return params


def _parse(key: WatchKey, obj: Any) -> Pod | None:
    try:
        return parse_pod(obj)
    except ValueError as exc:
        log.warning("%s: skipping a pod the API sent: %s", key, exc)
        return None


class Gone(Exception):
    """410: the resourceVersion we hold was compacted away; only a relist helps."""


class PodWatch:
    """Lists, then watches, one `WatchKey`; calls `on_change` whenever its pods change."""

    def __init__(self, key: WatchKey, client: Callable[[bool], Api], timeout: float,
                 on_change: Callable[[], None]) -> None:
        self.key = key
        self.timeout = timeout
        self._client = client
        self._on_change = on_change
        self.pods: dict[str, Pod] = {}
        self._lock = threading.Lock()
        self.synced = threading.Event()
        self.restarts = 0
        self._failures = 0  # consecutive failed attempts; reset by the first answer that works
        self._last_error = ""  # said once per kind of failure, not once per retry
        self.last_activity = time.monotonic()
        self.connected = False
        self._stop = threading.Event()
        self._response: urllib3.BaseHTTPResponse | None = None
        self._thread = threading.Thread(target=self._run, name=f"watch {key}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        response = self._response
        if response is not None:
            response.shutdown()  # wakes the thread out of its read at once; close() would wait for it

    def stalled(self) -> bool:
        """Connected, yet silent well past the read timeout that should have replaced it."""
        return self.connected and time.monotonic() - self.last_activity > 2 * self.timeout

    def _run(self) -> None:
        version: str | None = None
        while not self._stop.is_set():
            try:
                if version is None:
                    version = self._list()
                    self._recovered()
                version = self._watch(version)
                self._recovered()
                continue
            except Gone:
                log.info("%s: resourceVersion %s expired (410 Gone); listing again", self.key, version)
                version = None
                self.restarts += 1
                continue
            except ApiException as exc:
                error = self._describe(exc)
                if exc.status == 401:
                    self._client(True)  # re-read credentials: service-account tokens rotate
            except urllib3.exceptions.ReadTimeoutError:
                error = f"watch stalled: nothing received for {1.5 * self.timeout:g}s; reconnecting"
            except (urllib3.exceptions.HTTPError, OSError, ValueError, KeyError) as exc:
                error = f"API unreachable or broken answer: {type(exc).__name__}: {exc}"
            except Exception as exc:  # the watch must outlive anything one answer can do to it
                if self._stop.is_set():
                    return  # stop() closed the stream under our feet
                log.exception("%s: unexpected error", self.key)
                error = f"unexpected {type(exc).__name__}"
            finally:
                self.connected = False
                self._response = None
            if self._stop.is_set():
                return
            self._failures += 1
            self.restarts += 1
            if error != self._last_error:  # once per kind of failure, not once per retry
                log.warning("%s: %s; retrying with backoff", self.key, error)
                self._last_error = error
            delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** min(self._failures - 1, 10))
            self._stop.wait(random.uniform(delay / 2, delay))

    def _recovered(self) -> None:
        """The API answers again: say so once, and start the next failure's backoff afresh."""
        if self._failures:
            log.info("%s: watching again after %d failed attempt(s)", self.key, self._failures)
        self._failures, self._last_error = 0, ""

    def _describe(self, exc: ApiException) -> str:
        if exc.status == 403:
            return (f"403 Forbidden: grant list and watch on pods in namespace {self.key.namespace} "
                    f"to this pod's service account (see examples/rbac.yaml); the API said: {_api_message(exc)}")
        if exc.status == 401:
            return "401 Unauthorized: re-reading credentials (rotated service-account token?)"
        return f"API answered {exc.status}: {_api_message(exc)}"

    def snapshot(self) -> list[Pod]:
        with self._lock:
            return list(self.pods.values())

    def _list(self) -> str:
        pods, version = list_pods(self._client(False), self.key, self.timeout)
        self.last_activity = time.monotonic()
        with self._lock:
            changed, self.pods = pods != self.pods, pods
        self.synced.set()
        if changed:
            self._on_change()
        return version

    def _watch(self, version: str) -> str:
        """One watch request; returns the last resourceVersion seen when the server ends it."""
        query = {**_selectors(self.key), "watch": "true", "allowWatchBookmarks": "true", "resourceVersion": version,
                 "timeoutSeconds": max(1, round(self.timeout))}
        response = self._client(False).get(self.key.path, query, 1.5 * self.timeout)
        self._response = response
        self.connected = True
        self.last_activity = time.monotonic()
        for line in _lines(response):
            self.last_activity = time.monotonic()
            self._recovered()
            event = json.loads(line)
            kind, obj = event.get("type"), event.get("object") or {}
            if kind == "ERROR":
                if obj.get("code") == 410:
                    raise Gone()
                raise ApiException(status=obj.get("code"), reason=obj.get("message"))
            version = str((obj.get("metadata") or {}).get("resourceVersion") or version)
            if kind in ("ADDED", "MODIFIED", "DELETED"):
                self._apply(kind, obj)
        return version

    def _apply(self, kind: str, obj: Mapping[str, Any]) -> None:
        name = (obj.get("metadata") or {}).get("name")
        pod = None if kind == "DELETED" else _parse(self.key, obj)
        with self._lock:
            before = self.pods.get(name) if isinstance(name, str) else None
            if pod is not None:
                self.pods[pod.name] = pod
            elif isinstance(name, str):
                self.pods.pop(name, None)
        if before != pod:
            self._on_change()


def _lines(response: urllib3.BaseHTTPResponse) -> Iterator[bytes]:
    """Split a watch stream into its JSON lines as the chunks arrive."""
    pending = b""
    for chunk in response.stream(65536, decode_content=False):
        pending += chunk
        *complete, pending = pending.split(b"\n")
        yield from (line for line in complete if line.strip())
    if pending.strip():
        yield pending


def _api_message(exc: ApiException) -> str:
    try:
        return str(json.loads(exc.body)["message"])
    except (TypeError, ValueError, KeyError):
        return str(exc.reason)


# --- all routes ----------------------------------------------------------------------------------


class Discovery:
    """The watches that the routes need, and the route → backends table built from them."""

    def __init__(self, env: Mapping[str, str], me: Identity, watch_timeout: float,
                 on_change: Callable[[], None]) -> None:
        self.me = me
        self.watch_timeout = watch_timeout
        self._env = env
        self._on_change = on_change
        self._lock = threading.RLock()
        self._core = Api(env)
        self._routes: list[Route] = []
        self.watches: dict[WatchKey, PodWatch] = {}

    def client(self, reload: bool = False) -> Api:
        """The shared API client; `reload=True` builds it anew from fresh credentials."""
        with self._lock:
            if reload:
                self._core = Api(self._env)
            return self._core

    def set_routes(self, routes: list[Route], watch_timeout: float) -> None:
        """Open the watches new routes need and close those no route needs any more."""
        with self._lock:
            self._routes = list(routes)
            if watch_timeout != self.watch_timeout:
                self.watch_timeout = watch_timeout
                self._close(set(self.watches))
            self._reconcile()

    def _reconcile(self) -> None:
        """Local watches for every route; a cluster-wide one only while an anyNode route has no local pod."""
        wanted = {WatchKey.of(r, self.me) for r in self._routes}
        for route in self._routes:
            local = self.watches.get(WatchKey.of(route, self.me))
            if route.when_no_local_pod == "anyNode" and local is not None and local.synced.is_set() \
                    and not backends_of(route, local.snapshot()):
                wanted.add(WatchKey.of(route, self.me, everywhere=True))
        self._close(set(self.watches) - wanted)
        for key in wanted - set(self.watches):
            log.info("watching %s", key)
            watch = PodWatch(key, self.client, self.watch_timeout, self._changed)
            self.watches[key] = watch
            watch.start()

    def _close(self, keys: set[WatchKey]) -> None:
        for key in keys:
            log.info("no longer watching %s", key)
            self.watches.pop(key).stop()

    def _changed(self) -> None:
        with self._lock:
            self._reconcile()
        self._on_change()

    def wait_synced(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._lock:
            watches = list(self.watches.values())
        return all(w.synced.wait(max(0.0, deadline - time.monotonic())) for w in watches)

    def endpoints(self) -> dict[str, list[Backend]]:
        """route name → backends, local pods first; other nodes' only for anyNode routes without one."""
        with self._lock:
            table = {}
            for route in self._routes:
                local = self.watches.get(WatchKey.of(route, self.me))
                backends = backends_of(route, local.snapshot()) if local else []
                fallback = self.watches.get(WatchKey.of(route, self.me, everywhere=True))
                if not backends and fallback is not None and route.when_no_local_pod == "anyNode":
                    backends = backends_of(route, fallback.snapshot())
                table[route.key] = backends
            return table

    @property
    def restarts(self) -> int:
        with self._lock:
            return sum(w.restarts for w in self.watches.values())

    def stalled(self) -> list[str]:
        with self._lock:
            return [str(w.key) for w in self.watches.values() if w.stalled()]

    def stop(self) -> None:
        with self._lock:
            self._close(set(self.watches))


def list_endpoints(config: Config, env: Mapping[str, str]) -> dict[str, list[Backend]]:
    """One list per route, no watch: what `proxyctl render` shows without `--endpoints`."""
    core = Api(env)
    me = identity(env, core)
    table = {}
    for route in config.routes:
        local, _ = list_pods(core, WatchKey.of(route, me), 30)
        backends = backends_of(route, list(local.values()))
        if not backends and route.when_no_local_pod == "anyNode":
            everywhere, _ = list_pods(core, WatchKey.of(route, me, everywhere=True), 30)
            backends = backends_of(route, list(everywhere.values()))
        table[route.key] = backends
    return table
