"""`proxyctl run`: keep nginx in step with the pods and the config file.

Every change (a pod, the config file, nginx dying, SIGHUP) only sets a flag and wakes the
main loop; the loop debounces, renders each route's nginx.conf and hands them to the data
plane (dataplane.py), which reloads the nginx whose text differs. One thread decides, so
there is never a race between two reloads, and it starts every nginx, which dies with it
(PR_SET_PDEATHSIG follows the thread that forked). No error ends the loop: it is logged
and the last good config keeps serving.
"""

from __future__ import annotations

import logging
import resource
import signal
import subprocess
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Mapping

from proxyctl import health, logs, memory
from proxyctl.config import Config, ConfigError, ConfigUnreadable, read_config
from proxyctl.configwatch import watch_config
from proxyctl.dataplane import DataPlane, Wanted, describe
from proxyctl.discovery import Discovery
from proxyctl.kube import Identity, identity
from proxyctl.nginx import NginxError, stream_module
from proxyctl.render import UDP_RECEIVE_BUFFER, has_ipv6_loopback, listen_addresses, render_route
from proxyctl.statedir import StateDirError, claim
from proxyctl.status import RouteStatus, Status
from proxyctl.traffic import Meter, RouteTraffic

log = logging.getLogger("proxyctl")

DEBOUNCE = 0.02  # seconds: coalesces a burst of pod events into one reload
FIRST_SYNC_TIMEOUT = 5.0  # start nginx after this even if a watch has not listed yet
NEW_ROUTE_SYNC_TIMEOUT = 2.0
STOP_GRACE = 25.0  # within Kubernetes' default 30 s termination grace period
CONFIG_RETRY = 1.0  # seconds: a config file that could not be read (not an invalid one) is read again
MAX_OPEN_FILES = 1 << 20  # what an unlimited open-file limit counts as


class Sidecar:
    """The running state: the config nginx serves, the one wanted, counters for /metrics."""

    def __init__(self, config_path: Path, state_dir: Path, template: Path | None, env: Mapping[str, str],
                 config: Config) -> None:
        self.config_path = config_path
        self.template = template
        self.env = env
        self.config = config
        self.config_valid = True  # whether the config file, as last read, was accepted
        self.config_failures = 0
        self.stopping = threading.Event()
        self._wake = threading.Event()
        self.dataplane = DataPlane(state_dir, self._wake.set)
        self.stream_module = stream_module()
        self.open_files = _raise_open_files_limit()
        self.applied_config = config  # the last config nginx took in full: a refused one goes back to it
        self._config_changed = threading.Event()
        self._reread_at: float | None = None
        self.discovery: Discovery | None = None
        self.meter = Meter(self.dataplane.tally)

    # --- events from other threads and signals --------------------------------------------

    def wake(self) -> None:
        self._wake.set()

    def config_changed(self) -> None:
        self._config_changed.set()
        self._wake.set()

    def stop(self, signum: int = 0, frame: object = None) -> None:
        log.info("signal %s: draining and stopping", signal.Signals(signum).name if signum else "stop")
        self.stopping.set()
        self._wake.set()

    def reread(self, signum: int, frame: object = None) -> None:
        log.info("signal %s: reading the config file again", signal.Signals(signum).name)
        self.config_changed()

    def ignore(self, signum: int, frame: object = None) -> None:
        log.info("signal %s: ignored", signal.Signals(signum).name)

    # --- rendering and applying -----------------------------------------------------------

    def _wanted(self, config: Config) -> dict[str, Wanted]:
        """Each route's nginx.conf for `config`, with the backends known now."""
        assert self.discovery is not None
        endpoints = self.discovery.endpoints()
        wanted = {}
        for route in config.routes:
            backends = endpoints.get(route.key, [])
            text = render_route(config, route, backends, self.dataplane.directory(route.key), self.stream_module,
                                self.template, self.open_files)
            wanted[route.key] = Wanted(route, text, tuple(backends))
        return wanted

    def _try_new_config(self) -> None:
        """Adopt a changed config file only if it validates and nginx accepts it."""
        assert self.discovery is not None
        try:
            candidate = read_config(self.config_path, self.env)
            if candidate == self.config:
                self.config_valid = True
                return
            self.dataplane.test(self._wanted(candidate))
        except (ConfigUnreadable, OSError) as exc:  # e.g. out of file descriptors: not the config's fault
            log.error("cannot check the config file now, trying again in %gs: %s", CONFIG_RETRY, describe(exc))
            self._reread_at = time.monotonic() + CONFIG_RETRY
            return
        except (ConfigError, NginxError) as exc:
            self._reject(exc)
            return
        log.info("config accepted: %d route(s)", len(candidate.routes))
        if candidate.health != self.config.health:
            log.warning("health moves to %s only when proxyctl restarts; it stays on %s", candidate.health,
                        self.config.health)
        logs.setup(candidate.log_level, self.env)
        self.config, self.config_valid = candidate, True
        self.discovery.set_config(candidate)
        self.discovery.wait_synced(NEW_ROUTE_SYNC_TIMEOUT)

    def _reject(self, exc: Exception) -> None:
        self.config_valid = False
        self.config_failures += 1
        log.error("rejected the new config; the last good one keeps serving:\n%s", exc)

    def _converge(self) -> None:
        """Bring every route's nginx to what the config and the pods say now.

        A new config that nginx refuses is reverted, routes it already reached included;
        a pod change that nginx did not take is tried again (DataPlane).
        """
        assert self.discovery is not None
        failures = self.dataplane.apply(self._wanted(self.config))
        if failures and self.config is not self.applied_config:
            self._reject(NginxError("; ".join(f"route {r}: {f}" for r, f in failures.items())))
            self.config = self.applied_config  # so later pod changes render the good one too
            self.discovery.set_config(self.config)
            self.dataplane.apply(self._wanted(self.config))
        elif not self.dataplane.pending:
            if self.applied_config is not self.config:
                log.info("nginx serves the new config")
            self.applied_config = self.config

    def _step(self) -> None:
        self.dataplane.supervise()
        if self._reread_at is not None and time.monotonic() >= self._reread_at:
            self._reread_at = None
            self._config_changed.set()
        if self._config_changed.is_set():
            self._config_changed.clear()
            self._try_new_config()
        self._converge()

    # --- the loop ----------------------------------------------------------------------------------

    def run(self, me: Identity) -> int:
        self.discovery = Discovery(self.env, me, self.config.watch_timeout, self.wake)
        self.discovery.set_config(self.config)
        try:
            server = health.serve(self.config.health, self.status, self.traffic, self.pss)
        except OSError as exc:  # the port is taken, or the address is not this pod's
            log.error("cannot serve health on %s: %s", self.config.health, exc.strerror or exc)
            self.discovery.stop()
            return 1
        try:
            return self._serve()
        except Exception as exc:  # noqa: BLE001 - before the loop runs: nothing serves yet, so say it and exit
            log.error("cannot start: %s: %s", type(exc).__name__, exc, exc_info=log.isEnabledFor(logging.DEBUG))
            return 1
        finally:
            self.discovery.stop()
            self.dataplane.stop(STOP_GRACE if self.stopping.is_set() else 0.0)
            server.shutdown()
            log.info("stopped")

    def _serve(self) -> int:
        assert self.discovery is not None
        if not self.discovery.wait_synced(FIRST_SYNC_TIMEOUT):
            log.warning("not every watch has listed its pods yet; starting nginx with what is known")
        wanted = self._wanted(self.config)
        failures = self.dataplane.apply(wanted)
        if failures:
            log.error("cannot start nginx: %s", "; ".join(f"route {r}: {f}" for r, f in failures.items()))
            return 1
        log.info("nginx started: %s", _summary(wanted))
        if self.config_path.parent.is_dir():
            watch_config(self.config_path, self.config_changed, self.stopping)
        while not self.stopping.is_set():
            self._wake.wait(self._due_in())
            time.sleep(DEBOUNCE)
            self._wake.clear()  # before the check below, so a stop() that comes later wakes the next wait
            if self.stopping.is_set():
                break
            try:
                self._step()
            except Exception as exc:  # noqa: BLE001 - the loop outlives any one mistake; nginx keeps serving
                log.error("unexpected error, carrying on: %s: %s", type(exc).__name__, exc,
                          exc_info=log.isEnabledFor(logging.DEBUG))
        return 0

    def _due_in(self) -> float | None:
        """Seconds until the loop has something to do without being woken; None: only when woken."""
        due = self.dataplane.due_in()
        if self._reread_at is not None:
            reread = max(0.0, self._reread_at - time.monotonic())
            due = reread if due is None else min(due, reread)
        return due

    def status(self) -> Status:
        """What the health server reports; read from other threads, so only reads here."""
        assert self.discovery is not None
        routes = [RouteStatus(s.route.key, s.route.port, s.route.protocol, list(s.backends))
                  for s in self.dataplane.served()]
        served = {r.name for r in routes}
        wanted = {r.key for r in self.config.routes}  # a route on its way out is not missing
        ready = [f"route {r.key}: nginx does not serve it yet" for r in self.applied_config.routes
                 if r.key in wanted and r.key not in served]
        ready += self.dataplane.problems()
        if not self.config_valid:
            ready.append("the latest config was rejected; the last good one serves")
        ready += [f"route {r.name} has no backend" for r in routes if not r.backends]
        alive = [f"watch stalled: {key}" for key in self.discovery.stalled()]
        return Status(alive, ready, routes, self.dataplane.reloads,
                             self.config_failures + self.dataplane.failures, self.config_valid,
                             self.discovery.restarts, self.dataplane.restarts, self.discovery.watch_ages(),
                             self.discovery.on_fallback(), self.dataplane.last_reload_seconds,
                             self.dataplane.last_reload_at, self.discovery.requests.totals(),
                             self.dataplane.draining())

    def traffic(self) -> list[RouteTraffic]:
        """What the kernel, nginx and the data plane counted for the routes nginx serves; read per /metrics
        scrape, from its thread."""
        served = [(s.route.key, s.route.protocol, s.route.port, self.dataplane.directory(s.route.key))
                  for s in self.dataplane.served()]
        sampled = self.meter.sample(served, listen_addresses(self.applied_config, has_ipv6_loopback()),
                                    UDP_RECEIVE_BUFFER)
        counted = self.dataplane.counted()
        return [replace(t, no_backend_seconds=counted[t.name][0], upstream_failures=counted[t.name][1])
                if t.name in counted else t for t in sampled]

    def pss(self) -> dict[str, int]:
        """PSS of proxyctl and of all its nginx processes; read per /metrics scrape, from its thread."""
        return memory.usage(self.dataplane.pids())


def _raise_open_files_limit() -> int:
    """Lift our soft open-file limit to the hard one, for nginx to inherit; returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return soft if soft != resource.RLIM_INFINITY else MAX_OPEN_FILES


def _summary(wanted: Mapping[str, Wanted]) -> str:
    return "; ".join(f"{name} -> {', '.join(map(str, w.backends)) or 'no backend'}" for name, w in wanted.items())


def _identity(env: Mapping[str, str], stopping: threading.Event) -> Identity | None:
    """Who and where we are; retried while the API server is unreachable."""
    delay, said = 0.5, ""
    while True:
        try:
            return identity(env)
        except Exception as exc:  # noqa: BLE001 - any failure here is retried, and said once per kind
            if str(exc) != said:
                log.warning("cannot find this pod's node yet (%s); retrying", exc)
                said = str(exc)
        if stopping.wait(delay):
            return None
        delay = min(10.0, delay * 2)


def run(config_path: Path, config: Config, state_dir: Path, template: Path | None, env: Mapping[str, str]) -> int:
    """The sidecar, from `config` as read from `config_path` (the CLI read it, to report its errors first)."""
    logs.setup(config.log_level, env)
    try:
        claim(state_dir)  # held until the process ends
    except StateDirError as exc:
        log.error("%s", exc)
        return 1
    try:
        sidecar = Sidecar(config_path, state_dir, template, env, config)
        sidecar.dataplane.end_stale()
    except (OSError, subprocess.CalledProcessError, NginxError) as exc:  # e.g. no nginx, or no stream module
        log.error("cannot start: %s", exc)
        return 1
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
        signal.signal(signum, sidecar.stop)
    signal.signal(signal.SIGHUP, sidecar.reread)
    for signum in (signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(signum, sidecar.ignore)
    me = _identity(env, sidecar.stopping)
    if me is None:
        return 0
    log.info("proxyctl on node %s, namespace %s, %d route(s)", me.node, me.namespace, len(config.routes))
    return sidecar.run(me)
