"""The config watcher against a real kubelet-style ConfigMap directory, alone and in `proxyctl run`."""

from __future__ import annotations

import json
import subprocess
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from proxyctl.configwatch import watch_config
from tests.harness import ConfigMapDir, Proxyctl
from tests.kubeapi import KubeApiServer
from tests.support import free_port, wait_for


@pytest.fixture
def stop() -> Iterator[threading.Event]:
    event = threading.Event()
    yield event
    event.set()


def reports(volume: ConfigMapDir, stop: threading.Event) -> list[str]:
    """Start watching `volume`; the list gains the file's content at each report."""
    seen: list[str] = []
    watch_config(volume.file, lambda: seen.append(volume.file.read_text()), stop)
    return seen


def test_an_update_right_after_the_watch_starts_is_seen(tmp_path: Path, stop: threading.Event) -> None:
    """Watching is armed when `watch_config` returns: an update made at once is not missed
    (a missed one would wait for the 30 s backstop re-read)."""
    volume = ConfigMapDir(tmp_path / "config")
    volume.write("routes: []\n")
    seen = reports(volume, stop)
    volume.write("routes: [{port: 8125}]\n")
    wait_for(lambda: seen and seen[-1] == "routes: [{port: 8125}]\n", 5, what="the update reported")


def test_an_update_between_the_callers_read_and_the_watch_is_reported(tmp_path: Path,
                                                                     stop: threading.Event) -> None:
    """The caller read the file before watching began; a write in between made no event
    anything could see, so the watcher reports once on start and the caller compares."""
    volume = ConfigMapDir(tmp_path / "config")
    volume.write("routes: []\n")
    loaded = volume.file.read_text()
    volume.write("routes: [{port: 8125}]\n")
    seen = reports(volume, stop)
    wait_for(lambda: seen and seen[-1] != loaded, 5, what="the update reported")


def test_each_update_is_reported(tmp_path: Path, stop: threading.Event) -> None:
    volume = ConfigMapDir(tmp_path / "config")
    volume.write("one\n")
    seen = reports(volume, stop)
    for text in ("two\n", "three\n", "four\n"):
        volume.write(text)
        wait_for(lambda expected=text: seen and seen[-1] == expected, 5, what=f"{text.strip()} reported")


def test_a_file_that_is_not_text_does_not_stop_the_watch(tmp_path: Path, stop: threading.Event) -> None:
    """The watcher compares bytes: decoding, and saying where it fails, is the loader's job."""
    volume = ConfigMapDir(tmp_path / "config")
    volume.write("one\n")
    seen: list[bytes] = []
    watch_config(volume.file, lambda: seen.append(volume.file.read_bytes()), stop)
    for data in (b"\xff\xfe not UTF-8\n", b"two\n"):
        volume.write(data)
        wait_for(lambda expected=data: seen and seen[-1] == expected, 5, what=f"{data!r} reported")


# --- `proxyctl run` as a user without privileges, in a user namespace of its own -------------------


class UnprivilegedProxyctl(Proxyctl):
    """`proxyctl run` as uid 1000 of a new user namespace (real root outside, so it reads the test's
    files): a directory of mode 000 is closed to it, as to the sidecar's user 10001 in a pod, and
    nginx keeps its user. With `inotify_instances`, that namespace's inotify limit is set first."""

    def __init__(self, *args: Any, inotify_instances: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.inotify_instances = inotify_instances

    def command(self) -> list[str]:
        if self.inotify_instances is None:
            return ["unshare", "--user", "--map-user=1000", "--map-group=1000", *super().command()]
        limit = f"echo {self.inotify_instances} > /proc/sys/user/max_inotify_instances && exec \"$@\""
        return ["unshare", "--user", "--map-user=1000", "--map-group=1000", "--keep-caps", "sh", "-c", limit, "sh",
                *super().command()]


@pytest.fixture
def unprivileged(tmp_path: Path, kube_api: KubeApiServer) -> Iterator[Callable[..., UnprivilegedProxyctl]]:
    made: list[UnprivilegedProxyctl] = []

    def make(config: str, **kwargs: Any) -> UnprivilegedProxyctl:
        made.append(UnprivilegedProxyctl(tmp_path / f"proxyctl-{len(made)}", kube_api, config, **kwargs))
        return made[-1]

    yield make
    for process in made:
        process.kill()


NS = "kube-system"


def route(port: int, name: str) -> str:
    return f"  - {{name: {name}, port: {port}, protocol: udp, selector: app=agent, namespace: {NS}}}\n"


def served_routes(sidecar: Proxyctl) -> list[str]:
    code, body = sidecar.get("/routes")
    return [r["name"] for r in json.loads(body)["routes"]] if code == 200 else []


def test_an_unreadable_directory_and_a_symlink_to_root_beside_the_config_are_not_watched(
        kube_api: KubeApiServer, unprivileged) -> None:
    kube_api.add_pod("agent", NS, {"app": "agent"}, node="node-a", ip="127.0.0.2")
    first, second = free_port(), free_port()
    sidecar = unprivileged("routes:\n" + route(first, "one"))
    (sidecar.configmap.path / "root").symlink_to("/")
    (sidecar.configmap.path / "private" / "deeper").mkdir(parents=True)
    (sidecar.configmap.path / "private").chmod(0)
    sidecar.start()
    sidecar.configmap.write(sidecar.with_health("routes:\n" + route(first, "one") + route(second, "two")))
    wait_for(lambda: served_routes(sidecar) == ["one", "two"], 5, what="the new route served")
    log = sidecar.log()
    assert sidecar.process.poll() is None and "Traceback" not in log and "re-reading" not in log, log


def _inotify_limit_unsettable() -> str | None:
    """Why a new user namespace cannot set its own inotify limit here (a container's read-only /proc/sys), or None."""
    probe = subprocess.run(["unshare", "--user", "--map-user=1000", "--map-group=1000", "--keep-caps", "sh", "-c",
                            "echo 0 > /proc/sys/user/max_inotify_instances"], capture_output=True, text=True)
    return None if probe.returncode == 0 else probe.stderr.strip() or f"exit {probe.returncode}"


def test_without_inotify_the_config_is_re_read_every_second(kube_api: KubeApiServer, unprivileged) -> None:
    """inotify's limit reached (max_user_instances): said in the log, and changes still seen in
    about a second, not at the 30 s backstop."""
    if problem := _inotify_limit_unsettable():
        pytest.skip(f"cannot set a namespace's inotify limit here: {problem}")
    kube_api.add_pod("agent", NS, {"app": "agent"}, node="node-a", ip="127.0.0.2")
    first, second = free_port(), free_port()
    sidecar = unprivileged("routes:\n" + route(first, "one"), inotify_instances=0).start()
    assert "Too many open files" in sidecar.log() and "re-reading proxyctl.yaml every 1s instead" in sidecar.log()
    sidecar.configmap.write(sidecar.with_health("routes:\n" + route(first, "one") + route(second, "two")))
    wait_for(lambda: served_routes(sidecar) == ["one", "two"], 5, what="the new route served")
    assert sidecar.process.poll() is None and "Traceback" not in sidecar.log(), sidecar.log()
