"""Arbitrary bytes in the config file and arbitrary values in the environment shorthand, by the
paths users take: a file on disk read by `read_config`, `proxyctl validate` and a running
`proxyctl run` that serves traffic meanwhile, and variables `proxyctl run` starts with.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from proxyctl.config import ENV_SOURCE, Config, ConfigError, Problem, check_file, read_config, read_text
from tests.harness import Proxyctl
from tests.kubeapi import KubeApiServer
from tests.support import free_port, wait_for
from tests.test_bad_input import configs, dump, yaml_texts
from tests.test_config_file import BOMB

NS = "kube-system"
AGENT = {"app": "agent"}
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
RUNNING = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def splice(text: str, data: bytes, at: int) -> bytes:
    """`text` with `data` inserted somewhere: a config broken by a byte or two."""
    raw = text.encode()
    at %= len(raw) + 1
    return raw[:at] + data + raw[at:]


file_bytes = (st.binary(max_size=200) | yaml_texts.map(str.encode)
              | st.builds(splice, configs.map(dump), st.binary(min_size=1, max_size=3), st.integers(0, 1000)))

CRASHED = [  # each of these once stopped proxyctl with an exception other than ConfigError
    b"routes:\n  - port: 8125\xff\n",
    b"routes: 5\n",
    b"routes: true\n",
    b"routes:\n  - port: " + b"9" * 5000 + b"\n",
    b"routes: " + b"[" * 1000 + b"]" * 1000 + b"\n",
    b"routes: !!timestamp 2020-13-45\n",
    BOMB,
]

VARIABLES = ["PORT", "SOURCE_PORT", "TARGET_PORT", "SELECTOR", "PROTOCOL", "NAMESPACE", "LOG_LEVEL"]
# What a variable can hold: any text but NUL, and bytes that are not UTF-8 (Python decodes
# those with surrogateescape).
env_values = (st.sampled_from(["8125", "statsd", "app=agent", "udp", "TCP", NS, "warn", "", " 8125 ", "9" * 5000,
                               "\u0663", "1e3", "0x1f"])
              | st.text(max_size=30) | st.binary(max_size=20).map(os.fsdecode)).filter(lambda v: "\x00" not in v)
envs = st.dictionaries(st.sampled_from(VARIABLES), env_values, max_size=7)


def lines_of(data: bytes) -> int:
    text = data.decode("utf-8", errors="replace")
    return len(re.split("\r\n|[\r\n\x85\u2028\u2029]", text))


def assert_located(problems: list[Problem], path: Path, data: bytes) -> None:
    """Every problem names the file (or the environment) and, when it has a position, one inside the file."""
    assert problems
    for problem in problems:
        assert problem.source in (str(path), ENV_SOURCE) and problem.message.strip(), problem
        assert "defect in proxyctl" not in problem.message, problem
        assert (problem.line is None) == (problem.column is None), problem
        assert problem.line is None or (problem.source == str(path) and 1 <= problem.line <= lines_of(data)
                                        and problem.column >= 1), problem


def outcome(path: Path, env: dict[str, str]) -> Config | list[Problem]:
    try:
        return read_config(path, env)
    except ConfigError as exc:
        return exc.problems


@pytest.fixture(scope="module")
def config_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("on-disk") / "proxyctl.yaml"


def with_examples(test: Any, *extra: Any) -> Any:
    """`test` with an `@example` for each input that once crashed, each followed by `extra`."""
    for data in CRASHED:
        test = example(data, *extra)(test)
    return test


@FUZZ
@example(b"routes: 5\n", {"PORT": "8125", "SELECTOR": "a=b"})
@example(b"routes: true\n", {"SELECTOR": "a=b"})
@example(b"", {"PORT": "9" * 5000})
@example(b"", {"PORT": "\u0663", "SELECTOR": "a=b"})  # a digit to str.isdigit, not to int()
@given(file_bytes, envs)
def test_any_bytes_on_disk_and_any_variables_give_a_config_or_located_errors(
        config_path: Path, data: bytes, env: dict[str, str]) -> None:
    config_path.write_bytes(data)
    result = outcome(config_path, env)
    if isinstance(result, list):
        assert_located(result, config_path, data)
    try:
        text = read_text(config_path)
    except ConfigError as exc:  # what `validate` does with the same file
        assert_located(exc.problems, config_path, data)
        return
    problems = check_file(text, str(config_path))
    if problems:
        assert_located(problems, config_path, data)


test_any_bytes_on_disk_and_any_variables_give_a_config_or_located_errors = with_examples(
    test_any_bytes_on_disk_and_any_variables_give_a_config_or_located_errors, {})


def send(port: int, payload: bytes) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.sendto(payload, ("127.0.0.1", port))


@pytest.mark.slow
def test_bytes_written_to_a_running_sidecars_config_never_stop_it_and_the_last_good_config_serves(
        kube_api: KubeApiServer, proxyctl, udp_sinks, tmp_path: Path) -> None:
    env_port, file_port = free_port(), free_port()
    sink = udp_sinks("127.0.0.2", env_port)
    kube_api.add_pod("agent", NS, AGENT, node="node-a", ip="127.0.0.2")
    env = {"PORT": str(env_port), "SELECTOR": "app=agent", "NAMESPACE": NS}
    sidecar = proxyctl(f"routes:\n  - {{name: statsd, port: {file_port}, protocol: udp, selector: app=agent, "
                       f"namespace: {NS}}}\n", env=env)
    good = sidecar.configmap.file.read_bytes()
    tried: list[bytes] = []

    def changes() -> int:
        return len(re.findall(r"config file \S+ changed", sidecar.log()))

    def failures() -> float:
        return sidecar.metric("proxyctl_reload_failures_total") or 0

    @RUNNING
    @example(b"")
    @given(file_bytes)
    def write(data: bytes) -> None:
        if data == good:
            return
        tried.append(data)
        seen, failed, logged = changes(), failures(), len(sidecar.log())
        sidecar.configmap.write(data)
        expected = outcome(sidecar.configmap.file, env)  # what the sidecar must conclude, read here the same way
        wait_for(lambda: changes() > seen or sidecar.process.poll() is not None, 5, what="the change seen")
        if isinstance(expected, list):
            wait_for(lambda: failures() > failed or sidecar.process.poll() is not None, 5, what="the rejection")
            log = sidecar.log()[logged:]
            assert all(str(p) in log for p in expected), (expected, log[-2000:])
        assert sidecar.process.poll() is None, sidecar.log()[-3000:]
        payload = f"after {len(tried)}|c".encode()  # the env route is in every accepted config, or the old one serves
        wait_for(lambda: send(env_port, payload) or payload in sink.received, 5, what="a datagram through")
        seen = changes()
        sidecar.configmap.write(good)
        wait_for(lambda: changes() > seen and sidecar.metric("proxyctl_config_valid") == 1, 10,
                 what="the good config back")

    with_examples(write)()
    log = sidecar.log()
    assert sidecar.process.poll() is None and "Traceback" not in log, log[-3000:]

    # `validate` on the same bytes: a line for every file, never a traceback.
    paths = []
    for i, data in enumerate(tried):
        paths.append(tmp_path / f"tried-{i}.yaml")
        paths[-1].write_bytes(data)
    result = subprocess.run([sys.executable, "-m", "proxyctl", "validate", *map(str, paths)], capture_output=True,
                            text=True, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode in (0, 1) and "Traceback" not in output, output[-3000:]
    assert all(str(path) in output for path in paths), output[-3000:]


def usable(env: dict[str, str], port: int) -> dict[str, str]:
    """`env`, with any valid port number other than our free one replaced: never bind another's port."""
    def fix(value: str) -> str:
        number = value.strip()
        return str(port) if number.isascii() and number.isdigit() and len(number) < 6 and 0 < int(number) < 65536 \
            else value
    return {k: fix(v) if k.endswith("PORT") else v for k, v in env.items()}


@pytest.mark.slow
def test_any_variables_at_start_up_give_a_running_sidecar_or_exit_1_with_located_errors(
        kube_api: KubeApiServer, tmp_path: Path) -> None:
    kube_api.add_pod("agent", NS, AGENT, node="node-a", ip="127.0.0.2")
    port = free_port()
    runs = iter(range(1000))

    @settings(RUNNING, max_examples=15)
    @example({"PORT": "9" * 5000, "SELECTOR": "app=agent"})
    @example({"PORT": "\u0663", "SELECTOR": "app=agent"})
    @example({"PORT": str(port), "SELECTOR": "app=agent", "NAMESPACE": NS})
    @example({"SOURCE_PORT": "\udcff", "SELECTOR": "app=agent"})
    @given(envs)
    def start(env: dict[str, str]) -> None:
        env = usable(env, port)
        # A file that only moves the health server to a free port: the variables give the route.
        sidecar = Proxyctl(tmp_path / f"run-{next(runs)}", kube_api, "", env)
        expected = outcome(sidecar.configmap.file, env)
        try:
            sidecar.start(wait_ready=False)
            if isinstance(expected, list):
                assert sidecar.process.wait(30) == 1
                log = sidecar.log()
                assert "Traceback" not in log and all(str(p) in log for p in expected), log
            else:
                wait_for(lambda: sidecar.get("/healthz")[0] == 200 or sidecar.process.poll() is not None, 20,
                         what="the health server")
                assert sidecar.process.poll() is None and "Traceback" not in sidecar.log(), sidecar.log()
        finally:
            sidecar.kill()

    start()
