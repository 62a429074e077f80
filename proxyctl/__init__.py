"""proxyctl: forwards localhost ports to the pods on the sidecar's own node, through nginx."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from types import ModuleType


def _lean_kubernetes() -> None:
    """Register the `kubernetes` package without running its __init__, which imports every part.

    That __init__ loads the dynamic client, websockets, informers, leader election and more
    (with the test dependencies also jsonschema): about 4 MB of the sidecar's memory, for
    parts proxyctl never uses. Its modules import their siblings by full name, so each one
    proxyctl needs (configuration, ApiClient, the config loaders) loads on first import as usual;
    `kubernetes.<name>` still works, importing the submodule when it is first touched.
    """
    if "kubernetes" in sys.modules:
        return
    spec = importlib.util.find_spec("kubernetes")
    if spec is None or spec.submodule_search_locations is None:
        return
    package = importlib.util.module_from_spec(spec)

    def submodule(name: str) -> ModuleType:
        try:
            return importlib.import_module(f"kubernetes.{name}")
        except ModuleNotFoundError:
            raise AttributeError(f"module 'kubernetes' has no attribute {name!r}") from None

    package.__getattr__ = submodule  # type: ignore[method-assign]  # PEP 562
    sys.modules["kubernetes"] = package


_lean_kubernetes()
