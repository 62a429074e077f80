"""Kubernetes access and the sidecar's identity: which API, which node, which namespace."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from kubernetes import client, config

log = logging.getLogger("proxyctl.kube")

SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
CONNECT_TIMEOUT = 5.0


def api(env: Mapping[str, str]) -> client.CoreV1Api:
    """A fresh client: in-cluster config inside a pod, else KUBECONFIG or ~/.kube/config.

    Called again after a 401, so that a rotated token (file) is read anew.
    """
    configuration = client.Configuration()
    if env.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config(client_configuration=configuration)
    else:
        config.load_kube_config(config_file=env.get("KUBECONFIG") or None, client_configuration=configuration)
    # urllib3 would retry a failed connect three times by itself, hiding a dead API server
    # behind long waits; our watches have their own backoff.
    configuration.retries = False
    return client.CoreV1Api(client.ApiClient(configuration))


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


def identity(env: Mapping[str, str], core: client.CoreV1Api | None = None) -> Identity:
    """`NODE_NAME` (downward API) when set; else ask the API for the sidecar's own pod."""
    namespace = own_namespace(env)
    if env.get("NODE_NAME"):
        return Identity(env["NODE_NAME"], namespace)
    core = core or api(env)
    pod_name = env.get("MY_POD_NAME") or env.get("POD_NAME") or env.get("HOSTNAME")
    if not pod_name:
        raise RuntimeError("cannot tell this pod's node: set NODE_NAME from the downward API (spec.nodeName)")
    pod = core.read_namespaced_pod(pod_name, namespace, _request_timeout=(CONNECT_TIMEOUT, 30))
    if not pod.spec or not pod.spec.node_name:
        raise RuntimeError(f"pod {namespace}/{pod_name} has no spec.nodeName yet")
    return Identity(pod.spec.node_name, namespace)
