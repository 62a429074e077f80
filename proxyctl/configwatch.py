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

# The watcher `watchfiles.watch` wraps. Used directly because it starts watching when it is
# built, so `watch_config` can return armed; the generator only starts at its first `next()`.
from watchfiles._rust_notify import RustNotify

log = logging.getLogger("proxyctl.config")

BACKSTOP_SECONDS = 30.0


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except OSError:
        return None


def watch_config(path: Path, on_change: Callable[[], None], stop: threading.Event) -> threading.Thread:
    """Call `on_change` whenever the content behind `path` changes; runs until `stop` is set.

    Watching starts before this returns, and `on_change` is called once straight away: the
    caller read the file earlier, and a write between that read and now made no event.
    """
    notify = RustNotify(watch_paths=[str(path.parent)], debug=False, force_polling=False, poll_delay_ms=0,
                        recursive=True, ignore_permission_denied=False)

    def loop() -> None:
        last = _read(path)
        on_change()
        with notify:
            while notify.watch(20, 10, int(BACKSTOP_SECONDS * 1000), stop) != "stop":
                current = _read(path)
                if current != last:
                    log.info("config file %s changed", path)
                    last = current
                    on_change()

    thread = threading.Thread(target=loop, name="config-watch", daemon=True)
    thread.start()
    return thread
