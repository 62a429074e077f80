"""Case image: the image's size, and an idle container's memory as the kubelet counts it.

The container runs as tests/test_image.py runs it (uid 10001, read-only root, in-cluster
config over HTTPS against the test API server), with three routes. Its memory is the cgroup's
working set, what `kubectl top` shows and memory limits act on: usage minus inactive file pages.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from bench.report import CaseResult, Table, Target, mb, median
from tests.kubeapi import KubeApiServer, self_signed_tls
from tests.support import free_port
from tests.test_image import IMAGE, Container, container_engine

NS = "monitoring"
AGENTS = (("dogstatsd", "udp"), ("fluentd", "tcp"), ("otel", "tcp"))
IDLE = 3.0  # seconds after /readyz, as in the footprint case
MEMORY_TARGET_KIB = 50 * 1024


def _config() -> str:
    return "routes:\n" + "".join(f"  - {{name: {name}, port: {free_port()}, protocol: {protocol}, "
                                 f"selector: app={name}, namespace: {NS}}}\n" for name, protocol in AGENTS)


def _cgroup_dir(pid: int) -> tuple[Path, str]:
    """The memory cgroup directory of `pid`, and the cgroup version (v2: unified; v1: the memory controller)."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        number, controllers, path = line.split(":", 2)
        if number == "0" and controllers == "" and Path("/sys/fs/cgroup/memory.stat").exists():
            return Path("/sys/fs/cgroup") / path.lstrip("/"), "v2"
        if "memory" in controllers.split(","):
            return Path("/sys/fs/cgroup/memory") / path.lstrip("/"), "v1"
    raise RuntimeError(f"no memory cgroup for pid {pid}")


def working_set_kib(pid: int) -> tuple[int, int, str]:
    """(working set, usage) in KiB of the cgroup holding `pid`, and the cgroup version."""
    directory, version = _cgroup_dir(pid)
    stat = dict(line.split() for line in (directory / "memory.stat").read_text().splitlines())
    if version == "v2":
        usage, inactive = int((directory / "memory.current").read_text()), int(stat["inactive_file"])
    else:
        usage, inactive = int((directory / "memory.usage_in_bytes").read_text()), int(stat["total_inactive_file"])
    return (usage - inactive) // 1024, usage // 1024, version


def run(quick: bool) -> CaseResult:
    engine = container_engine()
    if engine is None:
        raise RuntimeError("no container engine can run containers here (docker or podman)")
    size = int(subprocess.run([*engine, "image", "inspect", "--format", "{{.Size}}", IMAGE], check=True,
                              capture_output=True, text=True).stdout)
    samples: list[tuple[int, int, str]] = []
    for k in range(1 if quick else 3):
        with ExitStack() as stack:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-image-")))
            os.chmod(root, 0o755)
            tls, ca = self_signed_tls(root)
            api = KubeApiServer(tls=tls)
            api.start()
            stack.callback(api.stop)
            for name, _ in AGENTS:
                api.add_pod(f"{name}-x1", NS, {"app": name}, node="node-a", ip="127.0.0.2")
            container = Container(engine, root / "container", api, ca, _config())
            container.start()
            stack.callback(container.remove)
            deadline = time.monotonic() + 60
            while container.get("/readyz")[0] != 200:
                if time.monotonic() > deadline or container.exited():
                    raise RuntimeError(f"the container did not become ready:\n{container.log()}")
                time.sleep(0.05)
            time.sleep(IDLE)  # idle on purpose: the figure is the resting footprint
            pid = int(subprocess.run([*engine, "inspect", "--format", "{{.State.Pid}}", container.name],
                                     check=True, capture_output=True, text=True).stdout)
            samples.append(working_set_kib(pid))
        print(f"  start {k + 1}: working set {mb(samples[-1][0])} (usage {mb(samples[-1][1])})", flush=True)
    working_set = median([s[0] for s in samples])
    usage = median([s[1] for s in samples])
    about = (f"{IMAGE} built by `make image`; size as `{engine[0]} image inspect` reports it. One container per "
             f"start, three routes (one udp, two tcp), read {IDLE:g} s after `/readyz` answered 200, from the "
             f"container's memory cgroup ({samples[0][2]}): the working set is usage minus inactive file pages, "
             "what the kubelet and `kubectl top` count and a memory limit acts on. It covers proxyctl, nginx and "
             "tini together, with no other process sharing their pages.")
    return CaseResult(
        "image", "Image: size and idle memory", about,
        tables=[Table(["", "value"], [["image size", mb(size / 1024)], ["working set (median)", mb(working_set)],
                                      ["usage, page cache included (median)", mb(usage)]], "lr")],
        targets=[Target("idle container, three routes <= 50 MB working set", mb(working_set),
                        working_set <= MEMORY_TARGET_KIB)])
