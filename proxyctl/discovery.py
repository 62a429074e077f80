"""Discovery: keep, for every route, the backends that the cluster currently offers.

One `PodWatch` per distinct (namespace, selector, node) follows the pods (proxyctl.watch
lists, watches and recovers); this module says what a pod means to the data plane.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

from proxyctl.backend import Backend, Listener, own_addresses, plain_ip, unusable
from proxyctl.config import Config, Route
from proxyctl.kube import Api, Identity, identity
from proxyctl.render import has_ipv6_loopback, listen_addresses
from proxyctl.watch import Requests, Watch, WatchKey, list_objects

log = logging.getLogger("proxyctl.discovery")

# How long an anyNode route keeps the backends it serves while other nodes' pods are still
# being listed: an API answering late must not turn into "no backend" for that long.
FALLBACK_HOLD = 5.0

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
        """Ready with an address: it takes traffic, even while terminating (an EndpointSlice's `serving`)."""
        return self.ip is not None and self.ready

    def backend(self, route: Route, here: str) -> Backend | None:
        """This serving pod as a backend of `route` for a sidecar on node `here`: named target
        ports resolve per pod."""
        target = route.target_port or route.port
        port = self.ports.get(target) if isinstance(target, str) else target
        if not self.serving or port is None:
            return None
        assert self.ip is not None
        return Backend(self.ip, port, self.name, self.node, self.terminating, fallback=self.node != here)


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


def backends_of(route: Route, pods: Iterable[Pod], here: str) -> list[Backend]:
    """The ready pods that are not terminating; when there are none, those terminating but
    still Ready, which still serve (kube-proxy falls back the same way, KEP-1669)."""
    staying: set[Backend] = set()
    leaving: set[Backend] = set()
    for pod in pods:
        if (backend := pod.backend(route, here)) is not None:
            (leaving if pod.terminating else staying).add(backend)
    return sorted(staying or leaving)


def local_pods(pods: Iterable[Pod], node: str) -> tuple[list[Pod], list[str]]:
    """The pods on `node`, and a note for each other one: the field selector alone is not trusted."""
    here, notes = [], []
    for pod in pods:
        if pod.node == node:
            here.append(pod)
        else:
            notes.append(f"pod {pod.name} is on node {pod.node or '(none)'}, not {node}: skipped")
    return here, notes


def usable(route: Route, backends: Iterable[Backend], listeners: Iterable[Listener],
           own: frozenset[str]) -> tuple[list[Backend], list[str]]:
    """`backends` that may get the route's traffic, and a note for each one that may not."""
    kept, notes = [], []
    for backend in backends:
        reason = unusable(backend, route.protocol, listeners, own)
        if reason is None:
            kept.append(backend)
        else:
            notes.append(f"backend {backend} skipped: {reason}")
    return kept, notes


def choose(route: Route, here: str, local: Iterable[Pod], everywhere: Iterable[Pod] | None,
           listeners: Iterable[Listener], own: frozenset[str]) -> tuple[list[Backend], list[str]]:
    """The backends `route` forwards to from node `here`, and a note for each pod or backend
    passed over: local pods that stay, else local pods terminating but still Ready, else (an
    anyNode route, once `everywhere` is listed) other nodes' pods; never a self-loop."""
    listeners = list(listeners)
    pods, notes = local_pods(local, here)
    backends, skipped = usable(route, backends_of(route, pods, here), listeners, own)
    notes += skipped
    if backends or route.when_no_local_pod != "anyNode" or everywhere is None:
        return backends, notes
    backends, skipped = usable(route, backends_of(route, everywhere, here), listeners, own)
    return backends, notes + skipped


def listeners_of(config: Config) -> list[Listener]:
    """Every socket nginx listens on for `config`."""
    addresses = listen_addresses(config, has_ipv6_loopback())
    return [Listener(route.protocol, address, route.port) for route in config.routes for address in addresses]


def list_pods(core: Api, key: WatchKey, read_timeout: float) -> tuple[dict[str, Pod], str]:
    """One list call: the pods of `key` (malformed ones skipped with a log line) and its resourceVersion."""
    return list_objects(core, key, parse_pod, read_timeout)


class PodWatch(Watch[Pod]):
    """Lists, then watches, one `WatchKey`'s pods; calls `on_change` whenever they change."""

    def __init__(self, key: WatchKey, client: Callable[[bool], Api], timeout: float,
                 on_change: Callable[[], None], requests: Requests) -> None:
        super().__init__(key, client, timeout, on_change, parse_pod, requests)


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
        self._own = own_addresses(env)
        self._routes: list[Route] = []
        self._listeners: list[Listener] = []
        self.watches: dict[WatchKey, PodWatch] = {}
        self._closed_restarts = 0  # restarts of watches closed since: the counter never goes down
        self.requests = Requests()  # of every watch, closed ones included: /metrics
        self._served: dict[str, list[Backend]] = {}  # what endpoints() last gave, per route
        self._held_since: dict[str, float] = {}  # anyNode routes keeping their backends, since when
        self._notes: dict[str, list[str]] = {}  # skipped pods and backends, per route, as last logged
        self._on_fallback: set[str] = set()  # anyNode routes that endpoints() gave other nodes' pods
        self._stopped = False
        self._stopping = threading.Event()  # ends the thread that watches the watches' silence
        self._silent: dict[WatchKey, float] = {}  # watch → when it last heard, while silent too long
        threading.Thread(target=self._follow_silence, name="watch silence", daemon=True).start()

    def client(self, reload: bool = False) -> Api:
        """The shared API client; `reload=True` builds it anew from fresh credentials."""
        with self._lock:
            if reload:
                self._core = Api(self._env)
            return self._core

    def set_config(self, config: Config) -> None:
        """Open the watches new routes need and close those no route needs any more."""
        with self._lock:
            self._routes = list(config.routes)
            self._listeners = listeners_of(config)
            if config.watch_timeout != self.watch_timeout:
                self.watch_timeout = config.watch_timeout
                for watch in self.watches.values():
                    watch.timeout = config.watch_timeout  # from its next request on: nothing relists, no route empties
            self._reconcile()

    def _reconcile(self) -> None:
        """Local watches for every route; a cluster-wide one while an anyNode route has no local
        pod that stays: opened as soon as the last one starts terminating, to be listed in time."""
        wanted = {WatchKey.of(r, self.me) for r in self._routes}
        wanted |= {WatchKey.of(r, self.me, everywhere=True) for r in self._routes if self._needs_fallback(r)}
        self._close(set(self.watches) - wanted)
        for key in wanted - set(self.watches):
            log.info("watching %s", key)
            watch = PodWatch(key, self.client, self.watch_timeout, self._changed, self.requests)
            self.watches[key] = watch
            watch.start()
            threading.Thread(target=self._await_list, args=(watch,), name=f"listed? {key}", daemon=True).start()

    def _needs_fallback(self, route: Route) -> bool:
        local = self.watches.get(WatchKey.of(route, self.me))
        if route.when_no_local_pod != "anyNode" or local is None or not local.synced.is_set():
            return False
        staying = [pod for pod in local_pods(local.snapshot(), self.me.node)[0] if not pod.terminating]
        return not usable(route, backends_of(route, staying, self.me.node), self._listeners, self._own)[0]

    def _await_list(self, watch: PodWatch) -> None:
        """A first list that finds nothing changes nothing, so the watch does not report it; yet
        an anyNode route must then open its fallback, and a held route learn it is listed."""
        while not watch.synced.wait(1.0):
            with self._lock:
                if self._stopped or self.watches.get(watch.key) is not watch:
                    return
        self._changed()

    def _close(self, keys: set[WatchKey]) -> None:
        for key in keys:
            log.info("no longer watching %s", key)
            watch = self.watches.pop(key)
            watch.stop()
            self._closed_restarts += watch.restarts

    def _changed(self) -> None:
        with self._lock:
            if self._stopped:
                return
            self._reconcile()
        self._on_change()

    def wait_synced(self, timeout: float) -> bool:
        """Wait until every watch has listed, including fallbacks that the first lists call for."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                self._reconcile()
                pending = [w for w in self.watches.values() if not w.synced.is_set()]
            if not pending:
                return True
            if not pending[0].synced.wait(max(0.0, deadline - time.monotonic())):
                return False

    def endpoints(self) -> dict[str, list[Backend]]:
        """route name → backends: local pods that stay, else local pods terminating but still
        Ready, else (anyNode) other nodes' pods; never a self-loop."""
        with self._lock:
            table = {}
            for route in self._routes:
                table[route.key], notes = self._choose(route)
                if notes != self._notes.get(route.key, []):
                    for note in sorted(set(notes) - set(self._notes.get(route.key, []))):
                        log.warning("route %s: %s", route.key, note)
                    self._notes[route.key] = notes
            self._served = table
            return table

    def _choose(self, route: Route) -> tuple[list[Backend], list[str]]:
        local = self.watches.get(WatchKey.of(route, self.me))
        fallback = self.watches.get(WatchKey.of(route, self.me, everywhere=True))
        listed = fallback is not None and fallback.synced.is_set()
        backends, notes = choose(route, self.me.node, local.snapshot() if local else [],
                                 fallback.snapshot() if fallback is not None and listed else None,
                                 self._listeners, self._own)
        self._on_fallback.discard(route.key)
        if any(b.fallback for b in backends):
            self._on_fallback.add(route.key)
        if backends or route.when_no_local_pod != "anyNode" or listed:
            self._held_since.pop(route.key, None)
            return backends, notes
        return self._hold(route), notes

    def _hold(self, route: Route) -> list[Backend]:
        """Keep what `route` serves while other nodes' pods are listed, for at most FALLBACK_HOLD."""
        served = self._served.get(route.key, [])
        if not served:
            return []
        now = time.monotonic()
        if route.key not in self._held_since:
            self._held_since[route.key] = now
            log.info("route %s: no local pod; keeping %s while other nodes' pods are listed (at most %gs)",
                     route.key, ", ".join(map(str, served)), FALLBACK_HOLD)
            timer = threading.Timer(FALLBACK_HOLD, self._changed)
            timer.daemon = True
            timer.start()
        if now - self._held_since[route.key] < FALLBACK_HOLD:
            return served
        log.warning("route %s: other nodes' pods still not listed after %gs; no backend until they are",
                    route.key, FALLBACK_HOLD)
        return []

    @property
    def restarts(self) -> int:
        with self._lock:
            return self._closed_restarts + sum(w.restarts for w in self.watches.values())

    def on_fallback(self) -> frozenset[str]:
        """Routes forwarding to other nodes' pods, as endpoints() last chose."""
        with self._lock:
            return frozenset(self._on_fallback)

    def watch_ages(self) -> dict[str, float]:
        """route → seconds since its watch of this node's pods last heard from the API: a list,
        an event, a bookmark, or a watch that ended when asked; a connection that only stays
        open does not count, so a stalled API shows."""
        now = time.monotonic()
        with self._lock:
            watches = {r.key: self.watches.get(WatchKey.of(r, self.me)) for r in self._routes}
            return {route: now - watch.last_heard for route, watch in watches.items() if watch is not None}

    def _follow_silence(self) -> None:
        while not self._stopping.wait(min(1.0, self.watch_timeout / 4)):
            self._say_silence(time.monotonic())

    def _say_silence(self, now: float) -> None:
        """Say once when a watch of this node's pods has not heard from the API for longer than
        watchTimeout (as proxyctl_watch_last_event_age_seconds shows for its routes), naming
        them, and once when it hears again."""
        with self._lock:
            routes: dict[WatchKey, list[str]] = {}
            for route in self._routes:
                routes.setdefault(WatchKey.of(route, self.me), []).append(route.key)
            heard = {key: (watch.last_heard, names) for key, names in routes.items()
                     if (watch := self.watches.get(key)) is not None}
            timeout = self.watch_timeout
        for key in set(self._silent) - set(heard):
            del self._silent[key]
        for key, (last, names) in heard.items():
            since = self._silent.get(key)
            which = f"route{'s' if len(names) > 1 else ''} {', '.join(names)}"
            if since is None and now - last > timeout:
                self._silent[key] = last
                log.warning("%s: no word from the API for %.1fs, more than watchTimeout (%gs), on %s; backends "
                            "stay as last heard", which, now - last, timeout, key)
            elif since is not None and last != since:
                del self._silent[key]
                log.info("%s: the API is heard from again, after %.1fs of silence", which, last - since)

    def stalled(self) -> list[str]:
        with self._lock:
            return [str(w.key) for w in self.watches.values() if w.stalled()]

    def stop(self) -> None:
        self._stopping.set()
        with self._lock:
            self._stopped = True
            self._close(set(self.watches))


def list_endpoints(config: Config, env: Mapping[str, str]) -> dict[str, list[Backend]]:
    """One list per route, no watch: what `proxyctl render` shows without `--endpoints`."""
    core = Api(env)
    me = identity(env, core)
    listeners, own = listeners_of(config), own_addresses(env)
    table = {}
    for route in config.routes:
        local = list_pods(core, WatchKey.of(route, me), 30)[0].values()
        everywhere = None
        if route.when_no_local_pod == "anyNode" and not choose(route, me.node, local, None, listeners, own)[0]:
            everywhere = list_pods(core, WatchKey.of(route, me, everywhere=True), 30)[0].values()
        table[route.key], notes = choose(route, me.node, local, everywhere, listeners, own)
        for note in notes:
            log.warning("route %s: %s", route.key, note)
    return table
