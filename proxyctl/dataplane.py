"""The data plane: one nginx per route, each brought to the config the loop wants for it.

Why one per route: a reload replaces nginx's worker, and the old worker closes what it
still holds after the drain timeout. With every route in one nginx, a pod change on one
route cut the long-lived TCP connections of every other route 30 s later, and all routes
shared one connection table, so one route's held streams starved the rest. An nginx per
route isolates both, for about 3 MB PSS per route (README, Benchmarks).

Applying never drops a change: a reload that nginx refuses or does not answer (a stopped
master, a passing `[emerg]`) is tried again with backoff until it takes. A flapping pod
cannot stack old workers up to the memory limit: each nginx reloads at most RELOAD_BURST
times at once and RELOADS_PER_SECOND after that (changes meanwhile coalesce into the next
reload), and when more than MAX_DRAINING old workers drain, the oldest is closed.

Each nginx counts its sessions in tally files in its directory (traffic.py, `Tally`); the
data plane frees their blocks every TALLY_FREE_INTERVAL, so a tmpfs state dir stays small.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

from proxyctl.backend import Backend
from proxyctl.config import Route
from proxyctl.nginx import Nginx, NginxError, end_stale
from proxyctl.traffic import TALLY_KINDS, Tally, tally_path

log = logging.getLogger("proxyctl.dataplane")

START_TIMEOUT = 10.0
RELOAD_TIMEOUT = 3.0  # a master that does not answer by then is retried; its SIGHUP stays pending
RELOAD_BURST, RELOADS_PER_SECOND = 10, 5.0  # per nginx: a token bucket
MAX_DRAINING = 8  # old workers per nginx (about 1 MB each); beyond this the oldest is closed at once
RETRY_FIRST, RETRY_MAX = 0.2, 2.0  # seconds: backoff of a change nginx did not take (a resumed master is seen soon)
RESTART_BACKOFF_MAX = 30.0  # seconds: an nginx that keeps dying is started less and less often
RESTART_FORGIVEN_AFTER = 60.0  # seconds of life after which a death restarts at once
TALLY_FREE_INTERVAL = 10.0  # seconds: at 30k datagrams/s a tally file holds at most ~300 kB meanwhile


@dataclass(frozen=True)
class Wanted:
    """What one route's nginx should serve: its config text and, for /routes, the route and backends in it."""

    route: Route
    text: str
    backends: tuple[Backend, ...]


class Instance:
    """The nginx of one route: what it serves, what it should serve, when to try again."""

    def __init__(self, nginx: Nginx) -> None:
        self.nginx = nginx
        self.served: Wanted | None = None  # None until nginx first started
        self.wanted: Wanted | None = None
        self.failure = ""  # why `wanted` is not served yet
        self.attempts = 0
        self.due = 0.0  # monotonic time before which no new attempt is made
        self.tokens, self.counted_at = float(RELOAD_BURST), 0.0  # reloads allowed now, as of when
        self.started_at = 0.0
        self.restart_delay = 0.0
        self.restart_at: float | None = None  # set while a dead nginx waits to be started again
        self.without_backend = 0.0  # seconds served without a backend, before `without_backend_since`
        self.without_backend_since: float | None = None  # monotonic time since when it serves none, if it does

    def seconds_without_backend(self, now: float) -> float:
        return self.without_backend + (now - self.without_backend_since if self.without_backend_since else 0.0)

    @property
    def pending(self) -> bool:
        return self.wanted != self.served

    def may_reload(self, now: float) -> bool:
        """Take a reload from the bucket; when it is empty, set `due` to when one is back."""
        self.tokens = min(float(RELOAD_BURST), self.tokens + (now - self.counted_at) * RELOADS_PER_SECOND)
        self.counted_at = now
        if self.tokens < 1:
            self.due = now + (1 - self.tokens) / RELOADS_PER_SECOND
            return False
        self.tokens -= 1
        return True


class DataPlane:
    """The nginx instances under `state_dir/routes/<route>/`, one per route."""

    def __init__(self, state_dir: Path, wake: Callable[[], None], binary: str = "nginx") -> None:
        self.routes_dir = state_dir / "routes"
        self.binary = binary
        self.wake = wake
        self.tally = Tally()
        self.tally_freed_at = time.monotonic()
        self.instances: dict[str, Instance] = {}
        self.retiring: list[tuple[Nginx, float]] = []  # removed routes' nginx, draining until the deadline
        self.reloads = self.failures = self.restarts = 0
        self.last_reload_seconds: float | None = None  # of the latest reload nginx took, for /metrics
        self.last_reload_at: float | None = None  # Unix time

    def directory(self, route: str) -> Path:
        return self.routes_dir / route

    def end_stale(self) -> None:
        """End nginx left running on this state dir by a proxyctl that was killed outright.

        The state dir itself is looked at too: versions before one nginx per route kept
        their one nginx's pid there.
        """
        routes = sorted(p for p in self.routes_dir.iterdir() if p.is_dir()) if self.routes_dir.is_dir() else []
        for directory in [self.routes_dir.parent, *routes]:
            if end_stale(directory):
                log.warning("ended an nginx left running by an earlier proxyctl in %s", directory)

    def test(self, wanted: Mapping[str, Wanted]) -> None:
        """`nginx -t` every route's text; raises NginxError naming the first route nginx refuses."""
        for route, want in wanted.items():
            directory = self.directory(route)
            directory.mkdir(parents=True, exist_ok=True)
            try:
                Nginx(directory, self.binary).test(want.text)
            except NginxError as exc:
                raise NginxError(f"route {route}: {exc}") from None

    # --- applying --------------------------------------------------------------------------

    def apply(self, wanted: Mapping[str, Wanted]) -> dict[str, str]:
        """Start, reload and stop nginx instances toward `wanted`; returns the failures by route.

        A route waiting for its retry or for its reload rate is left for later (see `due_in`),
        and is not a failure.
        """
        for route in [r for r in self.instances if r not in wanted]:
            self._remove(route)
        failures: dict[str, str] = {}
        launched: list[tuple[str, Instance]] = []
        for route, want in wanted.items():
            instance = self.instances.get(route) or self._add(route)
            instance.wanted = want
            if not instance.pending:
                instance.served = want  # the same text and addresses; what is known of their pods may be newer
                instance.failure, instance.attempts, instance.due = "", 0, 0.0
                continue
            if instance.due > time.monotonic() or instance.restart_at is not None:
                continue
            try:
                if instance.nginx.running:
                    self._reload(route, instance)
                else:
                    instance.nginx.write(want.text)
                    self._launch(instance)
                    launched.append((route, instance))
            except (NginxError, OSError) as exc:
                failures[route] = self._failed(route, instance, exc)
        for route, instance in launched:  # started side by side: start-up waits for the slowest, not the sum
            try:
                self._await_start(instance)
                self._served(route, instance)
            except NginxError as exc:
                failures[route] = self._failed(route, instance, exc)
        return failures

    def _add(self, route: str) -> Instance:
        directory = self.directory(route)
        directory.mkdir(parents=True, exist_ok=True)
        for kind in TALLY_KINDS:
            self.tally.start(tally_path(directory, route, kind))
        self.instances[route] = Instance(Nginx(directory, self.binary, on_exit=self.wake, route=route))
        return self.instances[route]

    def _remove(self, route: str) -> None:
        instance = self.instances.pop(route)
        instance.nginx.quit()
        drain = instance.served.route.drain_timeout if instance.served else 0.0
        self.retiring.append((instance.nginx, time.monotonic() + drain))
        log.info("route %s removed: its nginx stops accepting and drains for up to %gs", route, drain)

    def _reload(self, route: str, instance: Instance) -> None:
        """Test, write and reload `instance.wanted`, unless its reload rate says later."""
        assert instance.wanted is not None
        nginx = instance.nginx
        if not instance.may_reload(time.monotonic()):
            return  # coalesced into the next reload
        nginx.test(instance.wanted.text)
        nginx.write(instance.wanted.text)
        began = time.monotonic()
        nginx.reload(RELOAD_TIMEOUT)
        self.last_reload_seconds, self.last_reload_at = time.monotonic() - began, time.time()
        self.reloads += 1
        log.info("reloaded nginx: %s -> %s", route, ", ".join(map(str, instance.wanted.backends)) or "no backend")
        self._limit_draining(nginx)
        self._served(route, instance)

    @staticmethod
    def _served(route: str, instance: Instance) -> None:
        """`instance.wanted` is served now; say so when the route loses its last backend, or gets one back."""
        instance.served, instance.failure, instance.attempts, instance.due = instance.wanted, "", 0, 0.0
        assert instance.served is not None
        now, since = time.monotonic(), instance.without_backend_since
        if not instance.served.backends and since is None:
            instance.without_backend_since = now
            served = instance.served.route
            if served.protocol == "udp":
                log.warning("route %s has no backend: nginx drops the datagrams sent to port %d, counted in "
                            "proxyctl_route_no_backend_datagrams_total", route, served.port)
            else:
                log.warning("route %s has no backend: nothing listens on port %d, so clients' connects are "
                            "refused and they keep their data", route, served.port)
        elif instance.served.backends and since is not None:
            instance.without_backend += now - since
            instance.without_backend_since = None
            log.info("route %s has a backend again, after %.1fs without one", route, now - since)

    @staticmethod
    def _launch(instance: Instance) -> None:
        """Start nginx on the config written; a start checks the config as `nginx -t` would."""
        instance.nginx.kill_leftovers()
        instance.nginx.launch()

    @staticmethod
    def _await_start(instance: Instance) -> None:
        try:
            instance.nginx.await_start(START_TIMEOUT)
        except NginxError:
            instance.nginx.stop(grace=0)
            raise
        instance.started_at = time.monotonic()

    def _failed(self, route: str, instance: Instance, exc: Exception) -> str:
        """Count and schedule the next attempt; returns what went wrong, located."""
        self.failures += 1
        instance.attempts += 1
        delay = min(RETRY_MAX, RETRY_FIRST * 2 ** (instance.attempts - 1))
        instance.due = time.monotonic() + delay
        instance.failure = describe(exc)
        log.error("route %s: nginx has not taken the change, trying again in %.1fs: %s", route, delay,
                  instance.failure)
        return instance.failure

    def _limit_draining(self, nginx: Nginx) -> None:
        """Close the oldest of the workers earlier reloads left draining, beyond MAX_DRAINING."""
        old = nginx.old_workers()
        for pid in old[:max(0, len(old) - MAX_DRAINING)]:
            log.warning("more than %d old nginx workers draining: closing the connections of the oldest (%d)",
                        MAX_DRAINING, pid)
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    # --- supervision -----------------------------------------------------------------------

    def supervise(self) -> None:
        """Start again an nginx that died (with backoff, from what it served); end drained ones."""
        now = time.monotonic()
        for route, instance in self.instances.items():
            if instance.served is None or instance.nginx.running:
                continue
            if instance.restart_at is None:
                self.restarts += 1
                lived = now - instance.started_at
                instance.restart_delay = (0.0 if lived > RESTART_FORGIVEN_AFTER else
                                          min(RESTART_BACKOFF_MAX, max(1.0, instance.restart_delay * 2)))
                instance.restart_at = now + instance.restart_delay
                process = instance.nginx.process
                log.error("route %s: nginx exited with %s; starting it again in %.1fs", route,
                          process and process.returncode, instance.restart_delay)
                instance.nginx.kill_leftovers()
            if now < instance.restart_at:
                continue
            try:
                instance.nginx.write(instance.served.text)
                self._launch(instance)
                self._await_start(instance)
                instance.restart_at = None
                instance.due = 0.0  # then a change that came meanwhile is applied at once
                log.info("route %s: nginx started again", route)
            except (NginxError, OSError) as exc:
                instance.started_at = now
                instance.restart_at = None  # the next supervise() counts it and backs off further
                log.error("route %s: %s", route, describe(exc))
        for nginx, deadline in list(self.retiring):
            if not nginx.running or now >= deadline:
                nginx.stop(grace=0)
                self.retiring.remove((nginx, deadline))
        if now >= self.tally_freed_at + TALLY_FREE_INTERVAL:
            self.tally_freed_at = now
            for route in self.instances:
                for kind in TALLY_KINDS:
                    self.tally.free(tally_path(self.directory(route), route, kind))

    def due_in(self) -> float | None:
        """Seconds until an attempt, restart, drain deadline or freeing of tally files is due; None when none is."""
        times = [i.due for i in self.instances.values() if i.pending and i.restart_at is None]
        times += [self.tally_freed_at + TALLY_FREE_INTERVAL] if self.instances else []
        times += [i.restart_at for i in self.instances.values() if i.restart_at is not None]
        times += [deadline for _, deadline in self.retiring]
        return max(0.0, min(times) - time.monotonic()) if times else None

    def stop(self, grace: float) -> None:
        """SIGQUIT every nginx; connections may finish within `grace`; then anything left is killed."""
        everything = [i.nginx for i in self.instances.values()] + [nginx for nginx, _ in self.retiring]
        for nginx in everything:
            nginx.quit()
        deadline = time.monotonic() + grace
        for nginx in everything:
            nginx.stop(max(0.0, deadline - time.monotonic()))

    # --- status (read from other threads) --------------------------------------------------

    def served(self) -> list[Wanted]:
        """What each route's nginx serves now, in the order the routes were first added."""
        return [i.served for i in list(self.instances.values()) if i.served is not None]

    def counted(self) -> dict[str, tuple[float, dict[str, int]]]:
        """Route → (seconds it has gone without a backend, upstream failures nginx logged by reason)."""
        now = time.monotonic()
        return {route: (i.seconds_without_backend(now), i.nginx.upstream_failures())
                for route, i in list(self.instances.items())}

    def problems(self) -> list[str]:
        """What keeps the data plane from serving what is wanted, now."""
        problems = []
        for route, instance in list(self.instances.items()):
            if instance.served is None:
                continue  # not started yet: the loop knows whether that is a problem
            if not instance.nginx.running:
                problems.append(f"route {route}: nginx is not running")
            elif instance.failure:
                problems.append(f"route {route}: the latest change is not applied yet, retrying: {instance.failure}")
        return problems

    def pids(self) -> list[int]:
        """Every nginx process that runs: each master, its worker and the old workers still
        draining, removed routes' too (for their memory in /metrics)."""
        pids = []
        for nginx in [i.nginx for i in list(self.instances.values())] + [n for n, _ in list(self.retiring)]:
            process = nginx.process
            if nginx.running and process is not None:
                pids += [process.pid, *([nginx.worker] if nginx.worker else []), *nginx.old_workers()]
        return pids

    def draining(self) -> dict[str, int]:
        """Old workers each route's nginx still has draining connections after its reloads."""
        return {route: len(instance.nginx.old_workers()) for route, instance in list(self.instances.items())
                if instance.served is not None}

    @property
    def pending(self) -> bool:
        return any(i.pending for i in self.instances.values())


def describe(exc: Exception) -> str:
    """nginx's own message, or which file an OS error is about (a full or read-only state dir)."""
    if isinstance(exc, OSError) and exc.filename:
        return f"{exc.filename}: {exc.strerror}"
    return str(exc)
