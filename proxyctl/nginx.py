"""nginx as a child process: test a config, start, reload on SIGHUP, drain on SIGQUIT.

nginx reports what it did only on stderr, so a reader thread follows its log: a reload
counts as applied when new workers start, and as failed when nginx logs `[emerg]`.

The log pipe's write end is non-blocking: when the reader falls behind (a flood of
per-connection errors), nginx loses log lines instead of blocking its worker, and with it
the traffic. The same reader counts the upstream failures nginx logs, by reason, for
/metrics: the counts live here, so they outlast the nginx processes that logged them (lines
nginx lost to a full pipe are lost to the counts too). nginx dies with the thread that
started it (PR_SET_PDEATHSIG), so start it from the main thread; and a master left behind
by a proxyctl killed outright is found by its pid file and ended before a new one starts
(`end_stale`).
"""

from __future__ import annotations

import ctypes
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
_WORKER = re.compile(r"start worker process (\d+)")
# Upstream failures as nginx 1.22+ words them, by the reason /metrics gives: src/event/ngx_event_connect.c and
# src/stream/ngx_stream_proxy_module.c (connect, timeouts, no live upstreams), src/core/ngx_connection.c (a full
# connection table; "reusing connections" is not a failure), and EMFILE/ENFILE from socket() or accept().
UPSTREAM_FAILURES = (
    ("connect_failed", re.compile(r"\bconnect\(\) (to \S+ )?failed")),
    ("timeout", re.compile(r"\bupstream timed out")),
    ("no_live_upstreams", re.compile(r"\bno live upstreams")),
    ("out_of_connections", re.compile(r"worker_connections are not enough(?!, reusing| for)|Too many open files")),
)
_LOG_LEVELS = {"debug": logging.DEBUG, "info": logging.DEBUG, "notice": logging.DEBUG, "warn": logging.WARNING,
               "error": logging.ERROR, "crit": logging.ERROR, "alert": logging.ERROR, "emerg": logging.ERROR}
_PR_SET_PDEATHSIG = 1
_prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: between fork and exec, only call it


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


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when our thread that forked it dies, even by SIGKILL.

    SIGTERM, not SIGKILL: the master then ends its workers, which would otherwise live on
    holding the ports.
    """
    _prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)


class Nginx:
    """One nginx master whose config lives at `state_dir/nginx.conf`, its pid at `state_dir/nginx.pid`."""

    def __init__(self, state_dir: Path, binary: str = "nginx", on_exit: Callable[[], None] = lambda: None,
                 route: str = "") -> None:
        self.state_dir = state_dir
        self.route = route  # named in what its log lines say
        self.binary = binary
        self.on_exit = on_exit
        self.conf = state_dir / "nginx.conf"
        self.process: subprocess.Popen[bytes] | None = None
        self.worker: int | None = None  # pid of the worker the latest config runs in
        self._changed = threading.Condition()
        self._workers_started = 0
        self._started_before = 0  # _workers_started when the master was launched
        self._errors: list[str] = []
        self._bind_error = ""  # nginx tries a busy port 5 times in 2 s: only its giving up is an error
        self._upstream_failures: dict[str, int] = {}  # reason → lines seen, over every master this object ran

    def _args(self, conf: Path) -> list[str]:
        return [self.binary, "-p", f"{self.state_dir}/", "-c", str(conf), "-e", "stderr"]

    def test(self, text: str) -> None:
        """`nginx -t` on `text`; raises NginxError with nginx's message when it is rejected."""
        candidate = self.state_dir / "nginx.conf.candidate"
        _write(candidate, text)
        result = subprocess.run([*self._args(candidate), "-t", "-q"], capture_output=True, text=True)
        if result.returncode != 0:
            raise NginxError(f"nginx -t: {_first_error(result.stderr) or f'exited {result.returncode}'}")

    def write(self, text: str) -> None:
        """Replace nginx.conf atomically, so nginx never reads half a file."""
        temporary = self.state_dir / "nginx.conf.tmp"
        _write(temporary, text)
        os.replace(temporary, self.conf)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, timeout: float = 10.0) -> None:
        """Start the master (daemon off) and wait until its first worker runs."""
        self.launch()
        self.await_start(timeout)

    def launch(self) -> None:
        """Start the master and return at once: several nginx start side by side, see `await_start`."""
        self._errors.clear()
        self._started_before = self._workers_started
        reader, writer = os.pipe()
        os.set_blocking(writer, False)  # nginx drops a log line rather than wait for us
        try:
            self.process = subprocess.Popen(self._args(self.conf), stdin=subprocess.DEVNULL, stderr=writer,
                                            start_new_session=True, preexec_fn=_die_with_parent)
        except BaseException:
            os.close(reader)
            raise
        finally:
            os.close(writer)
        threading.Thread(target=self._follow_log, args=(reader,), name="nginx-log", daemon=True).start()
        threading.Thread(target=self._await_exit, args=(self.process,), name="nginx-exit", daemon=True).start()

    def await_start(self, timeout: float) -> None:
        """Wait until the master `launch` started runs its first worker; NginxError when it does not."""
        started = self._started_before
        if not self._wait_for_worker(started, set(), timeout):
            raise NginxError(f"nginx did not start: {self._errors[0] if self._errors else 'no worker started'}")

    def reload(self, timeout: float = 10.0) -> None:
        """SIGHUP; returns once new workers serve (the old one keeps accepting ~100 ms more).

        Raises NginxError when nginx kept the old config (it logs `[emerg]` and carries on),
        or did not answer within `timeout` (the signal stays pending: a stopped master still
        reloads when it resumes).
        """
        if not self.running:
            raise NginxError("nginx is not running")
        assert self.process is not None
        self._errors.clear()
        started, before = self._workers_started, set(_children(self.process.pid))
        self.process.send_signal(signal.SIGHUP)
        if not self._wait_for_worker(started, before, timeout):
            reason = self._errors[0] if self._errors else f"no new worker started within {timeout:g}s"
            raise NginxError(f"nginx reload failed: {reason}")

    def _wait_for_worker(self, started: int, before: set[int], timeout: float) -> bool:
        """Whether a new worker runs within `timeout`: said in the log, or seen among the master's children.

        The log alone could miss it: nginx drops log lines while the pipe is full.
        """
        assert self.process is not None
        pid = self.process.pid

        def new_worker() -> bool:
            if self._workers_started > started:
                return True
            new = set(_children(pid)) - before
            if new:
                self.worker = max(new, key=_start_time)
            return bool(new)

        self._wait(new_worker, timeout)
        return new_worker()

    def _wait(self, done: Callable[[], bool], timeout: float) -> None:
        """Wait for `done()` about nginx's log, an error in it, nginx's exit, or the timeout."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not done() and not self._errors and self.running:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                self._changed.wait(min(remaining, 0.1))

    def upstream_failures(self) -> dict[str, int]:
        """Upstream failures nginx logged, by reason (see UPSTREAM_FAILURES), since this object first ran nginx."""
        with self._changed:
            return dict(self._upstream_failures)

    def _follow_log(self, reader: int) -> None:
        prefix = f"nginx {self.route}: " if self.route else "nginx: "
        with open(reader, "rb") as stream:
            for raw in stream:
                line = raw.decode(errors="replace").rstrip()
                match = _LEVEL.search(line)
                level = match.group(1) if match else "notice"
                failure = upstream_failure(line) if match and level not in ("debug", "info", "notice") else None
                # A failure line says which kind it is, so the log output may say them once a minute (logs.py).
                log.log(_LOG_LEVELS[level], "%s%s", prefix, _message(line) if match else line,
                        extra={"summarize": (self.route, "upstream failure")} if failure else None)
                with self._changed:
                    if failure:
                        self._upstream_failures[failure] = self._upstream_failures.get(failure, 0) + 1
                    worker = _WORKER.search(line)
                    if worker:
                        self._workers_started += 1
                        self.worker = int(worker.group(1))
                    elif "Address already in use" in line:
                        self._bind_error = _message(line)  # e.g. another route's nginx lets go of it
                    elif level == "emerg" and len(self._errors) < 10:  # what makes nginx keep its old config
                        self._errors.append(self._bind_error if "still could not bind" in line else _message(line))
                    self._changed.notify_all()

    def _await_exit(self, process: subprocess.Popen[bytes]) -> None:
        """Report the master's exit: its log pipe may stay open in orphaned workers."""
        process.wait()
        with self._changed:
            self._changed.notify_all()
        self.on_exit()

    def old_workers(self) -> list[int]:
        """Workers left by earlier reloads that still drain connections, oldest first."""
        if not self.running or self.process is None:
            return []
        return sorted((pid for pid in _children(self.process.pid) if pid != self.worker), key=_start_time)

    def kill_leftovers(self) -> None:
        """After the master died: its workers may live on holding the ports; end them all."""
        if self.process is not None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def quit(self) -> None:
        """SIGQUIT: stop accepting; open connections may finish (see `stop`)."""
        if self.running:
            assert self.process is not None
            self.process.send_signal(signal.SIGQUIT)

    def stop(self, grace: float = 30.0) -> int | None:
        """Graceful: SIGQUIT lets open connections finish within `grace`; then SIGKILL."""
        if self.process is None:
            return None
        self.quit()
        try:
            self.process.wait(grace)
        except subprocess.TimeoutExpired:
            pass
        self.kill_leftovers()  # orphaned or stuck workers too, not only a master past its grace
        self.process.wait()
        return self.process.returncode


def _write(path: Path, text: str) -> None:
    """Write `path`; an OSError names the file even when writing, not opening, failed (a full disk)."""
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, str(path)) from None


def end_stale(state_dir: Path) -> bool:
    """End what is left of an nginx that `state_dir/nginx.pid` names (a proxyctl killed outright).

    Its master ran in a session of its own, so its process group holds its workers, even
    orphaned ones that keep ports bound. Only processes named nginx are signalled: the pid
    may have been reused since. Returns whether anything was found.
    """
    try:
        group = int((state_dir / "nginx.pid").read_text().strip())
    except (OSError, ValueError):
        return False
    found = [pid for pid in _nginx_processes() if _stat(pid)[2:3] == [str(group)]] if group > 1 else []
    for pid in found:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 2.0
    while any(Path(f"/proc/{pid}").exists() and _state(pid) != "Z" for pid in found) and time.monotonic() < deadline:
        time.sleep(0.01)
    (state_dir / "nginx.pid").unlink(missing_ok=True)
    return bool(found)


def _nginx_processes() -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == "nginx":
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _stat(pid: int) -> list[str]:
    """Fields of /proc/PID/stat after the command name (which may hold spaces)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def _state(pid: int) -> str:
    fields = _stat(pid)
    return fields[0] if fields else ""


def _start_time(pid: int) -> int:
    fields = _stat(pid)
    return int(fields[19]) if len(fields) > 19 else 0


def upstream_failure(line: str) -> str | None:
    """The reason an nginx error log line reports an upstream failure, or None when it does not."""
    return next((reason for reason, pattern in UPSTREAM_FAILURES if pattern.search(line)), None)


def _message(line: str) -> str:
    """`2026/01/01 00:00:00 [emerg] 12#12: bind() failed` → `bind() failed`."""
    return _PID.sub("", line.split("] ", 1)[-1])


def _first_error(output: str) -> str:
    for line in output.splitlines():
        if "[emerg]" in line or "[alert]" in line or "[crit]" in line:
            return _message(line)
    return output.strip()
