"""Kubernetes access and the sidecar's identity: which API, which node, which namespace."""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import urllib3
from kubernetes.client.api_client import ApiClient
from kubernetes.client.configuration import Configuration
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException

log = logging.getLogger("proxyctl.kube")

SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
CONNECT_TIMEOUT = 5.0


# --- errors: everything a request to the API server can end in, as one hierarchy ---------------


class ApiError(Exception):
    """Talking to the API server failed; the one exception its callers need to catch."""


class TransportError(ApiError):
    """No usable answer: the connection was refused, reset or cut, or the stream broke off."""


class ReadTimeout(TransportError):
    """Connected, but nothing arrived within the read timeout."""


class CredentialsError(ApiError):
    """The client could not be built: the kubeconfig or service-account files are missing or unreadable."""


class MalformedAnswer(ApiError):
    """An answer that is not the JSON the API documents."""


class StatusError(ApiError):
    """The server answered with an error status, or a watch sent an ERROR event."""

    def __init__(self, status: int, message: str, retry_after: float | None = None) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message
        self.retry_after = retry_after  # seconds the server asked us to wait (429, 503), if it said


class Unauthorized(StatusError):
    """401: the credentials are stale (service-account tokens rotate) or wrong."""


class Forbidden(StatusError):
    """403: RBAC does not grant the request."""


class Gone(StatusError):
    """410: the resourceVersion we hold was compacted away; only a relist helps."""


def status_error(status: int, message: str, retry_after: float | None = None) -> StatusError:
    """The StatusError subclass for `status`."""
    kind = {401: Unauthorized, 403: Forbidden, 410: Gone}.get(status, StatusError)
    return kind(status, message, retry_after)


@contextmanager
def translated() -> Iterator[None]:
    """Turn what the transport raises (urllib3, sockets, the client's wrapper) into ApiError: the one place that knows them."""
    try:
        yield
    except ApiError:
        raise
    except urllib3.exceptions.ReadTimeoutError as exc:
        raise ReadTimeout(f"{type(exc).__name__}: {exc}") from exc
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        raise TransportError(f"{type(exc).__name__}: {exc}") from exc
    except ApiException as exc:  # the kubernetes client wraps TLS errors in it, with status 0
        raise TransportError(str(exc.reason)) from exc


def _status_message(body: bytes, reason: str) -> str:
    """The `message` of the Status object an error answer carries, else the HTTP reason."""
    try:
        return str(json.loads(body)["message"])
    except (TypeError, ValueError, KeyError):
        return reason


def _retry_after(value: str | None) -> float | None:
    """Retry-After in seconds (the API server sends seconds, not HTTP dates); None when absent or unreadable."""
    try:
        seconds = float(value) if value is not None else None
    except ValueError:
        return None
    return seconds if seconds is not None and 0 <= seconds < float("inf") else None


class Api:
    """The few GETs proxyctl makes, through the kubernetes client's ApiClient (config, auth, TLS).

    Answers are read as raw JSON streams: the typed CoreV1Api would import every core model
    (about 20 MB and most of a second at start-up) only for us to bypass them.
    """

    def __init__(self, env: Mapping[str, str]) -> None:
        """A fresh client: in-cluster config inside a pod, else KUBECONFIG or ~/.kube/config.

        Made anew after a 401, so that a rotated token (file) is read again.
        """
        configuration = Configuration()
        try:
            if env.get("KUBERNETES_SERVICE_HOST"):
                from kubernetes.config.incluster_config import load_incluster_config

                load_incluster_config(client_configuration=configuration)
            else:  # only here: the kubeconfig loader brings requests, oauthlib and yaml (see proxyctl/__init__.py)
                from kubernetes.config.kube_config import load_kube_config

                load_kube_config(config_file=env.get("KUBECONFIG") or None, client_configuration=configuration)
        except (ConfigException, OSError) as exc:
            raise NoCluster(_no_cluster_reason(env, exc)) from None
        # urllib3 would retry a failed connect three times by itself, hiding a dead API server
        # behind long waits; our watches have their own backoff.
        configuration.retries = False
        self.client = ApiClient(configuration)

    def get(self, path: str, query: Mapping[str, Any], read_timeout: float) -> urllib3.BaseHTTPResponse:
        """GET `path`; the response streams (for watches). Raises StatusError on 4xx/5xx, TransportError when cut."""
        method, url, headers, body, _ = self.client.param_serialize(
            "GET", path, query_params=list(query.items()), header_params={"Accept": "application/json"},
            auth_settings=["BearerToken"],
        )
        with translated():
            response = self.client.call_api(method, url, headers, body,
                                            _request_timeout=(CONNECT_TIMEOUT, read_timeout))
            if response.status >= 400:
                raise status_error(response.status, _status_message(response.read(), str(response.reason)),
                                   _retry_after(response.getheader("Retry-After")))
        return response.response

    def get_json(self, path: str, query: Mapping[str, Any], read_timeout: float) -> Any:
        response = self.get(path, query, read_timeout)
        with translated():
            data = response.data
        try:
            return json.loads(data)
        except ValueError as exc:
            raise MalformedAnswer(f"{path}: not JSON: {exc}") from None


class NoCluster(CredentialsError):
    """No usable way to reach an API server: not in a pod, and no (valid) kubeconfig."""


def _no_cluster_reason(env: Mapping[str, str], exc: Exception) -> str:
    if env.get("KUBERNETES_SERVICE_HOST"):
        return f"in-cluster config (KUBERNETES_SERVICE_HOST is set): {exc}"
    kubeconfig = env.get("KUBECONFIG") or str(Path("~/.kube/config").expanduser())
    if not all(Path(p).is_file() for p in kubeconfig.split(":") if p):
        return (f"no Kubernetes cluster to talk to: not in a pod (KUBERNETES_SERVICE_HOST is not set) and "
                f"no kubeconfig at {kubeconfig}; run in a pod, or set KUBECONFIG")
    return f"kubeconfig {kubeconfig}: {exc}"


@dataclass(frozen=True)
class Identity:
    """Where the sidecar runs: its node selects the backends, its namespace is the default."""

    node: str
    namespace: str


def own_namespace(env: Mapping[str, str]) -> str:
    for name in ("MY_POD_NAMESPACE", "POD_NAMESPACE"):
        if env.get(name):
            return env[name]
    if SERVICE_ACCOUNT_NAMESPACE.is_file():
        return SERVICE_ACCOUNT_NAMESPACE.read_text().strip()
    return "default"


def identity(env: Mapping[str, str], core: Api | None = None) -> Identity:
    """`NODE_NAME` (downward API) when set; else ask the API for the sidecar's own pod."""
    namespace = own_namespace(env)
    if env.get("NODE_NAME"):
        return Identity(env["NODE_NAME"], namespace)
    core = core or Api(env)
    pod_name = env.get("MY_POD_NAME") or env.get("POD_NAME") or env.get("HOSTNAME")
    if not pod_name:
        raise RuntimeError("cannot tell this pod's node: set NODE_NAME from the downward API (spec.nodeName)")
    pod = core.get_json(f"/api/v1/namespaces/{namespace}/pods/{pod_name}", {}, 30)
    node = (pod.get("spec") or {}).get("nodeName")
    if not node:
        raise RuntimeError(f"pod {namespace}/{pod_name} has no spec.nodeName yet")
    return Identity(str(node), namespace)
