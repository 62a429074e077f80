"""Least privilege: proxyctl runs as nobody on a read-only root filesystem, and listens on loopback only.

The sidecar runs the way its pod spec asks (runAsUser 65534, readOnlyRootFilesystem, state
in an emptyDir): in a private mount namespace every filesystem is remounted read-only
except its state dir, and then it drops to uid/gid 65534. Tests here run as root, so that
namespace is built with `unshare` and the privileges are dropped with `setpriv`.
"""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

import proxyctl
from tests.harness import Proxyctl
from tests.kubeapi import KubeApiServer
from tests.support import free_port, tcp_exchange, wait_for

NS = "kube-system"
AGENT = {"app": "agent"}
NOBODY = 65534
PACKAGE = Path(proxyctl.__file__).resolve().parent
PREFIX = Path(sys.prefix).resolve()


def _hidden_ancestor() -> Path | None:
    """The one directory on the way to the interpreter that nobody may enter (pyenv under /root), if any."""
    closed = [p for p in PREFIX.parents if not os.stat(p).st_mode & 0o001]
    if len(closed) > 1:
        pytest.skip(f"the interpreter at {PREFIX} sits under several directories closed to others: {closed}")
    return closed[0] if closed else None


def _mount_namespace_problem() -> str | None:
    """Why a private, read-only mount namespace cannot be made here, or None when it can."""
    if os.geteuid() != 0:
        return "building the namespace needs root"
    for tool in ("unshare", "setpriv", "nsenter", "mount"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                            "mount -o remount,bind,ro / && ! touch /.proxyctl-ro-probe 2>/dev/null"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        return f"cannot remount / read-only in a private mount namespace: {probe.stderr.strip() or probe.returncode}"
    return None


class NobodyProxyctl(Proxyctl):
    """`proxyctl run` as uid/gid 65534 with every mount read-only except its state dir."""

    def start(self, wait_ready: bool = True) -> Proxyctl:
        self.state_dir.mkdir()
        os.chown(self.state_dir, NOBODY, NOBODY)
        return super().start(wait_ready)

    def command(self) -> list[str]:
        return ["unshare", "--mount", "--propagation", "private", "sh", "-ec", self._script()]

    def _script(self) -> str:
        """Shell run as root inside the new namespace: expose the interpreter, remount, drop privileges."""
        lines = [f"mount --bind {self.state_dir} {self.state_dir}"]  # its own mount: stays writable
        hidden = _hidden_ancestor()
        if hidden is not None:  # e.g. /root (0700): show only the interpreter's tree inside it
            child = hidden / PREFIX.relative_to(hidden).parts[0]
            hold = self.root / "hold"
            lines += [f"mkdir -p {hold}", f"mount --bind {child} {hold}",
                      f"mount -t tmpfs -o mode=0755 tmpfs {hidden}", f"mkdir {child}", f"mount --move {hold} {child}"]
        keep_writable = f"^({self.state_dir}|/proc|/sys|/dev)(/|$)"
        run = super().command()
        lines += [
            "awk '$6 ~ /^rw/ {print $5}' /proc/self/mountinfo | while read -r point; do  # rw mounts only",
            f"  echo \"$point\" | grep -Eq '{keep_writable}' || mount -o remount,bind,ro \"$point\"",
            "done",
            f"exec setpriv --reuid={NOBODY} --regid={NOBODY} --clear-groups --no-new-privs {shlex.join(run)}",
        ]
        return "\n".join(lines)

    def as_nobody(self, command: str) -> subprocess.CompletedProcess[str]:
        """Run `command` as uid 65534 in the sidecar's own mount namespace: what the sidecar itself may do."""
        assert self.process is not None
        return subprocess.run(["nsenter", f"--mount=/proc/{self.process.pid}/ns/mnt", "setpriv", f"--reuid={NOBODY}",
                               f"--regid={NOBODY}", "--clear-groups", "sh", "-c", command],
                              capture_output=True, text=True)


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory uid 65534 may enter (pytest's own tmp dirs are 0700)."""
    path = Path(tempfile.mkdtemp(prefix="proxyctl-nobody-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def ids(pid: int) -> tuple[list[int], list[int]]:
    """Real, effective, saved and filesystem uids and gids of a process."""
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return [int(x) for x in status["Uid"].split()], [int(x) for x in status["Gid"].split()]


def nginx_processes(master: int) -> list[int]:
    children = [int(p) for p in os.listdir("/proc") if p.isdigit() and _parent(int(p)) == master]
    return [master, *children]


def _parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except OSError:
        return None


def test_runs_as_nobody_with_only_its_state_dir_writable(kube_api: KubeApiServer, open_dir: Path, udp_sinks,
                                                         tcp_echoes) -> None:
    problem = _mount_namespace_problem()
    if problem:
        pytest.skip(f"no read-only mount namespace here: {problem}")
    port, moved = free_port(), free_port()
    sink = udp_sinks("127.0.0.2", port)
    tcp_echoes("127.0.0.2", port)
    tcp_echoes("127.0.0.2", moved)
    kube_api.add_pod("agent", NS, AGENT, node="node-a", ip="127.0.0.2")
    def routes(tcp_port: int) -> str:
        return (f"routes:\n  - {{name: statsd, port: {port}, protocol: udp, selector: app=agent, namespace: {NS}}}\n"
                f"  - {{name: forward, port: {tcp_port}, protocol: tcp, selector: app=agent, namespace: {NS}}}\n")

    sidecar = NobodyProxyctl(open_dir, kube_api, routes(port))
    try:
        sidecar.start()
        assert sidecar.process is not None
        masters = [sidecar.nginx_pid(route) for route in ("statsd", "forward")]
        for pid in (sidecar.process.pid, *(p for m in masters for p in nginx_processes(m))):
            assert ids(pid) == ([NOBODY] * 4, [NOBODY] * 4), pid

        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.sendto(b"as-nobody:1|c", ("127.0.0.1", port))
        wait_for(lambda: b"as-nobody:1|c" in sink.received, 5, what="a datagram forwarded")
        assert tcp_exchange(port, b"hello") == b"127.0.0.2:hello"

        # What the sidecar's user may write, seen from inside its namespace.
        for place in (sidecar.configmap.path, PACKAGE, PREFIX, Path("/tmp"), Path("/etc")):
            result = sidecar.as_nobody(f"touch {place}/.proxyctl-probe")
            assert result.returncode != 0 and "Read-only file system" in result.stderr, (place, result)
        assert sidecar.as_nobody(f"touch {sidecar.state_dir}/probe && rm {sidecar.state_dir}/probe").returncode == 0

        # A ConfigMap swap still reaches it through the read-only mount.
        sidecar.configmap.write(sidecar.with_health(routes(moved)))
        wait_for(lambda: _answers(moved), 10, what="the swapped config served")
        assert sidecar.get("/readyz")[0] == 200
        assert "Read-only" not in sidecar.log() and "Permission denied" not in sidecar.log(), sidecar.log()
    finally:
        sidecar.kill()


def _answers(port: int) -> bool:
    try:
        return tcp_exchange(port, b"moved") == b"127.0.0.2:moved"
    except OSError:
        return False


def _routes(port: int, target: int, listen: str = "") -> str:
    """A UDP and a TCP route on `port`, to backends on `target` (so that 0.0.0.0:port is free for nginx)."""
    return listen + "routes:\n" + "".join(
        f"  - {{name: {name}, port: {port}, protocol: {protocol}, selector: app=agent, namespace: {NS}, "
        f"targetPort: {target}}}\n" for name, protocol in (("statsd", "udp"), ("forward", "tcp")))


OTHER = "127.0.0.5"  # another address of this machine (on the loopback interface)


def test_listens_on_loopback_only_by_default(kube_api: KubeApiServer, proxyctl, udp_sinks, tcp_echoes) -> None:
    port, target = free_port(), free_port()
    sink = udp_sinks("127.0.0.2", target)
    tcp_echoes("127.0.0.2", target)
    kube_api.add_pod("agent", NS, AGENT, node="node-a", ip="127.0.0.2")
    proxyctl(_routes(port, target))

    assert tcp_exchange(port, b"x") == b"127.0.0.2:x"
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((OTHER, port), timeout=2).close()
    assert not _udp_delivered(sink, OTHER, port, "default")


def test_listens_on_every_address_when_asked(kube_api: KubeApiServer, proxyctl, udp_sinks, tcp_echoes) -> None:
    port, target = free_port(), free_port()
    sink = udp_sinks("127.0.0.2", target)
    tcp_echoes("127.0.0.2", target)
    kube_api.add_pod("agent", NS, AGENT, node="node-a", ip="127.0.0.2")
    proxyctl(_routes(port, target, "listenAddress: 0.0.0.0\n"))

    assert tcp_exchange(port, b"y", host=OTHER) == b"127.0.0.2:y"
    assert _udp_delivered(sink, OTHER, port, "asked")


@pytest.mark.xfail(strict=True, reason="nginx cannot bind 0.0.0.0:port on reload while it holds 127.0.0.1:port")
def test_switching_a_running_sidecar_to_every_address(kube_api: KubeApiServer, proxyctl, tcp_echoes) -> None:
    port, target = free_port(), free_port()
    tcp_echoes("127.0.0.2", target)
    kube_api.add_pod("agent", NS, AGENT, node="node-a", ip="127.0.0.2")
    sidecar = proxyctl(_routes(port, target))

    sidecar.configmap.write(sidecar.with_health(_routes(port, target, "listenAddress: 0.0.0.0\n")))
    wait_for(lambda: _answers_at(OTHER, port) or "rejected the new config" in sidecar.log(), 10,
             what="the switch applied or refused")
    assert _answers_at(OTHER, port), sidecar.log()


def _udp_delivered(sink, host: str, port: int, tag: str) -> bool:
    """Whether datagrams sent to `host` reach the backend; decided once a marker sent after them has arrived."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        for i in range(10):
            client.sendto(f"{tag}-{host}:{i}|c".encode(), (host, port))
        marker = f"{tag}-marker:1|c".encode()
        client.sendto(marker, ("127.0.0.1", port))
    wait_for(lambda: marker in sink.received, 5, what="the marker through 127.0.0.1")
    return any(d.startswith(f"{tag}-{host}:".encode()) for d in sink.received)


def _answers_at(host: str, port: int) -> bool:
    try:
        return tcp_exchange(port, b"y", host=host) == b"127.0.0.2:y"
    except OSError:
        return False
