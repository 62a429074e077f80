"""Kubernetes access and the sidecar's identity: which API, which node, which namespace."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import urllib3
from kubernetes import config
from kubernetes.client.api_client import ApiClient
from kubernetes.client.configuration import Configuration
from kubernetes.client.exceptions import ApiException

log = logging.getLogger("proxyctl.kube")

SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
CONNECT_TIMEOUT = 5.0


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
                config.load_incluster_config(client_configuration=configuration)
            else:
                config.load_kube_config(config_file=env.get("KUBECONFIG") or None, client_configuration=configuration)
        except (config.ConfigException, OSError) as exc:
            raise NoCluster(_no_cluster_reason(env, exc)) from None
        # urllib3 would retry a failed connect three times by itself, hiding a dead API server
        # behind long waits; our watches have their own backoff.
        configuration.retries = False
        self.client = ApiClient(configuration)

    def get(self, path: str, query: Mapping[str, Any], read_timeout: float) -> urllib3.BaseHTTPResponse:
        """GET `path`; the response streams (for watches). Raises ApiException on 4xx/5xx."""
        method, url, headers, body, _ = self.client.param_serialize(
            "GET", path, query_params=list(query.items()), header_params={"Accept": "application/json"},
            auth_settings=["BearerToken"],
        )
        response = self.client.call_api(method, url, headers, body, _request_timeout=(CONNECT_TIMEOUT, read_timeout))
        if response.status >= 400:
            raise ApiException.from_response(http_resp=response, body=response.read().decode(errors="replace"),
                                             data=None)
        return response.response

    def get_json(self, path: str, query: Mapping[str, Any], read_timeout: float) -> Any:
        return json.loads(self.get(path, query, read_timeout).data)


class NoCluster(Exception):
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
