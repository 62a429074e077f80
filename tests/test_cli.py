"""The command line as a new user meets it: ordinary mistakes get one line saying what is missing."""

from __future__ import annotations

import glob
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
ENV_ROUTE = {"PORT": "8125", "SELECTOR": "app=agent"}


def proxyctl(*args: str | Path, env: dict[str, str] | None = None, home: Path | None = None,
             path: str | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m proxyctl ARGS` outside any cluster: no in-cluster variables, no kubeconfig."""
    environ = {"PATH": path if path is not None else os.environ["PATH"], "HOME": str(home or "/nonexistent"),
               **(env or {})}
    return subprocess.run([sys.executable, "-m", "proxyctl", *map(str, args)], capture_output=True, text=True,
                          env=environ, cwd=ROOT, timeout=60)


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """The single line a failed command prints; no traceback."""
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr, result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
    return result.stderr


# --- run and render outside a cluster -------------------------------------------------------------


@pytest.mark.parametrize("node", ["", "node-a"], ids=["without NODE_NAME", "with NODE_NAME"])
def test_run_outside_a_cluster_says_to_run_in_a_pod_or_set_kubeconfig(tmp_path: Path, node: str) -> None:
    result = proxyctl("run", "--state-dir", tmp_path / "state", env={**ENV_ROUTE, "NODE_NAME": node}, home=tmp_path)
    line = one_line_error(result)
    assert "run in a pod, or set KUBECONFIG" in line
    assert f"no kubeconfig at {tmp_path}/.kube/config" in line


def test_a_kubeconfig_that_does_not_exist_is_named(tmp_path: Path) -> None:
    result = proxyctl("run", "--state-dir", tmp_path / "state",
                      env={**ENV_ROUTE, "NODE_NAME": "node-a", "KUBECONFIG": str(tmp_path / "kube.yaml")})
    assert f"no kubeconfig at {tmp_path / 'kube.yaml'}" in one_line_error(result)


def test_in_a_pod_without_a_service_account_token_it_says_so(tmp_path: Path) -> None:
    result = proxyctl("run", "--state-dir", tmp_path / "state",
                      env={**ENV_ROUTE, "NODE_NAME": "node-a", "KUBERNETES_SERVICE_HOST": "127.0.0.1",
                           "KUBERNETES_SERVICE_PORT": "1"})
    line = one_line_error(result)
    assert "in-cluster config" in line and "token" in line.lower()


def test_run_with_a_kubeconfig_but_no_node_says_to_set_node_name(tmp_path: Path) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text('{"apiVersion": "v1", "kind": "Config", "current-context": "c", '
                          '"clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:1"}}], '
                          '"users": [{"name": "u", "user": {"token": "t"}}], '
                          '"contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}]}')
    result = proxyctl("run", "--state-dir", tmp_path / "state", env={**ENV_ROUTE, "KUBECONFIG": str(kubeconfig)})
    assert "set NODE_NAME" in one_line_error(result)


def test_render_without_endpoints_outside_a_cluster_says_to_pass_them(tmp_path: Path) -> None:
    line = one_line_error(proxyctl("render", "--config", EXAMPLES / "proxyctl.yaml", home=tmp_path))
    assert "set KUBECONFIG" in line and "pass --endpoints FILE" in line


def test_render_with_endpoints_needs_no_cluster() -> None:
    result = proxyctl("render", "--config", EXAMPLES / "proxyctl.yaml", "--endpoints", EXAMPLES / "endpoints.yaml")
    assert result.returncode == 0, result.stderr
    assert "server 10.0.0.5:8125" in result.stdout


# --- ordinary mistakes at start-up ---------------------------------------------------------------------


def test_an_endpoints_file_that_is_missing_or_wrong_is_one_line(tmp_path: Path) -> None:
    missing = one_line_error(proxyctl("render", "--config", EXAMPLES / "proxyctl.yaml", "--endpoints", tmp_path / "no"))
    assert missing.endswith(f"--endpoints {tmp_path / 'no'}: cannot read: No such file or directory\n")
    (tmp_path / "bad.yaml").write_text("dogstatsd: [10.0.0.5]\n")
    wrong = one_line_error(proxyctl("render", "--config", EXAMPLES / "proxyctl.yaml",
                                    "--endpoints", tmp_path / "bad.yaml"))
    assert "must be IP:PORT" in wrong
    (tmp_path / "broken.yaml").write_text("dogstatsd: [\n")
    assert "not YAML" in one_line_error(proxyctl("render", "--config", EXAMPLES / "proxyctl.yaml",
                                                 "--endpoints", tmp_path / "broken.yaml"))


def test_a_directory_given_as_the_config_file_is_one_line() -> None:
    line = one_line_error(proxyctl("render", "--config", EXAMPLES, "--endpoints", EXAMPLES / "endpoints.yaml"))
    assert str(EXAMPLES) in line


def test_a_missing_config_file_says_there_is_nothing_to_route(tmp_path: Path) -> None:
    result = proxyctl("render", "--config", tmp_path / "proxyctl.yaml", "--endpoints", EXAMPLES / "endpoints.yaml")
    assert "nothing to route" in one_line_error(result)


@pytest.mark.parametrize("command", ["run", "render"])
def test_nginx_not_on_path_says_what_to_install(tmp_path: Path, command: str) -> None:
    extra = ["--endpoints", EXAMPLES / "endpoints.yaml"] if command == "render" else []
    result = proxyctl(command, "--config", EXAMPLES / "proxyctl.yaml", "--state-dir", tmp_path, *extra,
                      path=str(tmp_path))
    assert "install nginx and libnginx-mod-stream" in one_line_error(result)


@pytest.mark.parametrize("command", ["run", "render"])
def test_a_template_that_is_missing_or_broken_is_one_line(tmp_path: Path, command: str) -> None:
    (tmp_path / "broken.j2").write_text("stream {\n{% if %}\n}\n")
    (tmp_path / "unknown.j2").write_text("{{ no_such_variable }}\n")
    cases = [("missing.j2", "No such file or directory"), ("broken.j2", "broken.j2:2: ")]
    extra: list[str | Path] = ["--state-dir", tmp_path / "state"]
    if command == "render":  # a variable the template needs is found only when rendering
        cases.append(("unknown.j2", "no_such_variable"))
        extra += ["--endpoints", EXAMPLES / "endpoints.yaml"]
    for template, says in cases:
        result = proxyctl(command, "--config", EXAMPLES / "proxyctl.yaml", "--template", tmp_path / template, *extra)
        line = one_line_error(result)
        assert f"--template {tmp_path / template}" in line and says in line, line


def test_a_state_dir_that_cannot_be_written_is_named(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    result = proxyctl("run", "--state-dir", tmp_path / "file" / "state", env={**ENV_ROUTE, "NODE_NAME": "node-a"})
    line = one_line_error(result)
    assert f"state dir {tmp_path / 'file' / 'state'} is not writable" in line and "--state-dir" in line


# --- validate ---------------------------------------------------------------------------------------------

HELM_VALUES = """\
replicaCount: 2
image: {repository: nginx, tag: "1.25"}
service: {type: ClusterIP, port: 80}
logLevel: info
"""

CONFIGMAP = """\
apiVersion: v1
kind: ConfigMap
metadata: {{name: proxyctl}}
data:
  {key}: |
    routes:
      - {{port: 8125, protocol: udp, selector: app=agent}}
"""


def test_the_projects_own_examples_pass_as_the_readme_runs_them() -> None:
    result = proxyctl("validate", *sorted(glob.glob(str(EXAMPLES / "*.yaml"))))
    assert result.returncode == 0, result.stderr
    assert f"{EXAMPLES / 'endpoints.yaml'}: skipped, not a proxyctl config or a manifest holding one" in result.stdout
    assert f"{EXAMPLES / 'configmap.yaml'}: ok" in result.stdout


def test_a_directory_is_searched_recursively_and_what_is_not_ours_is_skipped(tmp_path: Path) -> None:
    (tmp_path / "k8s" / "chart" / "templates").mkdir(parents=True)
    (tmp_path / "k8s" / "chart" / "values.yaml").write_text(HELM_VALUES)
    (tmp_path / "k8s" / "chart" / "templates" / "deploy.yaml").write_text("{{- if .Values.enabled }}\nkind: x\n")
    (tmp_path / "k8s" / "sidecar.yml").write_text(CONFIGMAP.format(key="proxyctl.yaml"))
    (tmp_path / "k8s" / "notes.txt").write_text("not YAML, not looked at")
    result = proxyctl("validate", tmp_path / "k8s")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"{tmp_path}/k8s/chart/templates/deploy.yaml: skipped, not a proxyctl config or a manifest holding one",
        f"{tmp_path}/k8s/chart/values.yaml: skipped, not a proxyctl config or a manifest holding one",
        f"{tmp_path}/k8s/sidecar.yml: ok",
    ]


def test_a_mistake_in_a_directory_fails_it(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "config.yaml").write_text("routes:\n  - {port: 8125, protocol: tpc, selector: a=b}\n")
    (tmp_path / "values.yaml").write_text(HELM_VALUES)
    result = proxyctl("validate", tmp_path)
    assert result.returncode == 1
    assert result.stderr == f"{tmp_path}/a/config.yaml:2:28: routes[0].protocol: must be 'udp' or 'tcp', got 'tpc'\n"


def test_a_config_file_with_a_misspelt_routes_key_is_not_skipped(tmp_path: Path) -> None:
    (tmp_path / "sidecar.yaml").write_text("route:\n  - {port: 8125, protocol: udp, selector: a=b}\n")
    result = proxyctl("validate", tmp_path / "sidecar.yaml")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"{tmp_path / 'sidecar.yaml'}:1:1: route: unknown key" in result.stderr.splitlines()


@pytest.mark.parametrize("key", ["proxctl.yaml", "Proxyctl.yaml", "proxyctl.yml", "proxy-ctl.yaml"])
def test_a_configmap_key_that_is_a_near_miss_is_an_error_at_the_key(tmp_path: Path, key: str) -> None:
    (tmp_path / "cm.yaml").write_text(CONFIGMAP.format(key=key))
    line = one_line_error(proxyctl("validate", tmp_path / "cm.yaml"))
    assert line == (f"{tmp_path / 'cm.yaml'}:5:3: data.{key}: the config must be under the key 'proxyctl.yaml', "
                    f"not {key!r}\n")


@pytest.mark.parametrize("key", ["proxy.yaml", "proxysql.yaml", "config.yaml"])
def test_other_configmaps_are_skipped(tmp_path: Path, key: str) -> None:
    (tmp_path / "cm.yaml").write_text(CONFIGMAP.format(key=key))
    result = proxyctl("validate", tmp_path / "cm.yaml")
    assert (result.returncode, result.stdout) == (0, f"{tmp_path / 'cm.yaml'}: skipped, not a proxyctl config "
                                                     "or a manifest holding one\n")


def test_a_directory_without_yaml_is_an_error_not_a_pass(tmp_path: Path) -> None:
    (tmp_path / "README.md").write_text("no YAML here")
    assert one_line_error(proxyctl("validate", tmp_path)).endswith(f"{tmp_path}: no *.yaml or *.yml file in it\n")


def test_a_path_that_does_not_exist_fails_without_a_traceback(tmp_path: Path) -> None:
    line = one_line_error(proxyctl("validate", tmp_path / "nope.yaml"))
    assert line == f"{tmp_path / 'nope.yaml'}: cannot read: No such file or directory\n"


# --- --version and --help -------------------------------------------------------------------------------------


def test_version_is_the_installed_distributions() -> None:
    result = proxyctl("--version")
    assert (result.returncode, result.stdout) == (0, f"proxyctl {metadata.version('proxyctl-sidecar')}\n")


def test_help_shows_the_defaults_and_names_no_file_outside_the_repository() -> None:
    text = " ".join(" ".join(proxyctl(*command, "--help").stdout.split())
                    for command in (["run"], ["render"], ["validate"], []))
    assert "(default: /var/run/proxyctl)" in text and "(default: /etc/proxyctl/proxyctl.yaml)" in text
    assert "(default: nginx)" in text
    assert "DESIGN" not in text and "None" not in text
