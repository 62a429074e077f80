"""Discovery: keep, for every route, the backends that the cluster currently offers.

One `PodWatch` per distinct (namespace, selector, node) follows the pods (proxyctl.watch
lists, watches and recovers); this module says what a pod means to the data plane.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from proxyctl.backend import Backend, plain_ip
from proxyctl.config import Config, Route
from proxyctl.kube import Api, Identity, identity
from proxyctl.watch import Watch, WatchKey, list_objects

log = logging.getLogger("proxyctl.discovery")


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


def list_pods(core: Api, key: WatchKey, read_timeout: float) -> tuple[dict[str, Pod], str]:
    """One list call: the pods of `key` (malformed ones skipped with a log line) and its resourceVersion."""
    return list_objects(core, key, parse_pod, read_timeout)


class PodWatch(Watch[Pod]):
    """Lists, then watches, one `WatchKey`'s pods; calls `on_change` whenever they change."""

    def __init__(self, key: WatchKey, client: Callable[[bool], Api], timeout: float,
                 on_change: Callable[[], None]) -> None:
        super().__init__(key, client, timeout, on_change, parse_pod)


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
        self._closed_restarts = 0  # restarts of watches closed since: the counter never goes down

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
                for watch in self.watches.values():
                    watch.timeout = watch_timeout  # from its next request on: nothing relists, no route empties
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
            watch = self.watches.pop(key)
            watch.stop()
            self._closed_restarts += watch.restarts

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
            return self._closed_restarts + sum(w.restarts for w in self.watches.values())

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
