"""The config file: what users write, and the located errors they get back."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from proxyctl.cli import main, schema
from proxyctl.config import ConfigError, check_file, load_config, read_config, route_from_env
from proxyctl.render import render
from proxyctl.selector import SelectorError, parse_selector, selector_from_mapping

ROOT = Path(__file__).resolve().parent.parent

THREE_MISTAKES = """\
routes:
  - name: dogstatsd
    port: 8125
    protocol: udp
    selector: app=dd-agent
  - port: 24224
    protocol: tpc
    selector: app=fluentd
  - port: 70000
    protocol: tcp
    selector: "app in (a"
"""


def _examples() -> list[Path]:
    """Every config file or ConfigMap manifest under examples/."""
    return [p for p in sorted((ROOT / "examples").rglob("*.yaml"))
            if "routes:" in p.read_text() or "kind: ConfigMap" in p.read_text()]


@pytest.mark.parametrize("path", _examples(), ids=lambda p: p.name)
def test_every_example_config_validates(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(path)]) == 0


def test_three_mistakes_give_three_located_errors(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(THREE_MISTAKES)
    result = subprocess.run([sys.executable, "-m", "proxyctl", "validate", str(path)], capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"{path}:7:15: routes[1].protocol: must be 'udp' or 'tcp', got 'tpc'",
        f"{path}:9:11: routes[2].port: input should be less than or equal to 65535, got 70000",
        f"{path}:11:15: routes[2].selector: selector 'app in (a': unexpected end",
    ]


def test_errors_inside_a_configmap_point_into_the_manifest(tmp_path: Path) -> None:
    manifest = (ROOT / "examples" / "configmap.yaml").read_text().replace("protocol: tcp", "protocol: tpc", 1)
    path = tmp_path / "cm.yaml"
    path.write_text(manifest)
    lines = manifest.splitlines()
    line = next(i for i, text in enumerate(lines, 1) if "protocol: tpc" in text)
    column = lines[line - 1].index("tpc") + 1
    assert main(["validate", str(path)]) == 1
    assert [str(p) for p in check_file(manifest, "cm.yaml")] == [
        f"cm.yaml:{line}:{column}: routes[1].protocol: must be 'udp' or 'tcp', got 'tpc'"
    ]


def test_unknown_keys_duplicates_and_yaml_syntax_are_located() -> None:
    text = "routes:\n  - {port: 53, protocol: udp, selector: a=b, colour: blue}\n  - {port: 53, protocol: udp, selector: c=d}\n"
    with pytest.raises(ConfigError) as caught:
        load_config(text, "c.yaml")
    assert [str(p) for p in caught.value.problems] == ["c.yaml:2:46: routes[0].colour: unknown key"]
    with pytest.raises(ConfigError) as caught:
        load_config(text.replace(", colour: blue", ""), "c.yaml")
    assert [str(p) for p in caught.value.problems] == ["c.yaml:3:12: routes[1].port: port 53/udp is already used by routes[0]"]
    with pytest.raises(ConfigError) as caught:
        load_config("routes: [\n", "c.yaml")
    assert str(caught.value).startswith("c.yaml:2:1: invalid YAML")
    with pytest.raises(ConfigError) as caught:
        load_config("routes:\n  - port: 53\n    ? {a: {b: c}}\n    : d\n", "c.yaml")
    assert str(caught.value) == "c.yaml:3:7: invalid YAML: a key may not be a mapping or a list"
    with pytest.raises(ConfigError) as caught:
        load_config("routes:\n  - port: 53\n    [[a]]: d\n", "c.yaml")
    assert str(caught.value) == "c.yaml:3:5: invalid YAML: a key may not be a mapping or a list"


@pytest.mark.parametrize(
    "text, canonical",
    [
        ("app=dd-agent", "app=dd-agent"),
        ("app==x, tier!=db", "app=x,tier!=db"),
        ("env in (prod, staging),!canary,team", "!canary,env in (prod,staging),team"),
        ("example.com/role notin (query)", "example.com/role notin (query)"),
        ("app=", "app="),
    ],
)
def test_selector_string_form(text: str, canonical: str) -> None:
    assert str(parse_selector(text)) == canonical


@pytest.mark.parametrize("text", ["", "app=dd agent", "app in ()", "a=b,", "-bad=x", "app=x;y", "app in (a", "a=b}"])
def test_selector_string_errors(text: str) -> None:
    with pytest.raises(SelectorError):
        parse_selector(text)


def test_selector_mapping_form_matches_the_string_form() -> None:
    mapping = selector_from_mapping(
        {"matchLabels": {"app": "x"}, "matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["db"]}]}
    )
    assert mapping == parse_selector("tier notin (db),app=x")
    assert mapping.matches({"app": "x"}) and not mapping.matches({"app": "x", "tier": "db"})
    with pytest.raises(SelectorError):
        selector_from_mapping({"matchExpressions": [{"key": "a", "operator": "Exists", "values": ["x"]}]})


def test_env_shorthand_of_the_original_pod_renders_like_the_file(tmp_path: Path) -> None:
    env = {"PORT": "8125", "SELECTOR": "app=dd-agent", "PROTOCOL": "udp", "NAMESPACE": "kube-system"}
    from_env = read_config(None, env)
    from_file = load_config("routes:\n  - {port: 8125, protocol: udp, selector: app=dd-agent, namespace: kube-system, targetPort: 8125}\n")
    endpoints = {"udp-8125": []}
    assert render(from_env, endpoints, tmp_path) == render(from_file, endpoints, tmp_path)


def test_env_route_is_added_to_the_file_and_a_clash_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "proxyctl.yaml"
    path.write_text("routes:\n  - {port: 24224, protocol: tcp, selector: app=fluentd}\n")
    config = read_config(path, {"PORT": "8125", "SELECTOR": "app=dd-agent", "LOG_LEVEL": "warn"})
    assert [(r.key, r.port) for r in config.routes] == [("tcp-24224", 24224), ("udp-8125", 8125)]
    assert config.log_level == "warning"
    with pytest.raises(ConfigError) as caught:
        read_config(path, {"PORT": "24224", "SELECTOR": "app=x", "PROTOCOL": "tcp"})
    assert str(caught.value) == "environment: PORT/SOURCE_PORT: port 24224/tcp is already used by routes[0]"
    assert route_from_env({}) is None


def test_hostile_values_are_rejected_before_they_reach_nginx() -> None:
    for field, value in [("name", "x;}"), ("namespace", "a\nb"), ("selector", "app=$x"), ("targetPort", "p'q")]:
        route = {"port": 1000, "protocol": "tcp", "selector": "app=x", field: value}
        with pytest.raises(ConfigError):
            load_config(json.dumps({"routes": [route]}))


def test_committed_schema_matches_the_models() -> None:
    committed = json.loads((ROOT / "schema" / "proxyctl.schema.json").read_text())
    assert committed == schema(), "schema/ drifted: run `proxyctl schema > schema/proxyctl.schema.json`"


@pytest.mark.parametrize("value, kind", [("true", "a boolean"), ("1.10", "a number"), ("010", "a number"),
                                         ("", "null"), ("[a]", "list or mapping")])
def test_label_values_that_yaml_reads_as_other_than_text_are_located_errors(value: str, kind: str) -> None:
    """Kubernetes rejects them; coerced to 'True' or '1.1' they would match no pod."""
    for selector, where in [(f"{{matchLabels: {{version: {value}}}}}", "matchLabels.version"),
                            (f"{{matchExpressions: [{{key: version, operator: In, values: [{value or '~'}]}}]}}",
                             "matchExpressions[0].values")]:
        with pytest.raises(ConfigError) as caught:
            load_config(f"routes:\n  - port: 8125\n    protocol: udp\n    selector: {selector}\n", "c.yaml")
        [problem] = caught.value.problems
        assert str(problem).startswith(f"c.yaml:4:15: routes[0].selector: {where}: must be a string"), problem
        assert kind in problem.message, problem
    if kind != "list or mapping":  # quoted, it is the text it looks like
        quoted = load_config(f"routes: [{{port: 8125, protocol: udp, selector: {{matchLabels: {{v: '{value}'}}}}}}]")
        assert quoted.routes[0].selector.requirements[0].values == (value,)
