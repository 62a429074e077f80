"""Config file watching that sees ConfigMap volume updates.

The kubelet never writes the file a pod sees: it writes a new timestamped directory and
renames the `..data` symlink over the old one. So the *directory* is watched, the file
is re-read through the symlink, and only a change of content counts. A slow periodic
re-read is the backstop for anything inotify misses.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Callable

import watchfiles

log = logging.getLogger("proxyctl.config")

BACKSTOP_SECONDS = 30.0


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except OSError:
        return None


def watch_config(path: Path, on_change: Callable[[], None], stop: threading.Event) -> threading.Thread:
    """Call `on_change` whenever the content behind `path` changes; runs until `stop` is set."""

    def loop() -> None:
        last = _read(path)
        for _ in watchfiles.watch(path.parent, watch_filter=None, stop_event=stop, debounce=20, step=10,
                                  rust_timeout=int(BACKSTOP_SECONDS * 1000), yield_on_timeout=True,
                                  raise_interrupt=False):
            current = _read(path)
            if current != last:
                log.info("config file %s changed", path)
                last = current
                on_change()

    thread = threading.Thread(target=loop, name="config-watch", daemon=True)
    thread.start()
    return thread
