"""The JSON Schema editors check against, and the loader proxyctl runs, accept the same documents.

Documents are drawn from each side and checked by the other: from the schema (hypothesis-jsonschema)
the loader must accept them, and random documents the loader accepts the schema must accept.
Two rules no JSON Schema can state are left to `proxyctl validate`: a selector string's syntax, and
ports and names unique across routes. Those are held fixed where documents come from the schema.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import jsonschema
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis_jsonschema import from_schema

from proxyctl.cli import schema
from proxyctl.config import ConfigError, load_config

# The schema's IP and duration patterns are long; Hypothesis warns when it spells out their strategies.
pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr")

SCHEMA = schema()
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)
VALID_SELECTORS = ["app=agent", "tier in (a,b),!canary", {"matchLabels": {"app": "agent"}},
                   {"matchExpressions": [{"key": "tier", "operator": "In", "values": ["a"]}]}]


def loads(document: Any) -> bool:
    """Whether the loader accepts `document`, written as a config file (JSON is YAML)."""
    try:
        load_config(json.dumps(document, allow_nan=False), "doc.yaml")
    except ConfigError:
        return False
    return True


def schema_accepts(document: Any) -> bool:
    return VALIDATOR.is_valid(document)


def _schema_with_fixed_selectors() -> dict[str, Any]:
    fixed = copy.deepcopy(SCHEMA)
    fixed["$defs"]["Route"]["properties"]["selector"] = {"enum": VALID_SELECTORS}
    return fixed


def _unique_routes(document: dict[str, Any]) -> bool:
    routes = document["routes"]
    ports = [(r["port"], r["protocol"].lower()) for r in routes]
    names = [r.get("name") or f"{r['protocol'].lower()}-{r['port']}" for r in routes]
    return len(set(ports)) == len(ports) and len(set(names)) == len(names)


def from_json_schema(node: dict[str, Any], defs: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Documents a schema accepts: objects and arrays assembled here, every value from hypothesis-jsonschema.

    (Its own object strategy does not work with this Hypothesis release.) Rules between
    properties (`if`/`then`) are kept by filtering the whole document through the schema.
    """
    if "$ref" in node:
        return from_json_schema(defs[node["$ref"].rpartition("/")[2]], defs)
    if node.get("type") == "object" and "properties" in node:
        values = {key: from_json_schema(value, defs) for key, value in node["properties"].items()}
        required = set(node.get("required", []))
        return st.fixed_dictionaries({k: v for k, v in values.items() if k in required},
                                     optional={k: v for k, v in values.items() if k not in required})
    if node.get("type") == "array" and "items" in node:
        return st.lists(from_json_schema(node["items"], defs), min_size=node.get("minItems", 0), max_size=4)
    return from_schema(node)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(from_json_schema(FIXED := _schema_with_fixed_selectors(), FIXED["$defs"]).filter(schema_accepts))
def test_what_the_schema_accepts_the_loader_accepts(document: dict[str, Any]) -> None:
    assume(_unique_routes(document))
    assert loads(document), document


# --- documents the loader decides on ------------------------------------------------------------------------



def mostly(valid: st.SearchStrategy[Any], wrong: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """`valid` 19 times in 20, so that many documents are accepted and each mistake is met alone."""
    return st.sampled_from([False] * 19 + [True]).flatmap(lambda is_wrong: wrong if is_wrong else valid)


def text_of(regex: str) -> st.SearchStrategy[str]:
    return st.from_regex(rf"\A(?:{regex})\Z")


SECONDS = st.one_of(st.integers(1, 86_400), st.floats(0.001, 86_400))
DURATIONS = mostly(st.one_of(SECONDS, text_of(r"0?[0-9]{1,8}(ms|s|m|h)")),
                   st.one_of(st.sampled_from([0, 0.0001, 86_401, True, "10", "1d", " 10s", "10 s", "-1s", "1.5s"]),
                             st.text(max_size=6)))
NAMES = mostly(st.one_of(st.none(), text_of(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")),
               st.one_of(st.sampled_from(["A", "a_b", "-a", "a-", "", "a" * 64, 5]), st.text(max_size=4)))
PORT_NAMES = mostly(st.one_of(st.integers(1, 65_535), text_of(r"[a-z0-9-]{1,15}")),
                    st.sampled_from([0, 70_000, "a" * 16, "a--b", "-a", "123", "A", 1.5]))
IPS = mostly(st.ip_addresses().map(str), st.sampled_from(["localhost", "::1%lo", "01.2.3.4", "1.2.3", "", 1]))
HEALTH = mostly(st.tuples(st.ip_addresses().map(str), st.integers(1, 65_535)).map(
                    lambda pair: f"[{pair[0]}]:{pair[1]}" if ":" in pair[0] else f"{pair[0]}:{pair[1]}"),
                st.one_of(st.sampled_from(["127.0.0.1", "127.0.0.1:0", "127.0.0.1:70000", "localhost:80", ":80",
                                           "127.0.0.1:٣", "[127.0.0.1]:80", "[::1:80", "::1]:80", "::1:80"]),
                          st.text(max_size=8)))
LABEL = mostly(st.one_of(text_of(r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"), st.integers(0, 9),
                         st.booleans(), st.just("")),
               st.sampled_from(["-a", "a/b", "x" * 64, -1, 1e20, None]))
LABEL_KEYS = mostly(st.sampled_from(["app", "k8s.io/name", "a.b-c/x_y.z", "X"]),
                    st.sampled_from(["-x", "a/b/c", "/a", "A.b/c", ""]))
SELECTORS = st.one_of(
    mostly(st.sampled_from(["app=agent", "a!=b,c", "tier in (x,y)", "!x"]),
           st.sampled_from(["", " ", "app in (a", "a==", "a,"])),
    st.fixed_dictionaries({"matchLabels": mostly(st.dictionaries(LABEL_KEYS, LABEL, min_size=1, max_size=2),
                                                 st.one_of(st.none(), st.just({}), st.just([])))}),
    st.fixed_dictionaries({"matchExpressions": st.lists(st.one_of(
        st.fixed_dictionaries({"key": LABEL_KEYS, "operator": mostly(st.sampled_from(["In", "NotIn"]),
                                                                    st.just("in")),
                               "values": mostly(st.lists(LABEL, min_size=1, max_size=2), st.none())}),
        st.fixed_dictionaries({"key": LABEL_KEYS, "operator": st.sampled_from(["Exists", "DoesNotExist"])},
                              optional={"values": mostly(st.one_of(st.none(), st.just([])), st.lists(LABEL))})),
        min_size=1, max_size=2)}),
)


def documents(selectors: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    """Config documents with a mistake here and there, selectors drawn from `selectors`."""
    routes = st.fixed_dictionaries(
        {"port": mostly(st.one_of(st.integers(1, 65_535), st.integers(1, 65_535).map(float)),
                        st.sampled_from([0, 70_000, -1, "8125", True, 8125.5])),
         "protocol": mostly(st.sampled_from(["udp", "tcp", "UDP", "TCP"]), st.sampled_from(["Udp", "tpc", 1, None])),
         "selector": selectors},
        optional={"name": NAMES, "namespace": NAMES, "targetPort": PORT_NAMES,
                  "whenNoLocalPod": mostly(st.sampled_from(["reject", "anyNode"]), st.just("any")),
                  "balance": mostly(st.sampled_from(["round_robin", "least_conn", "hash"]), st.just("random")),
                  "udpResponses": mostly(st.integers(0, 3), st.sampled_from([-1, 1.5, "1"])), "timeout": DURATIONS},
    )
    unknown_key = mostly(st.just({}), st.just({"colour": "blue"}))
    routes = st.tuples(routes, unknown_key).map(lambda pair: {**pair[0], **pair[1]})
    return st.fixed_dictionaries(
        {"routes": mostly(st.lists(routes, min_size=1, max_size=2), st.just([]))},
        optional={"listenAddress": IPS,
                  "logLevel": mostly(st.sampled_from(["debug", "info", "warning", "error"]), st.just("warn")),
                  "health": HEALTH, "watchTimeout": DURATIONS},
    )


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents(SELECTORS))
def test_what_the_loader_accepts_the_schema_accepts(document: dict[str, Any]) -> None:
    assume(loads(document))
    assert schema_accepts(document), (document, [e.message for e in VALIDATOR.iter_errors(document)])


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents(st.sampled_from(VALID_SELECTORS)))
def test_what_the_loader_rejects_the_schema_rejects(document: dict[str, Any]) -> None:
    """The first test's other side, on the loader's own edge cases (selectors fixed to valid ones)."""
    assume(not loads(document) and _unique_routes_if_well_formed(document))
    assert not schema_accepts(document), document


def _unique_routes_if_well_formed(document: dict[str, Any]) -> bool:
    try:
        return _unique_routes(document)
    except (KeyError, AttributeError, TypeError):
        return True


@pytest.mark.parametrize(("document", "accepted"), [
    ({"routes": [{"port": 53, "protocol": "UDP", "selector": "a=b"}]}, True),
    ({"routes": [{"port": 53, "protocol": "udp", "selector": "a=b", "timeout": 10}]}, True),
    ({"routes": [{"port": 53, "protocol": "udp", "selector": "a=b", "timeout": 0.5}], "watchTimeout": "5m"}, True),
    ({"routes": [{"port": 53, "protocol": "udp", "selector": "a=b", "timeout": 0}]}, False),
    ({"routes": [{"port": 53, "protocol": "Udp", "selector": "a=b"}]}, False),
    ({"routes": [{"port": 53, "protocol": "udp", "selector": "a=b", "timeout": "86401s"}]}, False),
])
def test_the_documents_the_issue_named(document: dict[str, Any], accepted: bool) -> None:
    """Bare-number durations and Kubernetes' `UDP`: both sides say yes (or both no)."""
    assert (loads(document), schema_accepts(document)) == (accepted, accepted)
