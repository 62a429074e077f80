"""Watching: list, then watch, one selection of pods, and keep what the API says of them.

Layered as kopf's watching is, each layer testable on its own:

- `Watch._run`: the endless loop. It never ends but by `stop()`; every failure is said
  once per kind and retried after a `Backoff`, honouring the server's Retry-After.
- `Watch._follow`: list (only when no resourceVersion is held), then one watch request.
  The newest resourceVersion of every event and BOOKMARK is kept as it is read, so a
  watch cut mid-stream resumes where it was, not where it began. 410 Gone, as an ERROR
  event or an HTTP status, relists.
- `watch_request`: the one request; `_lines` and `event`: its JSON lines, read as events.

Every list and watch request is counted once, when it ends, by how it ended (`Requests`).

Lists are served from the API server's watch cache (`resourceVersion=0` at first, then
"not older than" the version held), as client-go's reflectors ask, never as quorum reads
from etcd. What a pod means to the data plane is discovery's business: a watch is handed
a `parse` that turns the API's JSON into it.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Generic, Iterator, Mapping, TypeVar

import urllib3

from proxyctl.config import Route
from proxyctl.kube import (Api, ApiError, CredentialsError, Forbidden, Gone, Identity, MalformedAnswer, ReadTimeout,
                           StatusError, TransportError, Unauthorized, status_error, translated)

log = logging.getLogger("proxyctl.discovery")

BACKOFF_FIRST, BACKOFF_MAX = 0.2, 30.0
QUICK_END = 1.0  # seconds: a watch the server ends sooner than this, having brought nothing new, counts as failed

T = TypeVar("T")
Parse = Callable[[Any], T]  # the API's JSON for one object → T; ValueError when malformed


# --- what a watch covers ----------------------------------------------------------------------


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


def _selectors(key: WatchKey) -> dict[str, str]:
    params = {"labelSelector": key.selector}
    if key.node:
        params["fieldSelector"] = f"spec.nodeName={key.node}"
    return params


# --- one list, one watch request, its events -------------------------------------------------------------


def list_objects(core: Api, key: WatchKey, parse: Parse[T], read_timeout: float,
                 version: str = "0") -> tuple[dict[str, T], str]:
    """One list call: the pods of `key` by name (malformed ones skipped with a log line) and its resourceVersion.

    `version` "0" takes whatever the API server's watch cache holds; a version held
    before takes a state not older than it, from the cache too (no quorum read).
    """
    body = core.get_json(key.path, {**_selectors(key), "resourceVersion": version}, read_timeout)
    if not isinstance(body, Mapping):
        raise MalformedAnswer("the list is not an object")
    listed = _version(body.get("metadata"))
    if listed is None:
        raise MalformedAnswer("the list has no usable metadata.resourceVersion")
    items = body.get("items") or []
    pods = {}
    for item in items if isinstance(items, list) else []:
        pod = _parse(key, parse, item)
        if pod is not None:
            pods[item["metadata"]["name"]] = pod
    return pods, listed


def watch_request(core: Api, key: WatchKey, version: str, timeout: float) -> urllib3.BaseHTTPResponse:
    """Open one watch from `version`; the server is asked to end it within `timeout`, and the read gives up at 1.5 ×."""
    query = {**_selectors(key), "watch": "true", "allowWatchBookmarks": "true", "resourceVersion": version,
             "timeoutSeconds": max(1, round(timeout))}
    return core.get(key.path, query, 1.5 * timeout)


class MalformedEvent(MalformedAnswer):
    """A watch line or list answer that is not what the API documents; the watch skips it and goes on."""


@dataclass(frozen=True)
class Event:
    """One watch event: ADDED, MODIFIED, DELETED or BOOKMARK, with the object's resourceVersion."""

    kind: str
    object: Mapping[str, Any]
    version: str


def event(line: bytes) -> Event:
    """A watch line as an Event; an ERROR event raises its StatusError (Gone for 410), a malformed one MalformedEvent."""
    try:
        data = json.loads(line)
    except ValueError:
        raise MalformedEvent(f"not JSON: {line[:80]!r}") from None
    if not isinstance(data, Mapping):
        raise MalformedEvent(f"not an object: {line[:80]!r}")
    kind, obj = data.get("type"), data.get("object")
    if not isinstance(obj, Mapping):
        raise MalformedEvent(f"{kind} event whose object is {type(obj).__name__}, not an object")
    if kind == "ERROR":
        code = obj.get("code")
        raise status_error(code if isinstance(code, int) and not isinstance(code, bool) else 500,
                           str(obj.get("message") or obj.get("reason") or "ERROR event"))
    if kind not in ("ADDED", "MODIFIED", "DELETED", "BOOKMARK"):
        raise MalformedEvent(f"unknown event type {kind!r}")
    version = _version(obj.get("metadata"))
    if version is None:
        metadata = obj.get("metadata")
        found = metadata.get("resourceVersion") if isinstance(metadata, Mapping) else None
        raise MalformedEvent(f"{kind} event whose metadata.resourceVersion is {found!r:.40}, not a number")
    return Event(kind, obj, version)


def _version(metadata: Any) -> str | None:
    """metadata.resourceVersion when it is one (a non-empty string of digits, as every API server sends), else None."""
    version = metadata.get("resourceVersion") if isinstance(metadata, Mapping) else None
    if isinstance(version, int) and not isinstance(version, bool) and version >= 0:
        return str(version)
    return version if isinstance(version, str) and version.isascii() and version.isdigit() else None


def _lines(response: urllib3.BaseHTTPResponse) -> Iterator[bytes]:
    """Split a watch stream into its JSON lines as the chunks arrive."""
    pending = b""
    with translated():
        for chunk in response.stream(65536, decode_content=False):
            pending += chunk
            *complete, pending = pending.split(b"\n")
            yield from (line for line in complete if line.strip())
    if pending.strip():
        yield pending


def _parse(key: WatchKey, parse: Parse[T], obj: Any) -> T | None:
    try:
        return parse(obj)
    except ValueError as exc:
        log.warning("%s: skipping a pod the API sent: %s", key, exc)
        return None


# --- counting requests ------------------------------------------------------------------------------------

VERBS = ("list", "watch")
OUTCOMES = ("ok", "gone", "throttled", "unauthorized", "forbidden", "client_error", "server_error", "timeout",
            "transport_error", "malformed", "unexpected")


# Errors by outcome, the narrower first (a read timeout is a TransportError); other StatusErrors go by status.
_OUTCOME_OF_ERROR: tuple[tuple[type[BaseException], str], ...] = (
    (Gone, "gone"), (Unauthorized, "unauthorized"), (Forbidden, "forbidden"), (ReadTimeout, "timeout"),
    (TransportError, "transport_error"), (MalformedAnswer, "malformed"))


def outcome(exc: BaseException | None) -> str:
    """How a request ended, as one of OUTCOMES: by the kube.py error it raised, or "ok" (None)."""
    if exc is None:
        return "ok"
    named = next((name for kind, name in _OUTCOME_OF_ERROR if isinstance(exc, kind)), None)
    if named is not None:
        return named
    if isinstance(exc, StatusError):
        return "throttled" if exc.status == 429 else "server_error" if exc.status >= 500 else "client_error"
    return "unexpected"


class Requests:
    """List and watch requests by how they ended. Discovery keeps one for all its watches, which
    come and go as the config changes, so the totals never decrease."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = {(verb, result): 0 for verb in VERBS for result in OUTCOMES}

    def add(self, verb: str, exc: BaseException | None) -> None:
        with self._lock:
            self._counts[verb, outcome(exc)] += 1

    def totals(self) -> dict[tuple[str, str], int]:
        """(verb, outcome) → requests, every pair present."""
        with self._lock:
            return dict(self._counts)


# --- retrying -------------------------------------------------------------------------------------------


@dataclass
class Backoff:
    """Exponential backoff with full jitter: the n-th retry in a row waits uniform(0, min(cap, first × 2ⁿ⁻¹)).

    The first retry comes within `first`; when thousands of sidecars lose the API server at
    once, their retries spread over the whole window instead of arriving together.
    """

    first: float = BACKOFF_FIRST
    cap: float = BACKOFF_MAX
    failures: int = 0

    def next(self, retry_after: float | None = None) -> float:
        """The wait before the next attempt; the server's Retry-After (bounded by `cap`) is the least."""
        self.failures += 1
        delay = random.uniform(0, min(self.cap, self.first * 2 ** min(self.failures - 1, 20)))
        if retry_after is not None:
            delay = max(delay, min(self.cap, retry_after) + random.uniform(0, self.first))
        return delay

    def reset(self) -> None:
        self.failures = 0


# --- the watch -----------------------------------------------------------------------------------------------


class Watch(Generic[T]):
    """Lists, then watches, one `WatchKey`; calls `on_change` whenever its pods change."""

    def __init__(self, key: WatchKey, client: Callable[[bool], Api], timeout: float,
                 on_change: Callable[[], None], parse: Parse[T], requests: Requests) -> None:
        self.key = key
        self.requests = requests
        self.timeout = timeout  # for the next request; a running one keeps its own
        self._parse = parse
        self._client = client
        self._on_change = on_change
        self.pods: dict[str, T] = {}
        self._lock = threading.Lock()
        self.synced = threading.Event()
        self.version: str | None = None  # the newest resourceVersion seen; None: list first
        self._list_version = "0"  # "0": from the watch cache, whatever it holds
        self.restarts = 0
        self._backoff = Backoff()
        self._reload_client = False  # after a 401: build the client anew before the next attempt
        self._last_error = ""  # said once per kind of failure, not once per retry
        self._last_skip = ""  # likewise for malformed events
        self.last_activity = time.monotonic()
        self.last_heard = time.monotonic()  # the last list, event, bookmark or watch ended as asked: /metrics
        self._request_timeout = timeout
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
        return self.connected and time.monotonic() - self.last_activity > 2 * self._request_timeout

    def snapshot(self) -> list[T]:
        with self._lock:
            return list(self.pods.values())

    def _run(self) -> None:
        """Follow the pods until stopped: nothing an answer or the client does ends this loop."""
        while not self._stop.is_set():
            retry_after = None
            try:
                self._follow()
                continue
            except Gone:
                # After a watch's 410 the list asks for a state not older than the version held; after the
                # list's own 410, for whatever the cache holds.
                log.info("%s: resourceVersion %s expired (410 Gone); listing again", self.key,
                         self.version or self._list_version)
                self._list_version, self.version = self.version or "0", None
                error = ""
            except StatusError as exc:
                error = self._describe(exc)
                retry_after = exc.retry_after
                self._reload_client = isinstance(exc, Unauthorized)
            except ReadTimeout:
                error = f"watch stalled: nothing received for {1.5 * self._request_timeout:g}s; reconnecting"
            except CredentialsError as exc:
                error = str(exc)
            except ApiError as exc:
                error = f"API unreachable or broken answer: {exc}"
            except Exception as exc:  # the watch must outlive anything one answer or the client can do to it
                if self._stop.is_set():
                    return  # stop() closed the stream under our feet
                log.exception("%s: unexpected error", self.key)
                error = f"unexpected {type(exc).__name__}: {exc}"
            finally:
                self.connected = False
                self._response = None
            if self._stop.is_set():
                return
            self.restarts += 1
            if error and error != self._last_error:  # once per kind of failure, not once per retry
                log.warning("%s: %s; retrying with backoff", self.key, error)
                self._last_error = error
            self._stop.wait(self._backoff.next(retry_after))

    def _follow(self) -> None:
        """List if no resourceVersion is held, then one watch request until the server ends it."""
        try:
            core = self._client(self._reload_client)  # re-reads credentials after a 401: tokens rotate
        except Exception as exc:  # a kubeconfig or token file half-written, removed, or wrong
            raise CredentialsError(f"cannot load the API credentials: {type(exc).__name__}: {exc}") from exc
        self._reload_client = False
        if self.version is None:
            self._list(core)
        started, version = time.monotonic(), self.version
        self._request_timeout = self.timeout
        assert version is not None
        with self._counted("watch"):
            response = watch_request(core, self.key, version, self._request_timeout)
            self._response = response
            self.connected = True
            self.last_activity = time.monotonic()
            if self._stop.is_set():
                return
            for line in _lines(response):
                self.last_activity = self.last_heard = time.monotonic()
                self._handle(line)
            if self.version == version and time.monotonic() - started < QUICK_END:
                raise TransportError("the API server ended the watch at once, with nothing new")
        self.last_heard = time.monotonic()
        self._recovered()

    def _handle(self, line: bytes) -> None:
        """Apply one watch line; a malformed one is said and skipped, the watch goes on."""
        try:
            change = event(line)
        except MalformedEvent as exc:
            if str(exc) != self._last_skip:
                log.warning("%s: skipping a watch event: %s", self.key, exc)
                self._last_skip = str(exc)
            return
        if change.kind != "BOOKMARK":
            self._apply(change.kind, change.object)
        if change.version != self.version:
            self.version = change.version  # kept as read: a cut stream resumes from here
            self._recovered()

    def _recovered(self) -> None:
        """The API answers with news again: say so once, and start the next failure's backoff afresh."""
        if self._backoff.failures:
            log.info("%s: watching again after %d failed attempt(s)", self.key, self._backoff.failures)
        self._backoff.reset()
        self._last_error = ""

    def _describe(self, exc: StatusError) -> str:
        if isinstance(exc, Forbidden):
            return (f"403 Forbidden: grant list and watch on pods in namespace {self.key.namespace} "
                    f"to this pod's service account (see examples/rbac.yaml); the API said: {exc.message}")
        if isinstance(exc, Unauthorized):
            return "401 Unauthorized: re-reading credentials (rotated service-account token?)"
        return f"API answered {exc.status}: {exc.message}"

    @contextmanager
    def _counted(self, verb: str) -> Iterator[None]:
        """Count the request made inside, once, by how it ended; a watch that stop() cut ended as asked."""
        try:
            yield
        except BaseException as exc:
            self.requests.add(verb, None if self._stop.is_set() else exc)
            raise
        self.requests.add(verb, None)

    def _list(self, core: Api) -> None:
        with self._counted("list"):
            pods, version = list_objects(core, self.key, self._parse, self.timeout, self._list_version)
        self.last_activity = self.last_heard = time.monotonic()
        with self._lock:
            changed, self.pods = pods != self.pods, pods
        self.version = version
        self.synced.set()
        if changed:
            self._on_change()

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
