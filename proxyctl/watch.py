"""Watching: list, then watch, one selection of pods, and keep what the API says of them.

One `Watch` per distinct (namespace, selector, node) lists the pods, then watches from
the list's resourceVersion. It resumes from the last resourceVersion when the server
ends a watch, relists only on 410 Gone, backs off with jitter on errors, and treats a
connection that delivers nothing for 1.5 × watchTimeout as dead (the client's read
timeout) — the way kopf handles resumption, and what a watch needs to never go silent.
What a pod means to the data plane is discovery's business: the watch is handed a
`parse` that turns the API's JSON into it.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Generic, Iterator, Mapping, TypeVar

import urllib3
from kubernetes.client.exceptions import ApiException

from proxyctl.config import Route
from proxyctl.kube import Api, Identity

log = logging.getLogger("proxyctl.discovery")

BACKOFF_FIRST, BACKOFF_MAX = 0.2, 10.0

T = TypeVar("T")
Parse = Callable[[Any], T]  # the API's JSON for one object → T; ValueError when malformed


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


def list_objects(core: Api, key: WatchKey, parse: Parse[T], read_timeout: float) -> tuple[dict[str, T], str]:
    """One list call: the pods of `key` by name (malformed ones skipped with a log line) and its resourceVersion."""
    body = core.get_json(key.path, _selectors(key), read_timeout)
    pods = {}
    for item in body.get("items") or []:
        pod = _parse(key, parse, item)
        if pod is not None:
            pods[item["metadata"]["name"]] = pod
    return pods, str(body["metadata"]["resourceVersion"])


def _selectors(key: WatchKey) -> dict[str, str]:
    params = {"labelSelector": key.selector}
    if key.node:
        params["fieldSelector"] = f"spec.nodeName={key.node}"
    return params


def _parse(key: WatchKey, parse: Parse[T], obj: Any) -> T | None:
    try:
        return parse(obj)
    except ValueError as exc:
        log.warning("%s: skipping a pod the API sent: %s", key, exc)
        return None


class Gone(Exception):
    """410: the resourceVersion we hold was compacted away; only a relist helps."""


class Watch(Generic[T]):
    """Lists, then watches, one `WatchKey`; calls `on_change` whenever its pods change."""

    def __init__(self, key: WatchKey, client: Callable[[bool], Api], timeout: float,
                 on_change: Callable[[], None], parse: Parse[T]) -> None:
        self.key = key
        self._parse = parse
        self.timeout = timeout
        self._client = client
        self._on_change = on_change
        self.pods: dict[str, T] = {}
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

    def snapshot(self) -> list[T]:
        with self._lock:
            return list(self.pods.values())

    def _list(self) -> str:
        pods, version = list_objects(self._client(False), self.key, self._parse, self.timeout)
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
        pod = None if kind == "DELETED" else _parse(self.key, self._parse, obj)
        with self._lock:
            before = self.pods.get(name) if isinstance(name, str) else None
            if pod is not None and isinstance(name, str):
                self.pods[name] = pod
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
