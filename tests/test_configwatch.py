"""The config watcher against a real kubelet-style ConfigMap directory."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Iterator

import pytest

from proxyctl.configwatch import watch_config
from tests.harness import ConfigMapDir
from tests.support import wait_for


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
