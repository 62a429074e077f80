"""A small Kubernetes API server over real HTTP, for tests.

The real ``kubernetes`` client talks to it exactly as it would talk to a
cluster: bearer-token auth, pod list/get/watch with label and field
selectors, resourceVersion-based watches (including the 410 "too old"
error after compaction), bookmarks and server-side watch timeouts.
Fault switches (stalls, resets, error statuses, forbidden namespaces,
delays, a full stop/start) let tests exercise failure handling without
mocking the client.

Only the pod endpoints of the core v1 API are served::

    GET /api/v1/pods
    GET /api/v1/namespaces/{namespace}/pods
    GET /api/v1/namespaces/{namespace}/pods/{name}
"""

from __future__ import annotations

import bisect
import copy
import json
import os
import re
import select
import socket
import ssl
import subprocess
import struct
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, NamedTuple
from urllib.parse import parse_qs, urlsplit

import pytest

Pod = dict[str, Any]

# How often idle watch loops wake up to look for new events, stalls, resets
# and shutdown; keeps both event latency and server shutdown quick.
_WATCH_TICK = 0.1

_REASONS = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    409: "Conflict",
    410: "Expired",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
    504: "Timeout",
}


def status_object(code: int, message: str, reason: str | None = None,
                  details: dict[str, Any] | None = None) -> dict[str, Any]:
    """Build a ``Status`` object like the ones real API servers send with errors."""
    status: dict[str, Any] = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason or _REASONS.get(code, "Unknown"),
        "code": code,
    }
    if details:
        status["details"] = details
    return status


# --------------------------------------------------------------------------
# Selectors
# --------------------------------------------------------------------------

class SelectorError(ValueError):
    """A label or field selector the server cannot parse (answered with 400)."""


_LABEL_KEY = r"[A-Za-z0-9](?:[-A-Za-z0-9_./]*[A-Za-z0-9])?"
_LABEL_VALUE = r"(?:[A-Za-z0-9](?:[-A-Za-z0-9_.]*[A-Za-z0-9])?)?"
_EXISTS_RE = re.compile(rf"(?P<negated>!?)\s*(?P<key>{_LABEL_KEY})")
_EQUALITY_RE = re.compile(
    rf"(?P<key>{_LABEL_KEY})\s*(?P<op>==|=|!=)\s*(?P<value>{_LABEL_VALUE})")
_SET_RE = re.compile(
    rf"(?P<key>{_LABEL_KEY})\s+(?P<op>in|notin)\s*\((?P<values>[^()]*)\)")
_LABEL_VALUE_RE = re.compile(_LABEL_VALUE)


@dataclass(frozen=True)
class LabelRequirement:
    """One comma-separated term of a label selector, e.g. ``tier notin (a,b)``.

    ``op`` is one of ``=``, ``!=``, ``in``, ``notin``, ``exists``, ``!exists``.
    As in Kubernetes, ``!=`` and ``notin`` also match objects without the key.
    """

    key: str
    op: str
    values: frozenset[str] = frozenset()

    def matches(self, labels: dict[str, str]) -> bool:
        present = self.key in labels
        value = labels.get(self.key)
        if self.op == "exists":
            return present
        if self.op == "!exists":
            return not present
        if self.op in ("=", "in"):
            return present and value in self.values
        return not present or value not in self.values  # "!=" and "notin"


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside ``in (...)`` value lists."""
    parts, depth, current = [], 0, []
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def parse_label_selector(selector: str) -> list[LabelRequirement]:
    """Parse the Kubernetes label selector string grammar (terms are ANDed)."""
    if not selector.strip():
        return []
    requirements = []
    for term in _split_top_level(selector):
        term = term.strip()
        if match := _SET_RE.fullmatch(term):
            values = [v.strip() for v in match["values"].split(",")]
            if not all(_LABEL_VALUE_RE.fullmatch(v) for v in values):
                raise SelectorError(f"invalid label value in {term!r}")
            requirements.append(LabelRequirement(match["key"], match["op"], frozenset(values)))
        elif match := _EQUALITY_RE.fullmatch(term):
            op = "!=" if match["op"] == "!=" else "="
            requirements.append(LabelRequirement(match["key"], op, frozenset([match["value"]])))
        elif match := _EXISTS_RE.fullmatch(term):
            op = "!exists" if match["negated"] else "exists"
            requirements.append(LabelRequirement(match["key"], op))
        else:
            raise SelectorError(f"unable to parse requirement: {term!r}")
    return requirements


def _lookup(obj: Any, *path: str) -> Any:
    """Walk nested dicts, returning None when anything along the way is missing
    or malformed (stored pods may be deliberately broken)."""
    for key in path:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return obj


_FIELDS: dict[str, tuple[str, ...]] = {
    "metadata.name": ("metadata", "name"),
    "metadata.namespace": ("metadata", "namespace"),
    "spec.nodeName": ("spec", "nodeName"),
    "status.phase": ("status", "phase"),
}
_FIELD_RE = re.compile(r"(?P<field>[A-Za-z.]+)\s*(?P<op>==|=|!=)\s*(?P<value>[^,]*)")


@dataclass(frozen=True)
class FieldRequirement:
    """One term of a field selector, e.g. ``spec.nodeName!=node-a``."""

    field: str
    negated: bool
    value: str

    def matches(self, pod: Pod) -> bool:
        actual = _lookup(pod, *_FIELDS[self.field])
        actual = "" if actual is None else str(actual)
        return (actual == self.value) != self.negated


def parse_field_selector(selector: str) -> list[FieldRequirement]:
    """Parse the pod field selectors the API server supports (terms are ANDed)."""
    if not selector.strip():
        return []
    requirements = []
    for term in selector.split(","):
        match = _FIELD_RE.fullmatch(term.strip())
        if not match:
            raise SelectorError(f"invalid field selector: {term!r}")
        if match["field"] not in _FIELDS:
            raise SelectorError(f'"{match["field"]}" is not a known field selector: '
                                f'only "{", ".join(_FIELDS)}"')
        requirements.append(FieldRequirement(match["field"], match["op"] == "!=",
                                             match["value"].strip()))
    return requirements


@dataclass(frozen=True)
class PodFilter:
    """Which pods a list or watch request sees: namespace plus both selectors."""

    namespace: str | None
    labels: tuple[LabelRequirement, ...]
    fields: tuple[FieldRequirement, ...]

    def matches(self, namespace: str, pod: Pod | None) -> bool:
        if pod is None or (self.namespace is not None and namespace != self.namespace):
            return False
        labels = _lookup(pod, "metadata", "labels")
        labels = labels if isinstance(labels, dict) else {}
        return (all(r.matches(labels) for r in self.labels)
                and all(r.matches(pod) for r in self.fields))


# --------------------------------------------------------------------------
# Pod objects
# --------------------------------------------------------------------------

def _now_rfc3339() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _container_ports(ports: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """Fill in defaults so callers can write just ``{"name": "http", "containerPort": 80}``."""
    if ports is None:
        ports = [{"name": "http", "containerPort": 8080}]
    return [{"protocol": "TCP", **port} for port in ports]


def _set_labels(pod: Pod, labels: dict[str, str] | None) -> None:
    pod["metadata"]["labels"] = dict(labels or {})


def _set_node(pod: Pod, node: str | None) -> None:
    if node is None:
        pod["spec"].pop("nodeName", None)
    else:
        pod["spec"]["nodeName"] = node


def _set_ip(pod: Pod, ip: str | None) -> None:
    if ip is None:
        pod["status"].pop("podIP", None)
        pod["status"].pop("podIPs", None)
    else:
        pod["status"]["podIP"] = ip
        pod["status"]["podIPs"] = [{"ip": ip}]


def _set_ready(pod: Pod, ready: bool) -> None:
    for condition in pod["status"]["conditions"]:
        if condition["type"] in ("Ready", "ContainersReady"):
            condition["status"] = "True" if ready else "False"
            condition["lastTransitionTime"] = _now_rfc3339()


def _set_terminating(pod: Pod, terminating: bool) -> None:
    if terminating:
        pod["metadata"]["deletionTimestamp"] = _now_rfc3339()
        pod["metadata"]["deletionGracePeriodSeconds"] = 30
    else:
        pod["metadata"].pop("deletionTimestamp", None)
        pod["metadata"].pop("deletionGracePeriodSeconds", None)


def _set_ports(pod: Pod, ports: list[dict[str, Any]] | None) -> None:
    pod["spec"]["containers"][0]["ports"] = _container_ports(ports)


def _set_phase(pod: Pod, phase: str) -> None:
    pod["status"]["phase"] = phase


_POD_SETTERS: dict[str, Callable[[Pod, Any], None]] = {
    "labels": _set_labels,
    "node": _set_node,
    "ip": _set_ip,
    "ready": _set_ready,
    "terminating": _set_terminating,
    "ports": _set_ports,
    "phase": _set_phase,
}


def make_pod(name: str, namespace: str = "default", labels: dict[str, str] | None = None,
             node: str | None = "node-a", ip: str | None = "127.0.0.2", ready: bool = True,
             ports: list[dict[str, Any]] | None = None, phase: str = "Running") -> Pod:
    """Build a realistic pod object (without resourceVersion, which the server sets)."""
    created = _now_rfc3339()
    pod: Pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": str(uuid.uuid4()),
            "creationTimestamp": created,
        },
        "spec": {
            "containers": [{"name": "app", "image": "registry.example/app:1.0"}],
            "restartPolicy": "Always",
        },
        "status": {
            "phase": phase,
            "startTime": created,
            "conditions": [
                {"type": condition, "status": "True", "lastTransitionTime": created}
                for condition in ("PodScheduled", "Initialized", "ContainersReady", "Ready")
            ],
        },
    }
    _set_labels(pod, labels)
    _set_node(pod, node)
    _set_ip(pod, ip)
    _set_ready(pod, ready)
    _set_ports(pod, ports)
    return pod


def _with_resource_version(pod: Pod, rv: int) -> Pod:
    """Copy of ``pod`` stamped with ``rv`` (left alone if metadata is malformed)."""
    pod = copy.deepcopy(pod)
    if isinstance(pod.get("metadata"), dict):
        pod["metadata"]["resourceVersion"] = str(rv)
    return pod


# --------------------------------------------------------------------------
# Event history and watches
# --------------------------------------------------------------------------

PodKey = tuple[str, str]  # (namespace, name)


@dataclass(frozen=True)
class _Change:
    """One stored change; ``before``/``after`` are None for creation/deletion."""

    rv: int
    namespace: str
    before: Pod | None
    after: Pod | None

    def event_for(self, pod_filter: PodFilter) -> dict[str, Any] | None:
        """The event a watcher with ``pod_filter`` sees, as Kubernetes computes it:
        a pod leaving the selection is DELETED, one entering it is ADDED."""
        was_in = pod_filter.matches(self.namespace, self.before)
        is_in = pod_filter.matches(self.namespace, self.after)
        if is_in:
            return {"type": "MODIFIED" if was_in else "ADDED", "object": self.after}
        if was_in:
            # Like the real cacher: the last matching state, at this event's rv.
            return {"type": "DELETED", "object": _with_resource_version(self.before, self.rv)}
        return None


@dataclass(eq=False)
class _Watch:
    """State of one open watch stream."""

    pod_filter: PodFilter
    cursor: int  # every change with rv <= cursor has been handled
    deadline: float | None
    bookmark_interval: float | None  # None: the client did not ask for bookmarks
    reset_generation: int
    pending: list[dict[str, Any] | bytes] = field(default_factory=list)  # bytes: a raw line, sent as is
    finish_after_pending: bool = False
    next_bookmark: float | None = None


# --------------------------------------------------------------------------
# Request log
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class RequestRecord:
    """One request as the server saw it; ``status`` is None if the connection was reset."""

    method: str
    path: str
    query: dict[str, str]
    is_watch: bool
    time: float
    status: int | None


# --------------------------------------------------------------------------
# HTTP plumbing
# --------------------------------------------------------------------------

_POD_PATH_RE = re.compile(r"/api/v1/namespaces/(?P<namespace>[^/]+)/pods(?:/(?P<name>[^/]+))?")


class _HTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer that can close every client connection on stop,
    as a real API server going down does (idle keep-alive ones included)."""

    def __init__(self, address: tuple[str, int], api: KubeApiServer, tls: ssl.SSLContext | None = None) -> None:
        super().__init__(address, _Handler)
        self.api = api
        self.tls = tls
        self.stopping = threading.Event()
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()

    def get_request(self) -> tuple[socket.socket, Any]:
        """With TLS, the handshake happens in the handler's thread, on its first read."""
        connection, address = super().get_request()
        if self.tls is not None:
            connection = self.tls.wrap_socket(connection, server_side=True, do_handshake_on_connect=False)
        return connection, address

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._connections_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed by its handler

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Stay quiet about clients that went away; report anything else."""
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


class _Route(NamedTuple):
    """What a request addresses; the verb is the one RBAC messages name."""

    namespace: str | None  # None: all namespaces
    name: str | None  # None: the collection
    verb: str


def _route(path: str, is_watch: bool) -> _Route | None:
    """Decode a pod path; None for anything this server does not serve."""
    collection_verb = "watch" if is_watch else "list"
    if path == "/api/v1/pods":
        return _Route(None, None, collection_verb)
    match = _POD_PATH_RE.fullmatch(path)
    if match is None:
        return None
    if match["name"] is not None:
        return _Route(match["namespace"], match["name"], "get")
    return _Route(match["namespace"], None, collection_verb)


class _Handler(BaseHTTPRequestHandler):
    """Serves one connection; all state lives in the ``KubeApiServer``."""

    protocol_version = "HTTP/1.1"  # needed for keep-alive and chunked watch streams
    server: _HTTPServer

    def log_message(self, format: str, *args: Any) -> None:
        """Keep test output clean; ``KubeApiServer.requests`` is the log."""

    def do_GET(self) -> None:
        api = self.server.api
        url = urlsplit(self.path)
        query = {key: values[-1] for key, values in
                 parse_qs(url.query, keep_blank_values=True).items()}
        is_watch = query.get("watch", "").lower() in ("true", "1")

        def record(status: int | None) -> None:
            api._record(RequestRecord("GET", url.path, query, is_watch, time.time(), status))

        if api.delay:
            self.server.stopping.wait(api.delay)
        fault = api._take_fault()
        if fault == "reset":
            record(None)
            self._reset_connection()
            return

        route = _route(url.path, is_watch)
        if isinstance(fault, int):
            self._send_json(fault, api._fault_status(fault, route or _Route(None, None, "get")),
                            record, api._fault_headers())
        elif not api._token_accepted(self.headers.get("Authorization")):
            self._send_json(401, status_object(401, "Unauthorized"), record)
        elif route is None:
            self._send_json(404, status_object(
                404, "the server could not find the requested resource"), record)
        elif route.namespace is not None and api._is_forbidden(route.namespace):
            self._send_json(403, api._forbidden_status(route), record)
        elif route.name is not None:
            self._get_pod(route.namespace, route.name, record)
        else:
            self._list_or_watch(route.namespace, query, is_watch, record)

    def _get_pod(self, namespace: str, name: str, record: Callable[[int], None]) -> None:
        pod = self.server.api.pod(namespace, name)
        if pod is None:
            self._send_json(404, status_object(
                404, f'pods "{name}" not found', details={"name": name, "kind": "pods"}), record)
        else:
            self._send_json(200, pod, record)

    def _list_or_watch(self, namespace: str | None, query: dict[str, str], is_watch: bool,
                       record: Callable[[int], None]) -> None:
        api = self.server.api
        try:
            pod_filter = PodFilter(namespace,
                                   tuple(parse_label_selector(query.get("labelSelector", ""))),
                                   tuple(parse_field_selector(query.get("fieldSelector", "")))
                                   if not api.ignore_field_selector else ())
            version = query.get("resourceVersion", "")
            if version and not version.isdigit():
                raise ValueError(f"resourceVersion: Invalid value: {version!r}")
            watch = api._open_watch(pod_filter, query, on_open=lambda: record(200)) if is_watch else None
        except ValueError as error:  # bad selector, resourceVersion or timeoutSeconds
            self._send_json(400, status_object(400, str(error)), record)
            return
        if watch is None:
            self._send_json(200, api._list(pod_filter), record)
            return
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self._stream_watch(watch)
        except OSError:
            self.close_connection = True  # the client or stop() closed the socket
        finally:
            api._close_watch(watch)

    def _stream_watch(self, watch: _Watch) -> None:
        """Send watch events until the watch ends, checking the fault switches
        every tick."""
        api = self.server.api
        while not self.server.stopping.is_set():
            if watch.reset_generation != api._reset_generation:
                self._reset_connection()
                return
            if self._client_gone():
                self.close_connection = True
                return
            if api.end_watches_at_once:
                self._write_chunk(b"")
                return
            if api.stall_watches:
                self.server.stopping.wait(_WATCH_TICK)
                continue
            events, finished = api._poll_watch(watch, time.monotonic())
            for event in events:
                self._write_chunk(event if isinstance(event, bytes) else json.dumps(event).encode() + b"\n")
            if finished:
                self._write_chunk(b"")  # the zero-length chunk ends the stream cleanly
                return
            api._wait_for_change(watch, _WATCH_TICK)
        self.close_connection = True

    def _write_chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

    def _send_json(self, code: int, body: dict[str, Any], record: Callable[[int], None],
                   headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        record(code)
        self.wfile.write(data)

    def _client_gone(self) -> bool:
        """True once the client closed its end; otherwise an abandoned watch
        without bookmarks would never notice (it never writes)."""
        readable, _, _ = select.select([self.connection], [], [], 0)
        if not readable:
            return False
        try:
            # socket.socket.recv: the TCP stream itself, also under TLS (SSLSocket refuses flags).
            return socket.socket.recv(self.connection, 1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def _reset_connection(self) -> None:
        """Close abruptly: SO_LINGER 0 makes close() send RST instead of FIN."""
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.rfile.close()  # drop the last makefile() reference so close() is immediate
        self.connection.close()
        self.close_connection = True


# --------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------

class KubeApiServer:
    """In-memory pod store served over HTTP, with switches for failure modes.

    All public methods are thread-safe. Attributes meant to be flipped by tests:
    ``stall_watches``, ``end_watches_at_once``, ``delay``, ``bookmark_interval``, ``user``,
    ``ignore_field_selector`` (answer as if none was given, like a server or proxy that drops it).
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, token: str = "test-token",
                 bookmark_interval: float | None = 1.0, tls: ssl.SSLContext | None = None) -> None:
        self.host = host
        self.tls = tls
        self.port = port  # replaced by the real port on first start() when 0
        self.bookmark_interval = bookmark_interval
        self.stall_watches = False
        self.end_watches_at_once = False  # watch streams end right after their headers, with no event
        self.delay = 0.0
        self.ignore_field_selector = False
        self.user = "system:serviceaccount:default:proxyctl"  # named in 403 messages

        self._lock = threading.RLock()  # re-entered where a watch is opened and its request recorded at once
        self._changed = threading.Condition(self._lock)
        self._token = token
        self._rv = 1
        self._compacted_rv = 0
        self._pods: dict[PodKey, Pod] = {}
        self._changes: list[_Change] = []
        self._watches: set[_Watch] = set()
        self._reset_generation = 0
        self._resets_left = 0
        self._failures_left = 0
        self._failure_status = 500
        self._failure_retry_after: str | None = None
        self._forbidden: set[str] = set()
        self._requests: list[RequestRecord] = []
        self._httpd: _HTTPServer | None = None
        self._serve_thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"

    def start(self) -> None:
        """Listen (again, on the same port after a stop()) and serve in a thread."""
        if self._httpd is not None:
            return
        httpd = _HTTPServer((self.host, self.port), self, self.tls)
        self.port = httpd.server_address[1]
        self._httpd = httpd
        self._serve_thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
            name=f"kubeapi-{self.port}", daemon=True)
        self._serve_thread.start()

    def stop(self) -> None:
        """Go down like a crashed API server: close the listening socket (new
        connections are refused) and every open connection, watches included.
        Returns once all handler threads have finished."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.stopping.set()
        httpd.shutdown()
        httpd.close_connections()
        httpd.server_close()  # closes the listener and joins the handler threads
        if self._serve_thread is not None:
            self._serve_thread.join()

    def write_kubeconfig(self, path: str | os.PathLike[str],
                         token_file: str | os.PathLike[str] | None = None) -> str:
        """Write a kubeconfig for this server and return its path.

        The user carries the current token, or references ``token_file``
        (see ``write_token_file``). JSON is valid YAML, so no YAML writer is needed.
        """
        user = {"tokenFile": os.fspath(token_file)} if token_file else {"token": self.token}
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "test", "cluster": {"server": self.url}}],
            "users": [{"name": "proxyctl", "user": user}],
            "contexts": [{"name": "test", "context": {
                "cluster": "test", "user": "proxyctl", "namespace": "default"}}],
            "current-context": "test",
        }
        with open(path, "w", encoding="utf-8") as file:
            json.dump(config, file, indent=2)
        return os.fspath(path)

    def write_token_file(self, path: str | os.PathLike[str]) -> str:
        """Write the current token to ``path`` like a mounted service-account token."""
        with open(path, "w", encoding="utf-8") as file:
            file.write(self.token)
        return os.fspath(path)

    # -- auth --------------------------------------------------------------

    @property
    def token(self) -> str:
        return self._token

    def rotate_token(self, new_token: str) -> None:
        """Accept only ``new_token`` from now on."""
        with self._lock:
            self._token = new_token

    def _token_accepted(self, authorization: str | None) -> bool:
        with self._lock:
            # The scheme is case-insensitive (RFC 7235); the in-cluster client sends "bearer".
            scheme, _, token = (authorization or "").partition(" ")
            return scheme.lower() == "bearer" and token == self._token

    # -- pods --------------------------------------------------------------

    @property
    def resource_version(self) -> int:
        """The newest resourceVersion handed out (shared by all objects)."""
        with self._lock:
            return self._rv

    def add_pod(self, name: str, namespace: str = "default",
                labels: dict[str, str] | None = None, node: str | None = "node-a",
                ip: str | None = "127.0.0.2", ready: bool = True,
                ports: list[dict[str, Any]] | None = None, phase: str = "Running") -> Pod:
        """Create a pod (replacing any with the same name) and return a copy.

        ``ports`` entries need ``containerPort`` and usually ``name``;
        ``protocol`` defaults to TCP. ``None`` gives one port ``http``/8080.
        """
        pod = make_pod(name, namespace, labels, node, ip, ready, ports, phase)
        with self._lock:
            return self._change_locked((namespace, name), pod)

    def update_pod(self, namespace: str, name: str, **changes: Any) -> Pod:
        """Change a pod and return a copy. Keyword arguments: ``labels``,
        ``node``, ``ip`` (None removes it), ``ready``, ``terminating`` (sets
        or clears deletionTimestamp), ``ports``, ``phase``."""
        unknown = set(changes) - set(_POD_SETTERS)
        if unknown:
            raise TypeError(f"update_pod() got unknown changes: {sorted(unknown)}")
        with self._lock:
            pod = copy.deepcopy(self._pods[(namespace, name)])
            for key, value in changes.items():
                _POD_SETTERS[key](pod, value)
            return self._change_locked((namespace, name), pod)

    def delete_pod(self, namespace: str, name: str) -> None:
        """Remove a pod; watchers get DELETED with its last state."""
        with self._lock:
            if (namespace, name) not in self._pods:
                raise KeyError((namespace, name))
            self._change_locked((namespace, name), None)

    def put_raw_pod(self, pod: dict[str, Any]) -> Pod:
        """Store ``pod`` exactly as given (not even a resourceVersion is added),
        for tests feeding malformed data to clients. It is filed under its
        metadata namespace/name, or "default" and a generated name."""
        namespace = _lookup(pod, "metadata", "namespace")
        name = _lookup(pod, "metadata", "name")
        key = (namespace if isinstance(namespace, str) else "default",
               name if isinstance(name, str) else f"raw-{uuid.uuid4().hex[:8]}")
        with self._lock:
            return self._change_locked(key, copy.deepcopy(pod), stamp=False)

    def pods(self) -> list[Pod]:
        """Copies of all stored pods, ordered by namespace and name."""
        with self._lock:
            return [copy.deepcopy(self._pods[key]) for key in sorted(self._pods)]

    def pod(self, namespace: str, name: str) -> Pod | None:
        """A copy of one stored pod, or None."""
        with self._lock:
            pod = self._pods.get((namespace, name))
            return copy.deepcopy(pod) if pod is not None else None

    def compact(self) -> None:
        """Forget history, so watches from any older resourceVersion get 410.

        Changes not yet sent to open watches are kept for them, like the
        watch cache of a real API server.
        """
        with self._lock:
            self._compacted_rv = self._rv
            keep_after = min([w.cursor for w in self._watches], default=self._rv)
            self._changes = [c for c in self._changes if c.rv > keep_after]

    def _change_locked(self, key: PodKey, after: Pod | None, stamp: bool = True) -> Pod:
        """Apply one create/update (``after``) or delete (None): take a new
        resourceVersion, keep the change for watches and wake them up.
        Returns a copy of the stored pod (or of the deleted one)."""
        self._rv += 1
        if after is not None and stamp:
            after = _with_resource_version(after, self._rv)
        before = self._pods.get(key)
        if after is None:
            del self._pods[key]
        else:
            self._pods[key] = after
        self._changes.append(_Change(self._rv, key[0], before, after))
        self._changed.notify_all()
        return copy.deepcopy(after if after is not None else before)

    def _list(self, pod_filter: PodFilter) -> dict[str, Any]:
        with self._lock:
            items = [self._pods[key] for key in sorted(self._pods)
                     if pod_filter.matches(key[0], self._pods[key])]
            return {"kind": "PodList", "apiVersion": "v1",
                    "metadata": {"resourceVersion": str(self._rv)}, "items": items}

    # -- watches -----------------------------------------------------------

    @property
    def open_watches(self) -> int:
        """How many watch streams are currently open."""
        with self._lock:
            return len(self._watches)

    def _open_watch(self, pod_filter: PodFilter, query: dict[str, str], on_open: Callable[[], None]) -> _Watch:
        """Register a watch and queue what it must send first (raises
        ValueError for a malformed resourceVersion or timeoutSeconds).

        `on_open` (recording the request) runs under the same lock, so a test that sees the
        watch open also sees its request."""
        timeout = float(query.get("timeoutSeconds") or 0)  # 0: no timeout, as on a real server
        bookmarks = query.get("allowWatchBookmarks", "").lower() in ("true", "1")
        interval = self.bookmark_interval if bookmarks else None
        now = time.monotonic()
        resource_version = query.get("resourceVersion", "")
        with self._lock:
            watch = _Watch(pod_filter, cursor=self._rv,
                           deadline=now + timeout if timeout > 0 else None,
                           bookmark_interval=interval,
                           reset_generation=self._reset_generation,
                           next_bookmark=now + interval if interval else None)
            if resource_version in ("", "0"):
                watch.pending = [{"type": "ADDED", "object": self._pods[key]}
                                 for key in sorted(self._pods)
                                 if pod_filter.matches(key[0], self._pods[key])]
            elif int(resource_version) < self._compacted_rv:
                message = (f"too old resource version: {resource_version} "
                           f"({self._compacted_rv})")
                watch.pending = [{"type": "ERROR", "object": status_object(410, message)}]
                watch.finish_after_pending = True
            else:
                watch.cursor = int(resource_version)
            self._watches.add(watch)
            on_open()
            return watch

    def _close_watch(self, watch: _Watch) -> None:
        with self._lock:
            self._watches.discard(watch)
            self._changed.notify_all()

    def _poll_watch(self, watch: _Watch, now: float) -> tuple[list[dict[str, Any]], bool]:
        """Events the watch should send now, and whether the stream then ends."""
        with self._lock:
            events, watch.pending = watch.pending, []
            if watch.finish_after_pending:
                return events, True
            start = bisect.bisect_right(self._changes, watch.cursor, key=lambda c: c.rv)
            for change in self._changes[start:]:
                if (event := change.event_for(watch.pod_filter)) is not None:
                    events.append(event)
            watch.cursor = self._rv
            timed_out = watch.deadline is not None and now >= watch.deadline
            bookmark_due = watch.next_bookmark is not None and now >= watch.next_bookmark
            if watch.bookmark_interval is not None and (timed_out or bookmark_due):
                events.append(self._bookmark_locked())
                watch.next_bookmark = now + watch.bookmark_interval
            return events, timed_out

    def _bookmark_locked(self) -> dict[str, Any]:
        return {"type": "BOOKMARK", "object": {
            "kind": "Pod", "apiVersion": "v1",
            "metadata": {"resourceVersion": str(self._rv)}}}

    def _wait_for_change(self, watch: _Watch, timeout: float) -> None:
        """Sleep until the store changes or ``timeout`` passes; a change made
        since the watch's last poll returns at once instead of being missed."""
        with self._changed:
            if self._rv == watch.cursor and not watch.pending:
                self._changed.wait(timeout)

    # -- request log -------------------------------------------------------

    @property
    def requests(self) -> list[RequestRecord]:
        """A snapshot of every request received so far, oldest first."""
        with self._lock:
            return list(self._requests)

    def count(self, watch: bool | None = None, path_contains: str | None = None,
              status: int | None = None) -> int:
        """How many logged requests match all the given criteria."""
        return sum(1 for r in self.requests
                   if (watch is None or r.is_watch == watch)
                   and (path_contains is None or path_contains in r.path)
                   and (status is None or r.status == status))

    def _record(self, record: RequestRecord) -> None:
        with self._lock:
            self._requests.append(record)

    # -- faults ------------------------------------------------------------

    def reset_next(self, n: int = 1) -> None:
        """Reset (TCP RST) the connection of the next ``n`` requests right
        after reading them."""
        with self._lock:
            self._resets_left = n

    def reset_watches(self, timeout: float = 5.0) -> None:
        """Cut every open watch stream with a TCP RST; returns once they are gone."""
        with self._lock:
            self._reset_generation += 1
            victims = set(self._watches)
        with self._changed:
            self._changed.notify_all()
            deadline = time.monotonic() + timeout
            while victims & self._watches and time.monotonic() < deadline:
                self._changed.wait(_WATCH_TICK)

    def fail_next(self, n: int = 1, status: int = 500, retry_after: str | None = None) -> None:
        """Answer the next ``n`` requests with ``status`` and a Status body,
        with a ``Retry-After`` header when given (as for 429 and 503)."""
        with self._lock:
            self._failures_left, self._failure_status = n, status
            self._failure_retry_after = retry_after

    def send_raw(self, line: bytes) -> None:
        """Send ``line`` (and a newline) as is on every open watch stream:
        malformed events for clients to survive."""
        with self._lock:
            for watch in self._watches:
                watch.pending.append(line + b"\n")
            self._changed.notify_all()

    def forbid_namespace(self, namespace: str) -> None:
        """Answer every request in ``namespace`` with 403 until allowed again."""
        with self._lock:
            self._forbidden.add(namespace)

    def allow_namespace(self, namespace: str) -> None:
        """Undo ``forbid_namespace``."""
        with self._lock:
            self._forbidden.discard(namespace)

    def _is_forbidden(self, namespace: str) -> bool:
        with self._lock:
            return namespace in self._forbidden

    def _take_fault(self) -> str | int | None:
        """Consume one pending fault for the current request: "reset", an
        HTTP status to fail with, or None."""
        with self._lock:
            if self._resets_left > 0:
                self._resets_left -= 1
                return "reset"
            if self._failures_left > 0:
                self._failures_left -= 1
                return self._failure_status
            return None

    def _fault_headers(self) -> dict[str, str]:
        with self._lock:
            return {"Retry-After": self._failure_retry_after} if self._failure_retry_after else {}

    def _forbidden_status(self, route: _Route) -> dict[str, Any]:
        """The 403 Status RBAC produces, e.g. 'pods is forbidden: User "..."
        cannot list resource "pods" in API group "" in the namespace "x"'."""
        subject = f'pods "{route.name}"' if route.name else "pods"
        scope = (f'in the namespace "{route.namespace}"' if route.namespace
                 else "at the cluster scope")
        message = (f'{subject} is forbidden: User "{self.user}" cannot {route.verb} '
                   f'resource "pods" in API group "" {scope}')
        details = {"kind": "pods", **({"name": route.name} if route.name else {})}
        return status_object(403, message, details=details)

    def _fault_status(self, code: int, route: _Route) -> dict[str, Any]:
        if code == 403:
            return self._forbidden_status(route)
        if code == 401:
            return status_object(401, "Unauthorized")
        if code == 500:
            return status_object(500, "Internal error occurred: injected failure")
        return status_object(code, f"injected failure with status {code}")


def self_signed_tls(directory: str | os.PathLike[str], ip: str = "127.0.0.1") -> tuple[ssl.SSLContext, str]:
    """A server context with a new self-signed certificate for `ip`, and the certificate's path (the CA)."""
    cert, key = os.path.join(directory, "apiserver.crt"), os.path.join(directory, "apiserver.key")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-days", "1", "-subj", "/CN=kube-apiserver", "-addext", f"subjectAltName=IP:{ip}",
                    "-keyout", key, "-out", cert], check=True, capture_output=True)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context, cert


@pytest.fixture
def kube_api() -> Iterator[KubeApiServer]:
    """A running test API server on an ephemeral loopback port."""
    server = KubeApiServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()
