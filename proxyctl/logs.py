"""Logging: one line per event; JSON lines with LOG_FORMAT=json for log pipelines."""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from typing import Mapping

SUMMARY_INTERVAL = 60.0  # seconds: a kind of line that comes in floods is shown once per interval


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class OncePerInterval(logging.Filter):
    """Shows the first record of each kind (a record's `summarize` attribute, e.g. a route and
    "upstream failure") per SUMMARY_INTERVAL; the next one shown says how many were held back.

    nginx logs a line per failed connection, and a dead backend under load fails thousands
    a second: passed on one by one they would bury everything else. /metrics counts them all.
    """

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._kinds: dict[object, tuple[float, int]] = {}  # kind → (shown until, records held back since)

    def filter(self, record: logging.LogRecord) -> bool:
        kind = getattr(record, "summarize", None)
        if kind is None:
            return True
        with self._lock:
            until, held = self._kinds.get(kind, (0.0, 0))
            if record.created < until:
                self._kinds[kind] = (until, held + 1)
                return False
            self._kinds[kind] = (record.created + SUMMARY_INTERVAL, 0)
        note = f"{held} more held back since the last one shown; " if held else ""
        record.msg = f"{record.msg} ({note}lines of this kind are shown at most once every {SUMMARY_INTERVAL:g}s)"
        return True


_summaries = OncePerInterval()  # one for the process: its counts outlive a logLevel change


def setup(level: str, env: Mapping[str, str]) -> None:
    """Configure the root logger once; called again when the config's logLevel changes."""
    handler = logging.StreamHandler(sys.stderr)
    if env.get("LOG_FORMAT", "").lower() == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_summaries)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("kubernetes").setLevel(logging.WARNING)
    logging.getLogger("urllib3").setLevel(logging.ERROR)
    logging.getLogger("watchfiles").setLevel(logging.WARNING)
