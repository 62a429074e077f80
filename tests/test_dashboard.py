"""examples/grafana-dashboard.json: what Grafana needs to import it, PromQL that Prometheus
parses (promtool), and only metric and label names that a real `proxyctl run` shows on /metrics."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families
from ruamel.yaml import YAML

from tests.kubeapi import KubeApiServer
from tests.promtool import run_promtool
from tests.support import free_port, wait_for

DASHBOARD_FILE = Path(__file__).resolve().parent.parent / "examples" / "grafana-dashboard.json"
# Labels Prometheus adds to every sample it scrapes through examples/podmonitor.yaml.
TARGET_LABELS = {"namespace", "pod", "container", "endpoint", "job", "instance"}
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# What Grafana puts in place of its variables before Prometheus sees an expression: the route
# variable's "All" value, and a range for $__rate_interval (four scrape intervals at least).
GRAFANA_VARIABLES = {"$__rate_interval": "2m", "$route": ".*"}
SELECTOR = re.compile(r"\b(proxyctl_\w+)(?:\{([^}]*)\})?")
MATCHER = re.compile(r"(\w+)\s*(?:=~|!~|!=|=)")
BY = re.compile(r"\bby\s*\(([^)]*)\)")
LEGEND_LABEL = re.compile(r"\{\{\s*(\w+)\s*\}\}")
LABEL_VALUES = re.compile(r"^label_values\((\w+),\s*(\w+)\)$")

Dashboard = dict[str, Any]


def dashboard() -> Dashboard:
    return json.loads(DASHBOARD_FILE.read_text(encoding="utf-8"))


def graphs(board: Dashboard) -> list[dict[str, Any]]:
    """The panels that query Prometheus (rows only group them)."""
    return [panel for panel in board["panels"] if panel["type"] != "row"]


def targets(board: Dashboard) -> Iterator[tuple[str, dict[str, Any]]]:
    for panel in graphs(board):
        for target in panel["targets"]:
            yield f"panel {panel['id']} ({panel['title']}) {target['refId']}", target


def as_prometheus_sees_it(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    return expr


def _overlap(a: dict[str, int], b: dict[str, int]) -> bool:
    return a["x"] < b["x"] + b["w"] and b["x"] < a["x"] + a["w"] and a["y"] < b["y"] + b["h"] and b["y"] < a["y"] + a["h"]


def dashboard_errors(board: Dashboard) -> list[str]:
    """What would keep Grafana from importing the dashboard as meant: the fields it requires, a
    24-column grid without overlaps, unique panel ids, and every query on the chosen data source."""
    errors = [f"{key}: missing" for key in ("title", "uid", "schemaVersion", "panels", "templating") if key not in board]
    if errors:
        return errors
    if not isinstance(board["schemaVersion"], int) or board["schemaVersion"] < 36:
        errors.append(f"schemaVersion {board['schemaVersion']!r}: Grafana 9 or later has 36 or more")
    variables = {v["name"]: v for v in board["templating"]["list"]}
    if (variables.get("datasource") or {}).get("type") != "datasource" or variables["datasource"]["query"] != "prometheus":
        errors.append("templating: no variable `datasource` choosing a Prometheus data source")
    if (variables.get("route") or {}).get("datasource") != DATASOURCE:
        errors.append("templating: no variable `route` queried from ${datasource}")
    ids = [panel.get("id") for panel in board["panels"]]
    errors += [f"panel id {i!r} used {ids.count(i)} times" for i in sorted(set(ids), key=str) if ids.count(i) > 1]
    for panel in board["panels"]:
        where = f"panel {panel.get('id')} ({panel.get('title')})"
        grid = panel.get("gridPos", {})
        if sorted(grid) != ["h", "w", "x", "y"] or not all(isinstance(v, int) and v >= 0 for v in grid.values()):
            errors.append(f"{where}: gridPos needs h, w, x, y as integers >= 0, not {grid}")
            continue
        if grid["x"] + grid["w"] > 24 or grid["w"] == 0 or grid["h"] == 0:
            errors.append(f"{where}: gridPos {grid} is not within Grafana's 24 columns")
        if panel.get("type") == "row":
            continue
        if panel.get("datasource") != DATASOURCE:
            errors.append(f"{where}: datasource {panel.get('datasource')}, not {DATASOURCE}")
        if not panel.get("targets"):
            errors.append(f"{where}: no targets")
        refs = [t.get("refId") for t in panel.get("targets", [])]
        if len(set(refs)) != len(refs) or None in refs:
            errors.append(f"{where}: refIds {refs} not unique")
        errors += [f"{where} {t.get('refId')}: no expr or another datasource" for t in panel.get("targets", [])
                   if not t.get("expr") or t.get("datasource") != DATASOURCE]
    placed = [p for p in board["panels"] if sorted(p.get("gridPos", {})) == ["h", "w", "x", "y"]]
    errors += [f"panels {a['id']} and {b['id']} overlap: {a['gridPos']}, {b['gridPos']}"
               for i, a in enumerate(placed) for b in placed[i + 1:] if _overlap(a["gridPos"], b["gridPos"])]
    return errors


def promql_errors(expressions: dict[str, str], directory: Path) -> str:
    """promtool's complaints about the expressions, each checked as a recording rule's: it parses
    them as Prometheus does. Empty when it has none."""
    rules = [{"record": f"dashboard:expression_{i}", "expr": expr} for i, expr in enumerate(expressions.values())]
    path = directory / "dashboard-rules.yaml"
    with path.open("w", encoding="utf-8") as file:
        YAML().dump({"groups": [{"name": "dashboard", "rules": rules}]}, file)
    result = run_promtool("check", "rules", str(path))
    if result.returncode == 0:
        return ""
    names = {f"dashboard:expression_{i}": where for i, where in enumerate(expressions)}
    return re.sub(r"dashboard:expression_\d+", lambda m: names[m.group(0)], result.stdout + result.stderr)


# --- Grafana -------------------------------------------------------------------------------------------


def test_dashboard_has_what_grafana_needs_to_import_it() -> None:
    board = dashboard()
    assert dashboard_errors(board) == []
    assert len(graphs(board)) >= 8


def _overlapping(board: Dashboard) -> None:
    graphs(board)[1]["gridPos"]["x"] -= 4


def _duplicate_id(board: Dashboard) -> None:
    graphs(board)[1]["id"] = graphs(board)[0]["id"]


def _fixed_datasource(board: Dashboard) -> None:
    graphs(board)[0]["targets"][0]["datasource"] = {"type": "prometheus", "uid": "P1809F7CD0C75ACF3"}


def _too_wide(board: Dashboard) -> None:
    graphs(board)[-1]["gridPos"]["x"] += 1  # the last panel spans the grid


@pytest.mark.parametrize(("breakage", "complaint"), [
    (_overlapping, "overlap"), (_duplicate_id, "used 2 times"), (_fixed_datasource, "no expr or another datasource"),
    (_too_wide, "not within Grafana's 24 columns"),
], ids=["overlapping", "duplicate-id", "fixed-datasource", "too-wide"])
def test_dashboard_check_finds_a_broken_copy(breakage: Callable[[Dashboard], None], complaint: str) -> None:
    board = copy.deepcopy(dashboard())
    breakage(board)
    errors = dashboard_errors(board)
    assert errors and all(complaint in e for e in errors), errors


# --- PromQL ---------------------------------------------------------------------------------------------


def test_every_expression_parses_as_promql(tmp_path: Path) -> None:
    expressions = {where: as_prometheus_sees_it(t["expr"]) for where, t in targets(dashboard())}
    assert promql_errors(expressions, tmp_path) == ""


def test_promql_check_finds_a_broken_expression(tmp_path: Path) -> None:
    expressions = {where: as_prometheus_sees_it(t["expr"]) for where, t in targets(dashboard())}
    where = next(iter(expressions))
    expressions[where] = expressions[where].replace(")", "", 1)
    assert where in promql_errors(expressions, tmp_path)


# --- against a real proxyctl -------------------------------------------------------------------------------


def exposed_labels(kube_api: KubeApiServer, proxyctl, udp_sinks, tcp_echoes) -> dict[str, set[str]]:
    """Sample names on /metrics of a `proxyctl run` with a UDP, a TCP and an anyNode route on its
    fallback, after a reload, and the label names each has."""
    port, far_port = free_port(), free_port()
    udp_sinks("127.0.0.2", port)
    tcp_echoes("127.0.0.2", port)
    udp_sinks("127.0.0.4", far_port)
    kube_api.add_pod("agent", "monitoring", {"app": "agent"}, node="node-a", ip="127.0.0.2")
    kube_api.add_pod("far", "monitoring", {"app": "far"}, node="node-b", ip="127.0.0.4")
    sidecar = proxyctl(
        f"routes:\n  - {{name: statsd, port: {port}, protocol: udp, selector: app=agent, namespace: monitoring}}\n"
        f"  - {{name: forward, port: {port}, protocol: tcp, selector: app=agent, namespace: monitoring}}\n"
        f"  - {{name: traces, port: {far_port}, protocol: udp, selector: app=far, namespace: monitoring,"
        f" whenNoLocalPod: anyNode}}\n")
    kube_api.add_pod("agent-2", "monitoring", {"app": "agent"}, node="node-a", ip="127.0.0.3")
    wait_for(lambda: sidecar.metric("proxyctl_last_reload_duration_seconds") is not None, 5, what="a reload")
    exposed: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(sidecar.get("/metrics")[1]):
        for sample in family.samples:
            exposed.setdefault(sample.name, set()).update(sample.labels)
    return exposed


def metric_errors(board: Dashboard, exposed: dict[str, set[str]]) -> list[str]:
    """Metric and label names the dashboard uses that are not in `exposed` (sample name: label
    names), and legends naming labels that the query aggregates away."""
    labels = {name: keys | TARGET_LABELS for name, keys in exposed.items()}
    errors = []
    for where, target in targets(board):
        expr = target["expr"]
        selectors = SELECTOR.findall(expr)
        if not selectors:
            errors.append(f"{where}: no proxyctl metric in {expr}")
        for name, matchers in selectors:
            if name not in labels:
                errors.append(f"{where}: {name} is not on /metrics")
                continue
            unknown = set(MATCHER.findall(matchers)) - labels[name]
            if unknown:
                errors.append(f"{where}: {name} has no label {', '.join(sorted(unknown))}")
            if "route" in labels[name] and 'route=~"$route"' not in matchers:
                errors.append(f"{where}: {name} does not follow the route variable")
        available = set().union(TARGET_LABELS, *(labels.get(name, set()) for name, _ in selectors))
        grouped = {label.strip() for clause in BY.findall(expr) for label in clause.split(",") if label.strip()}
        if grouped - available:
            errors.append(f"{where}: by ({', '.join(sorted(grouped - available))}) is no label of {expr}")
        legend = set(LEGEND_LABEL.findall(target.get("legendFormat", "")))
        if legend - grouped:
            errors.append(f"{where}: the legend's {', '.join(sorted(legend - grouped))} is aggregated away")
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            match = LABEL_VALUES.match(variable["query"]["query"])
            if not match or match.group(2) not in labels.get(match.group(1), set()):
                errors.append(f"variable {variable['name']}: {variable['query']['query']}")
    return errors


def test_every_metric_and_label_is_on_the_metrics_of_a_real_proxyctl(
        kube_api: KubeApiServer, proxyctl, udp_sinks, tcp_echoes) -> None:
    exposed = exposed_labels(kube_api, proxyctl, udp_sinks, tcp_echoes)
    board = dashboard()
    assert metric_errors(board, exposed) == []

    misspelt = copy.deepcopy(board)  # the check can fail
    panel = graphs(misspelt)[0]
    target = panel["targets"][0]
    target["expr"] = target["expr"].replace("proxyctl_route_", "proxyctl_routes_", 1).replace("by (route)", "by (reason)")
    (name,) = {n for n, _ in SELECTOR.findall(target["expr"]) if n.startswith("proxyctl_routes_")}
    where = f"panel {panel['id']} ({panel['title']}) A"
    assert metric_errors(misspelt, exposed) == [f"{where}: {name} is not on /metrics",
                                                f"{where}: by (reason) is no label of {target['expr']}",
                                                f"{where}: the legend's route is aggregated away"]
