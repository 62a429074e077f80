"""proxyctl: forwards localhost ports to the pods on the sidecar's own node, through nginx."""

from __future__ import annotations

import importlib
import importlib.util
import sys


def _lazy_package(name: str) -> None:
    """Register package `name` without running its __init__ until something only it defines is asked for.

    The `kubernetes` package's __init__ imports every part of the client (the dynamic client,
    websockets, informers, leader election...), and `kubernetes.config`'s imports the kubeconfig
    loader with requests, oauthlib and yaml, which a pod in a cluster never uses: together
    several MB of the sidecar's memory. Their modules import each other by full name, so the
    ones proxyctl uses load as usual. `kubernetes.<submodule>` imports the submodule when first
    touched; any other name (`kubernetes.config.load_kube_config`) runs the real __init__ first.
    """
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    if spec is None or spec.submodule_search_locations is None or spec.loader is None:
        return
    loader = spec.loader
    package = importlib.util.module_from_spec(spec)
    initialised = False

    def attribute(key: str) -> object:  # PEP 562
        nonlocal initialised
        try:
            return importlib.import_module(f"{name}.{key}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{name}.{key}":
                raise
        if not initialised:
            initialised = True
            loader.exec_module(package)
            if key in package.__dict__:
                return package.__dict__[key]
        raise AttributeError(f"module {name!r} has no attribute {key!r}")

    package.__getattr__ = attribute  # type: ignore[attr-defined]
    sys.modules[name] = package


_lazy_package("kubernetes")
_lazy_package("kubernetes.config")
