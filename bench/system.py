"""The machine under the benchmark: what it is, what it lacks, and what processes cost in memory."""

from __future__ import annotations

import importlib.util
import os
import platform
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence


@dataclass(frozen=True)
class Need:
    """Something a case needs from the machine, and how to get it on Debian."""

    what: str
    install: str

    def missing(self) -> bool:
        if self.what.startswith("python:"):
            return importlib.util.find_spec(self.what.removeprefix("python:")) is None
        if self.what == "nginx stream module":
            from proxyctl.nginx import NginxError, stream_module

            try:
                stream_module()
            except (NginxError, OSError, subprocess.CalledProcessError):
                return True
            return False
        return shutil.which(self.what) is None


NGINX = [Need("nginx", "apt-get install -y nginx"),
         Need("nginx stream module", "apt-get install -y libnginx-mod-stream")]
REDIS_HAPROXY = [Need("redis-server", "apt-get install -y redis-server"),
                 Need("redis-benchmark", "apt-get install -y redis-tools"),
                 Need("haproxy", "apt-get install -y haproxy")]
MATPLOTLIB = Need("python:matplotlib", "pip install matplotlib")
AGENTS = [Need("npm", "apt-get install -y npm (statsd is installed from npm on first use)"),
          Need("git", "apt-get install -y git (the before column is exported from git history)"),
          Need("python:fluent", "pip install -e '.[test]' (fluent-logger)")]
GIT = Need("git", "apt-get install -y git (earlier versions are exported from git history)")
CONTAINER_ENGINE = Need("podman", "make image (it installs podman when there is no docker)")


def _first_line(command: Sequence[str]) -> str:
    if shutil.which(command[0]) is None:
        return "not installed"
    result = subprocess.run(command, capture_output=True, text=True, timeout=10)
    return (result.stdout or result.stderr).strip().splitlines()[0]


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def describe() -> list[tuple[str, str]]:
    """What the report says about the machine: enough to tell whether two runs compare."""
    uname = os.uname()
    memory_kib = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                      if line.startswith("MemTotal:"))
    return [
        ("CPUs (nproc)", f"{os.cpu_count()} x {_cpu_model()}"),
        ("memory", f"{memory_kib / 1024 / 1024:.0f} GiB"),
        ("kernel (uname -srm)", f"{uname.sysname} {uname.release} {uname.machine}"),
        ("nginx -v", _first_line(["nginx", "-v"]).removeprefix("nginx version: ")),
        ("haproxy -v", _first_line(["haproxy", "-v"])),
        ("redis-server --version", _first_line(["redis-server", "--version"])),
        ("Python", platform.python_version()),
        ("load average at start (1, 5, 15 min)", " ".join(f"{x:.2f}" for x in os.getloadavg())),
        ("date", time.strftime("%Y-%m-%d %H:%M %Z")),
    ]


# --- memory ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Memory:
    """kB from /proc/PID/smaps_rollup: RSS counts shared pages in full, PSS shares them out, USS is private only."""

    rss: int
    pss: int
    uss: int

    def __add__(self, other: Memory) -> Memory:
        return Memory(self.rss + other.rss, self.pss + other.pss, self.uss + other.uss)


def memory(pid: int) -> Memory:
    fields: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, value, *_ = line.split()
        fields[name.rstrip(":")] = int(value)
    return Memory(fields["Rss"], fields["Pss"], fields["Private_Clean"] + fields["Private_Dirty"])


def children(pid: int) -> list[int]:
    """Direct children of `pid` (nginx's workers, for its master)."""
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def tree_memory(pid: int) -> Memory:
    """A process and its children together: nginx's master and workers."""
    total = memory(pid)
    for child in children(pid):
        total += memory(child)
    return total
