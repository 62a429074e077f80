"""`proxyctl run` as a real process, fed by a kubelet-style ConfigMap directory."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Mapping

from tests.kubeapi import KubeApiServer
from tests.support import free_port, http_get, wait_for


class ConfigMapDir:
    """A directory laid out as the kubelet lays out a ConfigMap volume.

    `proxyctl.yaml -> ..data/proxyctl.yaml`, `..data -> ..<timestamp>`; an update writes a
    new timestamped directory and renames a new `..data` symlink over the old one.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        self.file = path / "proxyctl.yaml"

    def write(self, text: str | bytes) -> None:
        old = (self.path / "..data").resolve() if (self.path / "..data").exists() else None
        fresh = self.path / f"..{time.strftime('%Y_%m_%d_%H_%M_%S')}.{time.monotonic_ns()}"
        fresh.mkdir()
        (fresh / "proxyctl.yaml").write_bytes(text.encode() if isinstance(text, str) else text)
        (self.path / "..data_tmp").symlink_to(fresh.name)
        os.rename(self.path / "..data_tmp", self.path / "..data")
        if not self.file.is_symlink():
            self.file.symlink_to("..data/proxyctl.yaml")
        if old is not None:
            shutil.rmtree(old)


class Proxyctl:
    """One `proxyctl run` child process with its own state dir, health port and log file."""

    def __init__(self, root: Path, kube_api: KubeApiServer, config: str | None = None,
                 env: Mapping[str, str] | None = None, node: str = "node-a") -> None:
        self.root = root
        # An env-only config (no file) serves health on its default port.
        self.health_port = free_port() if config is not None else 9901
        self.configmap = ConfigMapDir(root / "config")
        self.state_dir = root / "state"
        self.log_path = root / "proxyctl.log"
        if config is not None:
            self.configmap.write(self.with_health(config))
        self.env = {
            "PATH": os.environ.get("PATH", ""),
            "KUBECONFIG": kube_api.write_kubeconfig(root / "kubeconfig"),
            "NODE_NAME": node,
            **(env or {}),
        }
        self.process: subprocess.Popen[bytes] | None = None

    def with_health(self, config: str) -> str:
        """Point the config's health server at this process's own free port."""
        return f"health: 127.0.0.1:{self.health_port}\n{config}"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "proxyctl", "run", "--config", str(self.configmap.file),
                "--state-dir", str(self.state_dir)]

    def start(self, wait_ready: bool = True) -> Proxyctl:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(self.command(), env=self.env, stdout=log, stderr=subprocess.STDOUT)
        if wait_ready:
            try:
                wait_for(lambda: self.get("/readyz")[0] == 200, 20, what="/readyz 200")
            except AssertionError as exc:
                raise AssertionError(f"{exc}; log:\n{self.log()}") from None
        return self

    def get(self, path: str) -> tuple[int, str]:
        return http_get(self.health_port, path)

    def metric(self, name: str, labels: str = "") -> float | None:
        code, text = self.get("/metrics")
        match = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.M) if code == 200 else None
        return float(match.group(1)) if match else None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def nginx_pid(self, route: str | None = None) -> int:
        """The nginx master of `route`; with one route, `route` may be left out."""
        if route is None:
            (path,) = self.state_dir.glob("routes/*/nginx.pid")
        else:
            path = self.state_dir / "routes" / route / "nginx.pid"
        return int(path.read_text())

    def nginx_pids(self) -> list[int]:
        """The nginx masters, one per route."""
        return [int(path.read_text()) for path in sorted(self.state_dir.glob("routes/*/nginx.pid"))]

    def nginx_conf(self, route: str | None = None) -> str:
        """The nginx.conf of `route`; with one route, `route` may be left out."""
        (path,) = self.state_dir.glob(f"routes/{route or '*'}/nginx.conf")
        return path.read_text()

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 40) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signum)
        return self.process.wait(timeout)

    def kill(self) -> None:
        """Test teardown: make sure neither proxyctl nor its nginx outlive the test."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        # One nginx per route; proxyctl before that (bench/rollout.py runs one) had one in the state dir.
        for pid_file in [*self.state_dir.glob("routes/*/nginx.pid"), self.state_dir / "nginx.pid"]:
            try:
                os.killpg(int(pid_file.read_text()), signal.SIGKILL)
            except (OSError, ValueError):
                pass
