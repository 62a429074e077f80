"""A config file on disk that is not what it should be: each is one located `ConfigError`.

Every pod that mounts a ConfigMap reads the same file, so an exception other than
`ConfigError` would crash-loop all of them. Each case goes through the real path: bytes on
disk, `read_config`, `proxyctl validate` and `proxyctl run` as processes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from proxyctl.config import MAX_FILE_BYTES, MAX_PROBLEMS, ConfigError, read_config

ENV = {"PORT": "8125", "SELECTOR": "app=agent"}
ROUTE = b"routes:\n  - port: 8125\n    protocol: udp\n    selector: app=agent\n"
BOMB = ("a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(  # 10**9 values in 350 bytes
    f"{name}: &{name} [{', '.join([f'*{previous}'] * 10)}]\n"
    for previous, name in zip("abcdefgh", "bcdefghi")) + "routes: *i\n").encode()


def unknown_keys(size: int) -> bytes:
    """`size` bytes of a mapping of unknown keys, ending at a line's end."""
    data = b"".join(b"key%d: 1\n" % i for i in range(size // 6))
    return data[:data.rindex(b"\n", 0, size) + 1]


# (id, the file's bytes, the environment, what the one problem says, where it points)
CASES = [
    ("not UTF-8", ROUTE.replace(b"8125", b"8125\xff"), {}, "not UTF-8 text: byte 0xff", (2, 15)),
    ("not UTF-8 in a comment", b"# caf\xe9\n" + ROUTE, {}, "not UTF-8 text: byte 0xe9", (1, 6)),
    ("routes a number, with the variables", b"routes: 5\n", ENV, "routes: input should be a valid list, got 5",
     (1, 9)),
    ("routes true, with the variables", b"routes: true\n", ENV, "routes: input should be a valid list, got True",
     (1, 9)),
    ("routes a string, with the variables", b"routes: abc\n", ENV, "routes: input should be a valid list", (1, 9)),
    ("an integer of 5,000 digits", ROUTE.replace(b"8125", b"9" * 5000), {}, "a number of 5000 characters",
     (2, 11)),
    ("a hexadecimal integer of 5,000 digits", ROUTE.replace(b"8125", b"0x" + b"f" * 5000), {},
     "a number of 5002 characters", (2, 11)),
    ("nested 1,000 deep", b"routes: " + b"[" * 1000 + b"]" * 1000 + b"\n", {}, "nested more than", (1, 40)),
    ("nested 100 deep in blocks", b"routes:\n" + b"".join(b" " * i + b"-\n" for i in range(100)), {},
     "nested more than", (33, 32)),
    ("an alias bomb", BOMB, {}, "more than 20000 values", None),
    ("an alias inside its own value", b"routes: &a [*a]\n", {}, "the alias *a is inside the value it names",
     (1, 13)),
    ("a value YAML cannot make", b"routes: !!timestamp 2020-13-45\n", {}, "invalid YAML value", None),
    ("5 MB of unknown keys", unknown_keys(5 << 20), {}, "larger than 64 KiB", None),
]


@pytest.mark.parametrize("data, env, says, where", [pytest.param(*c[1:], id=c[0]) for c in CASES])
def test_a_bad_file_is_one_located_config_error(tmp_path: Path, data: bytes, env: dict[str, str], says: str,
                                                 where: tuple[int, int] | None) -> None:
    path = tmp_path / "proxyctl.yaml"
    path.write_bytes(data)
    with pytest.raises(ConfigError) as caught:
        read_config(path, env)
    [problem] = caught.value.problems
    assert problem.source == str(path) and says in str(problem), problem
    if where is not None:
        assert (problem.line, problem.column) == where, problem
    assert len(str(problem)) < 400, problem  # no expanded value in the message


def test_only_the_first_errors_are_listed(tmp_path: Path) -> None:
    path = tmp_path / "proxyctl.yaml"
    path.write_bytes(unknown_keys(MAX_FILE_BYTES))
    with pytest.raises(ConfigError) as caught:
        read_config(path, {})
    *first, more = caught.value.problems
    assert len(first) == MAX_PROBLEMS and all(p.line for p in first), first
    assert [p.message for p in first] == ["required"] + ["unknown key"] * (MAX_PROBLEMS - 1)
    assert more.message.startswith("and ") and more.message.endswith(" more errors"), more


def test_a_directory_where_the_file_was_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "proxyctl.yaml"
    path.mkdir()
    with pytest.raises(ConfigError, match="proxyctl.yaml: cannot read: Is a directory"):
        read_config(path, ENV)


def test_a_symlink_loop_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "proxyctl.yaml"
    path.symlink_to(path.name)
    with pytest.raises(ConfigError, match="cannot read: Too many levels of symbolic links"):
        read_config(path, ENV)


def test_a_vanished_file_leaves_the_variables_or_a_config_error(tmp_path: Path) -> None:
    """The kubelet's `..data` points at a directory that is gone: the same as no file."""
    path = tmp_path / "proxyctl.yaml"
    path.symlink_to("..data/proxyctl.yaml")
    (tmp_path / "..data").symlink_to("..2026_01_01")
    assert [r.port for r in read_config(path, ENV).routes] == [8125]
    with pytest.raises(ConfigError, match="nothing to route"):
        read_config(path, {})


def run(*args: str, env: dict[str, str] | None = None, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*prefix, sys.executable, "-m", "proxyctl", *args], capture_output=True, text=True,
                          timeout=60, env={"PATH": os.environ.get("PATH", ""), **(env or {})})


def test_validate_gives_one_located_line_per_bad_file_and_no_traceback(tmp_path: Path) -> None:
    paths = []
    for i, (name, data, env, says, _) in enumerate(CASES):
        if not env:  # validate reads no variables
            paths.append((tmp_path / f"{i}.yaml", says))
            paths[-1][0].write_bytes(data)
    (tmp_path / "dir.yaml").mkdir()
    paths += [(tmp_path / "dir.yaml", "no *.yaml or *.yml file in it"),
              (tmp_path / "missing.yaml", "cannot read: No such file or directory")]
    result = run("validate", *(str(p) for p, _ in paths))
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == len(paths), result.stderr
    for line, (path, says) in zip(lines, paths):
        assert line.startswith(f"{path}") and says in line, (line, path)


def test_validate_of_an_unreadable_file_is_a_located_line(tmp_path: Path) -> None:
    path = tmp_path / "proxyctl.yaml"
    path.write_bytes(ROUTE)
    path.chmod(0)
    # Without capabilities, not even root may read a file of mode 000.
    result = run("validate", str(path), prefix=("setpriv", "--bounding-set=-all", "--inh-caps=-all"))
    assert (result.returncode, result.stderr) == (1, f"{path}: cannot read: Permission denied\n")


@pytest.mark.parametrize("command", ["run", "render"])
@pytest.mark.parametrize("data, env, says", [pytest.param(*c[1:4], id=c[0]) for c in CASES
                                             if c[0] in ("not UTF-8", "routes true, with the variables",
                                                         "nested 1,000 deep", "an alias bomb")])
def test_run_and_render_with_a_bad_file_exit_1_with_the_located_error(tmp_path: Path, command: str, data: bytes,
                                                                      env: dict[str, str], says: str) -> None:
    path = tmp_path / "proxyctl.yaml"
    path.write_bytes(data)
    (tmp_path / "endpoints.yaml").write_text("{}\n")
    options = ["--endpoints", str(tmp_path / "endpoints.yaml")] if command == "render" else []
    result = run(command, "--config", str(path), "--state-dir", str(tmp_path / "state"), *options, env=env)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert any(line.startswith(str(path)) and says in line for line in result.stderr.splitlines()), result.stderr
