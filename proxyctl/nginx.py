"""nginx as a child process: test a config, start, reload on SIGHUP, drain on SIGQUIT.

nginx reports what it did only on stderr, so a reader thread follows its log: a reload
counts as applied when new workers start, and as failed when nginx logs `[emerg]`.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable

log = logging.getLogger("proxyctl.nginx")

_PID = re.compile(r"^\d+#\d+: (\*\d+ )?")
_LEVEL = re.compile(r"\[(debug|info|notice|warn|error|crit|alert|emerg)\]")
_LOG_LEVELS = {"debug": logging.DEBUG, "info": logging.DEBUG, "notice": logging.DEBUG, "warn": logging.WARNING,
               "error": logging.ERROR, "crit": logging.ERROR, "alert": logging.ERROR, "emerg": logging.ERROR}


class NginxError(RuntimeError):
    """nginx refused a config or did not start; the message is nginx's own."""


def stream_module(binary: str = "nginx") -> str | None:
    """Path of ngx_stream_module.so when this nginx has stream as a dynamic module, else None."""
    info = subprocess.run([binary, "-V"], capture_output=True, text=True, check=True).stderr
    if "--with-stream" in info and "--with-stream=dynamic" not in info:
        return None
    match = re.search(r"--modules-path=(\S+)", info)
    candidates = [Path(match.group(1))] if match else []
    candidates += [Path("/usr/lib/nginx/modules"), Path("/usr/lib64/nginx/modules")]
    for directory in candidates:
        if (directory / "ngx_stream_module.so").is_file():
            return str(directory / "ngx_stream_module.so")
    raise NginxError("this nginx has no stream module: install libnginx-mod-stream")


class Nginx:
    """One nginx master whose config lives at `state_dir/nginx.conf`."""

    def __init__(self, state_dir: Path, binary: str = "nginx", on_exit: Callable[[], None] = lambda: None) -> None:
        self.state_dir = state_dir
        self.binary = binary
        self.on_exit = on_exit
        self.conf = state_dir / "nginx.conf"
        self.process: subprocess.Popen[str] | None = None
        self._changed = threading.Condition()
        self._workers_started = 0
        self._errors: list[str] = []

    def _args(self, conf: Path) -> list[str]:
        return [self.binary, "-p", f"{self.state_dir}/", "-c", str(conf), "-e", "stderr"]

    def test(self, text: str) -> None:
        """`nginx -t` on `text`; raises NginxError with nginx's message when it is rejected."""
        candidate = self.state_dir / "nginx.conf.candidate"
        candidate.write_text(text, encoding="utf-8")
        result = subprocess.run([*self._args(candidate), "-t", "-q"], capture_output=True, text=True)
        if result.returncode != 0:
            raise NginxError(f"nginx -t: {_first_error(result.stderr) or f'exited {result.returncode}'}")

    def write(self, text: str) -> None:
        """Replace nginx.conf atomically, so nginx never reads half a file."""
        temporary = self.state_dir / "nginx.conf.tmp"
        temporary.write_text(text, encoding="utf-8")
        os.replace(temporary, self.conf)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, timeout: float = 10.0) -> None:
        """Start the master (daemon off) and wait until its first worker runs."""
        self._errors.clear()
        started = self._workers_started
        self.process = subprocess.Popen(
            self._args(self.conf), stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True
        )
        threading.Thread(target=self._follow_log, args=(self.process,), name="nginx-log", daemon=True).start()
        threading.Thread(target=self._await_exit, args=(self.process,), name="nginx-exit", daemon=True).start()
        self._wait(lambda: self._workers_started > started, timeout)
        if self._workers_started == started:
            raise NginxError(f"nginx did not start: {self._errors[0] if self._errors else 'no worker started'}")

    def reload(self, timeout: float = 10.0) -> None:
        """SIGHUP; returns once new workers serve (the old one keeps accepting ~100 ms more).

        Raises NginxError when nginx kept the old config (it logs `[emerg]` and carries on).
        """
        if not self.running:
            raise NginxError("nginx is not running")
        assert self.process is not None
        self._errors.clear()
        started = self._workers_started
        self.process.send_signal(signal.SIGHUP)
        self._wait(lambda: self._workers_started > started, timeout)
        if self._workers_started == started:
            raise NginxError(f"nginx reload failed: {self._errors[0] if self._errors else 'no new worker started'}")

    def _wait(self, done: Callable[[], bool], timeout: float) -> None:
        """Wait for `done()` about nginx's log, an error in it, nginx's exit, or the timeout."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not done() and not self._errors and self.running:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                self._changed.wait(min(remaining, 0.1))

    def _follow_log(self, process: subprocess.Popen[str]) -> None:
        assert process.stderr is not None
        for line in process.stderr:
            line = line.rstrip()
            match = _LEVEL.search(line)
            level = match.group(1) if match else "notice"
            log.log(_LOG_LEVELS[level], "nginx: %s", _message(line) if match else line)
            with self._changed:
                if "start worker process " in line:
                    self._workers_started += 1
                elif level == "emerg" and len(self._errors) < 10:  # what makes nginx keep its old config
                    self._errors.append(_message(line))
                self._changed.notify_all()

    def _await_exit(self, process: subprocess.Popen[str]) -> None:
        """Report the master's exit: its log pipe may stay open in orphaned workers."""
        process.wait()
        with self._changed:
            self._changed.notify_all()
        self.on_exit()

    def kill_leftovers(self) -> None:
        """After the master died: its workers may live on holding the ports; end them all."""
        if self.process is not None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def stop(self, grace: float = 30.0) -> int | None:
        """Graceful: SIGQUIT lets open connections finish within `grace`; then SIGKILL."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGQUIT)
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        return self.process.returncode


def _message(line: str) -> str:
    """`2026/01/01 00:00:00 [emerg] 12#12: bind() failed` → `bind() failed`."""
    return _PID.sub("", line.split("] ", 1)[-1])


def _first_error(output: str) -> str:
    for line in output.splitlines():
        if "[emerg]" in line or "[alert]" in line or "[crit]" in line:
            return _message(line)
    return output.strip()
