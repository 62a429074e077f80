"""`proxyctl run`: keep nginx in step with the pods and the config file.

Every change (a pod, the config file, nginx dying) only sets a flag and wakes the main
loop; the loop debounces, renders, and reloads nginx when the text differs. One thread
decides, so there is never a race between two reloads.
"""

from __future__ import annotations

import logging
import resource
import signal
import threading
import time
from pathlib import Path
from typing import Mapping

from proxyctl import health, logs
from proxyctl.config import Config, ConfigError, read_config
from proxyctl.configwatch import watch_config
from proxyctl.discovery import Discovery
from proxyctl.kube import Identity, identity
from proxyctl.nginx import Nginx, NginxError, stream_module
from proxyctl.render import render

log = logging.getLogger("proxyctl")

DEBOUNCE = 0.02  # seconds: coalesces a burst of pod events into one reload
FIRST_SYNC_TIMEOUT = 5.0  # start nginx after this even if a watch has not listed yet
NEW_ROUTE_SYNC_TIMEOUT = 2.0
STOP_GRACE = 25.0  # within Kubernetes' default 30 s termination grace period
RESTART_BACKOFF_MAX = 30.0
MAX_OPEN_FILES = 1 << 20  # what an unlimited open-file limit counts as


class Sidecar:
    """The running state: last good config, the text nginx serves, counters for /metrics."""

    def __init__(self, config_path: Path, state_dir: Path, template: Path | None, env: Mapping[str, str],
                 config: Config) -> None:
        self.config_path = config_path
        self.template = template
        self.env = env
        self.config = config
        self.config_valid = True
        self.stopping = threading.Event()
        self._wake = threading.Event()
        self.nginx = Nginx(state_dir, on_exit=self._wake.set)
        self.stream_module = stream_module()
        self.open_files = _raise_open_files_limit()
        self.applied = ""  # the text nginx serves now
        self.applied_endpoints: dict[str, list[str]] = {}
        self.applied_config = config  # the config nginx serves: what /readyz and /routes describe
        self.reloads = self.reload_failures = self.nginx_restarts = 0
        self._nginx_started_at = 0.0
        self._restart_delay = 0.0
        self._config_changed = threading.Event()
        self.discovery: Discovery | None = None

    # --- events from other threads --------------------------------------------------------

    def wake(self) -> None:
        self._wake.set()

    def config_changed(self) -> None:
        self._config_changed.set()
        self._wake.set()

    def stop(self, signum: int = 0, frame: object = None) -> None:
        log.info("signal %s: draining and stopping", signal.Signals(signum).name if signum else "stop")
        self.stopping.set()
        self._wake.set()

    # --- rendering and reloading --------------------------------------------------------------

    def _render(self, config: Config) -> tuple[str, dict[str, list[str]]]:
        """The nginx.conf for `config` with the backends known now, and those backends by route."""
        assert self.discovery is not None
        endpoints = self.discovery.endpoints()
        text = render(config, endpoints, self.nginx.state_dir, self.stream_module, self.template, self.open_files)
        return text, {name: [str(b) for b in backends] for name, backends in endpoints.items()}

    def _try_new_config(self) -> None:
        """Adopt a changed config file only if it validates and nginx accepts it."""
        assert self.discovery is not None
        try:
            candidate = read_config(self.config_path, self.env)
            if candidate == self.config:
                self.config_valid = True
                return
            self.nginx.test(self._render(candidate)[0])
        except (ConfigError, NginxError) as exc:
            self.config_valid = False
            self.reload_failures += 1
            log.error("rejected the new config; the last good one keeps serving:\n%s", exc)
            return
        log.info("config accepted: %d route(s)", len(candidate.routes))
        if candidate.health != self.config.health:
            log.warning("health moves to %s only when proxyctl restarts; it stays on %s", candidate.health,
                        self.config.health)
        logs.setup(candidate.log_level, self.env)
        self.config, self.config_valid = candidate, True
        self.discovery.set_config(candidate)
        self.discovery.wait_synced(NEW_ROUTE_SYNC_TIMEOUT)

    def _converge(self) -> None:
        """Render; when the text differs from what nginx serves, test it and reload."""
        assert self.discovery is not None
        text, endpoints = self._render(self.config)
        if text == self.applied:
            self.applied_config = self.config  # e.g. only logLevel changed: nginx serves it already
            return
        try:
            self.nginx.test(text)
            self.nginx.write(text)
            self.nginx.reload()
        except NginxError as exc:
            self.reload_failures += 1
            self.config_valid = False
            log.error("nginx rejected the new config; the last good one keeps serving: %s", exc)
            self.nginx.write(self.applied)  # a restarted nginx must come back with the good one
            if self.config is not self.applied_config:  # so later pod changes render the good one too
                self.config = self.applied_config
                self.discovery.set_config(self.config)
            return
        self.applied, self.applied_endpoints, self.applied_config = text, endpoints, self.config
        self.reloads += 1
        log.info("reloaded nginx: %s", _summary(endpoints))

    def _start_nginx(self) -> None:
        text, endpoints = self._render(self.config)
        self.nginx.test(text)
        self.nginx.write(text)
        self.nginx.start()
        self._nginx_started_at = time.monotonic()
        self.applied, self.applied_endpoints = text, endpoints
        log.info("nginx started: %s", _summary(endpoints))

    def _restart_nginx(self) -> None:
        """nginx died: start it again from the last good config, waiting longer each time it dies young."""
        self.nginx_restarts += 1
        lived = time.monotonic() - self._nginx_started_at
        self._restart_delay = 0.0 if lived > 60 else min(RESTART_BACKOFF_MAX, max(1.0, self._restart_delay * 2))
        log.error("nginx exited with %s; restarting in %.1fs",
                  self.nginx.process and self.nginx.process.returncode, self._restart_delay)
        self.nginx.kill_leftovers()
        if self.stopping.wait(self._restart_delay):
            return
        try:
            self.nginx.start()
        except NginxError as exc:
            log.error("%s", exc)
        self._nginx_started_at = time.monotonic()
        self._wake.set()  # converge: pods may have changed while nginx was down

    # --- the loop ----------------------------------------------------------------------------------

    def run(self, me: Identity) -> int:
        self.discovery = Discovery(self.env, me, self.config.watch_timeout, self.wake)
        self.discovery.set_config(self.config)
        server = health.serve(self.config.health, self.status)
        if not self.discovery.wait_synced(FIRST_SYNC_TIMEOUT):
            log.warning("not every watch has listed its pods yet; starting nginx with what is known")
        try:
            self._start_nginx()
        except NginxError as exc:
            log.error("cannot start nginx: %s", exc)
            return 1
        if self.config_path.parent.is_dir():
            watch_config(self.config_path, self.config_changed, self.stopping)
        while not self.stopping.is_set():
            self._wake.wait()
            time.sleep(DEBOUNCE)
            self._wake.clear()  # before the check below, so a stop() that comes later wakes the next wait
            if self.stopping.is_set():
                break
            if not self.nginx.running:
                self._restart_nginx()
                continue
            if self._config_changed.is_set():
                self._config_changed.clear()
                self._try_new_config()
            self._converge()
        self.discovery.stop()
        code = self.nginx.stop(STOP_GRACE)
        server.shutdown()
        log.info("stopped (nginx exited with %s)", code)
        return 0

    def status(self) -> health.Status:
        """What the health server reports; read from other threads, so only reads here."""
        assert self.discovery is not None
        routes = [
            health.RouteStatus(r.key, r.port, r.protocol, self.applied_endpoints.get(r.key, []))
            for r in self.applied_config.routes
        ]
        ready = []
        if not self.nginx.running:
            ready.append("nginx is not running")
        if not self.config_valid:
            ready.append("the latest config was rejected; the last good one serves")
        ready += [f"route {r.name} has no backend" for r in routes if not r.backends]
        alive = [f"watch stalled: {key}" for key in self.discovery.stalled()]
        return health.Status(alive, ready, routes, self.reloads, self.reload_failures, self.config_valid,
                             self.discovery.restarts, self.nginx_restarts)


def _raise_open_files_limit() -> int:
    """Lift our soft open-file limit to the hard one, for nginx to inherit; returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return soft if soft != resource.RLIM_INFINITY else MAX_OPEN_FILES


def _summary(endpoints: Mapping[str, list[str]]) -> str:
    return "; ".join(f"{name} -> {', '.join(backends) or 'no backend'}" for name, backends in endpoints.items())


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


def run(config_path: Path, state_dir: Path, template: Path | None, env: Mapping[str, str]) -> int:
    logs.setup("info", env)
    try:
        config = read_config(config_path, env)
    except ConfigError as exc:
        log.error("invalid config, not starting:\n%s", exc)
        return 1
    logs.setup(config.log_level, env)
    state_dir.mkdir(parents=True, exist_ok=True)
    sidecar = Sidecar(config_path, state_dir, template, env, config)
    signal.signal(signal.SIGTERM, sidecar.stop)
    signal.signal(signal.SIGINT, sidecar.stop)
    me = _identity(env, sidecar.stopping)
    if me is None:
        return 0
    log.info("proxyctl on node %s, namespace %s, %d route(s)", me.node, me.namespace, len(config.routes))
    return sidecar.run(me)
