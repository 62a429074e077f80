"""Config file watching that sees ConfigMap volume updates.

The kubelet never writes the file a pod sees: it writes a new timestamped directory and
renames the `..data` symlink over the old one. So the *directory* is watched, and only the
directory itself: a ConfigMap volume holds nothing deeper that matters, and descending into
whatever else is there (an unreadable directory, a symlink to /) could only fail or cost.
The file is re-read through the symlink, and only a change of its bytes counts. A slow
periodic re-read is the backstop for anything inotify misses; when inotify cannot be used
at all (its limits reached) or fails, a fast re-read takes its place.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Callable

# The watcher `watchfiles.watch` wraps. Used directly because it starts watching when it is
# built, so `watch_config` can return armed; the generator only starts at its first `next()`.
from watchfiles._rust_notify import RustNotify

from proxyctl.config import MAX_FILE_BYTES

log = logging.getLogger("proxyctl.config")

BACKSTOP_SECONDS = 30.0
POLL_SECONDS = 1.0  # without inotify


def _read(path: Path) -> bytes | None:
    """The file's bytes, undecoded (decoding is the loader's job, which locates any error)."""
    try:
        with path.open("rb") as file:
            return file.read(MAX_FILE_BYTES + 1)  # beyond that the loader refuses it whatever it holds
    except OSError:
        return None


def watch_config(path: Path, on_change: Callable[[], None], stop: threading.Event) -> threading.Thread:
    """Call `on_change` whenever the content behind `path` changes; runs until `stop` is set.

    Watching starts before this returns, and `on_change` is called once straight away: the
    caller read the file earlier, and a write between that read and now made no event.
    """
    notify: RustNotify | None
    try:
        notify = RustNotify(watch_paths=[str(path.parent)], debug=False, force_polling=False, poll_delay_ms=0,
                            recursive=False, ignore_permission_denied=False)
    except Exception as exc:  # noqa: BLE001 - e.g. inotify's limits: polling does the job, only slower
        log.error("cannot watch %s (%s); re-reading %s every %.0fs instead", path.parent, exc, path.name,
                  POLL_SECONDS)
        notify = None
    last = _read(path)

    def check() -> None:
        nonlocal last
        current = _read(path)
        if current != last:
            log.info("config file %s changed", path)
            last = current
            on_change()

    def loop() -> None:
        on_change()
        if notify is not None:
            try:
                with notify:
                    while notify.watch(20, 10, int(BACKSTOP_SECONDS * 1000), stop) != "stop":
                        check()
                return
            except Exception as exc:  # noqa: BLE001 - a dead watcher would miss every later change
                log.error("watching %s failed (%s); re-reading %s every %.0fs instead", path.parent, exc,
                          path.name, POLL_SECONDS)
        while not stop.wait(POLL_SECONDS):
            check()

    thread = threading.Thread(target=loop, name="config-watch", daemon=True)
    thread.start()
    return thread
