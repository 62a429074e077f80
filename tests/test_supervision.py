"""How proxyctl keeps its nginx in hand: dying together, one owner per state dir, signals, retries, rates, logs."""

from __future__ import annotations

import logging
import os
import resource
import shlex
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest

from proxyctl.nginx import Nginx
from tests.harness import Proxyctl
from tests.kubeapi import KubeApiServer
from tests.support import free_port, tcp_exchange, wait_for

NS = "monitoring"
AGENT = {"app": "agent"}
RESTART_READY = 2.0  # seconds: a new proxyctl on the state dir of a killed one serves within this


def routes(port: int) -> str:
    return (f"routes:\n  - {{name: statsd, port: {port}, protocol: udp, selector: app=agent, namespace: {NS}}}\n"
            f"  - {{name: forward, port: {port}, protocol: tcp, selector: app=agent, namespace: {NS}}}\n")


def nginx_group(sidecar: Proxyctl) -> set[int]:
    """Every process of the sidecar's nginx: each master's process group holds its workers."""
    groups = {str(pid) for pid in sidecar.nginx_pids()}
    found = set()
    for entry in Path("/proc").iterdir():
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[2] in groups and fields[0] != "Z":
            found.add(int(entry.name))
    return found


def alive(pids: set[int]) -> set[int]:
    def running(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except (OSError, IndexError):
            return False
    return {pid for pid in pids if running(pid)}


def send(port: int, payload: bytes) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.sendto(payload, ("127.0.0.1", port))


@pytest.fixture
def again(kube_api: KubeApiServer) -> Iterator[list[Proxyctl]]:
    """proxyctl processes a test starts by hand (on another one's root); killed at the end."""
    made: list[Proxyctl] = []
    yield made
    for process in made:
        process.kill()


def restart_on(old: Proxyctl, kube_api: KubeApiServer, port: int, again: list[Proxyctl]) -> tuple[Proxyctl, float]:
    """A new proxyctl on `old`'s state dir and ports; seconds until its /readyz answers 200."""
    new = Proxyctl(old.root, kube_api, routes(port))
    again.append(new)
    started = time.monotonic()
    new.start(wait_ready=False)
    wait_for(lambda: new.get("/readyz")[0] == 200, 10, interval=0.01, what=f"/readyz 200; log:\n{new.log()}")
    return new, time.monotonic() - started


def test_proxyctl_killed_outright_takes_its_nginx_with_it_and_a_new_one_serves_at_once(
        kube_api: KubeApiServer, proxyctl, udp_sinks, again) -> None:
    port = free_port()
    sink = udp_sinks("127.0.0.2", port)
    kube_api.add_pod("agent", NS, AGENT, node="node-a", ip="127.0.0.2")
    sidecar = proxyctl(routes(port))
    processes = nginx_group(sidecar)
    assert len(processes) == 4  # a master and a worker per route

    sidecar.process.kill()
    sidecar.process.wait()
    wait_for(lambda: not alive(processes), 5, what="every nginx process of the killed proxyctl gone")

    new, ready_after = restart_on(sidecar, kube_api, port, again)
    print(f"\nrestart after SIGKILL: ready in {ready_after * 1000:.0f} ms")
    assert ready_after < RESTART_READY
    send(port, b"after:1|c")
    wait_for(lambda: b"after:1|c" in sink.received, 5, what="a datagram through the new proxyctl")


def test_a_new_proxyctl_ends_an_nginx_left_holding_the_ports(kube_api: KubeApiServer, proxyctl, tcp_echoes,
                                                             again) -> None:
    port = free_port()
    tcp_echoes("127.0.0.2", port)
    kube_api.add_pod("agent", NS, AGENT, node="node-a", ip="127.0.0.2")
    sidecar = proxyctl(routes(port))
    processes = nginx_group(sidecar)
    for master in sidecar.nginx_pids():  # a stopped master cannot act on the signal its parent's death sends
        os.kill(master, signal.SIGSTOP)
    sidecar.process.kill()
    sidecar.process.wait()
    assert tcp_exchange(port, b"stale") == b"127.0.0.2:stale"  # the old workers still hold the ports

    new, ready_after = restart_on(sidecar, kube_api, port, again)
    print(f"\nrestart over a stale nginx: ready in {ready_after * 1000:.0f} ms")
    assert ready_after < RESTART_READY
    assert not alive(processes)
    assert "ended an nginx left running by an earlier proxyctl" in new.log()
    assert tcp_exchange(port, b"fresh") == b"127.0.0.2:fresh"
    assert alive(nginx_group(new)) and not alive(processes)


def test_a_second_proxyctl_on_the_same_state_dir_is_refused(kube_api: KubeApiServer, proxyctl, udp_sinks,
                                                           tmp_path: Path, again) -> None:
    port = free_port()
    sink = udp_sinks("127.0.0.2", port)
    kube_api.add_pod("agent", NS, AGENT, node="node-a", ip="127.0.0.2")
    first = proxyctl(routes(port))
    second = Proxyctl(tmp_path / "second", kube_api, routes(free_port()))
    second.state_dir = first.state_dir
    again.append(second)
    second.start(wait_ready=False)
    assert second.process.wait(10) == 1
    errors = [line for line in second.log().splitlines() if " ERROR " in line]
    assert errors == [errors[0]] and f"state dir {first.state_dir} is in use by another proxyctl " \
                                      f"(pid {first.process.pid})" in errors[0], second.log()
    assert "Traceback" not in second.log() and "watching pods" not in second.log()
    send(port, b"first:1|c")
    wait_for(lambda: b"first:1|c" in sink.received, 5, what="the first proxyctl still forwarding")


def test_a_state_dir_it_cannot_write_is_one_clear_line_and_exit_1_before_any_watch(
        kube_api: KubeApiServer, tmp_path: Path, again) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    sidecar = Proxyctl(tmp_path / "p", kube_api, routes(free_port()))
    sidecar.state_dir = blocker / "state"
    again.append(sidecar)
    sidecar.start(wait_ready=False)
    assert sidecar.process.wait(10) == 1
    lines = sidecar.log().splitlines()
    assert len(lines) == 1 and f"state dir {blocker / 'state'} is not writable (Not a directory)" in lines[0], lines


def test_a_health_port_already_taken_is_one_clear_line_and_exit_1(kube_api: KubeApiServer, tmp_path: Path,
                                                                   again) -> None:
    sidecar = Proxyctl(tmp_path / "p", kube_api, routes(free_port()))
    again.append(sidecar)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", sidecar.health_port))
        taken.listen()
        sidecar.start(wait_ready=False)
        assert sidecar.process.wait(20) == 1
    log = sidecar.log()
    assert f"cannot serve health on 127.0.0.1:{sidecar.health_port}: Address already in use" in log, log
    assert "Traceback" not in log, log


def test_hup_usr1_usr2_do_not_stop_it_and_quit_stops_it_like_term(kube_api: KubeApiServer, proxyctl,
                                                                  udp_sinks) -> None:
    port = free_port()
    sink = udp_sinks("127.0.0.2", port)
    kube_api.add_pod("agent", NS, AGENT, node="node-a", ip="127.0.0.2")
    sidecar = proxyctl(routes(port))
    processes = nginx_group(sidecar)
    for n, signum in enumerate((signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2), 1):
        sidecar.process.send_signal(signum)
        wait_for(lambda: f"signal {signum.name}:" in sidecar.log(), 5, what=f"{signum.name} logged")
        send(port, b"still:%d|c" % n)
        wait_for(lambda: b"still:%d|c" % n in sink.received, 5, what=f"forwarding after {signum.name}")
    assert sidecar.process.poll() is None and sidecar.get("/readyz")[0] == 200
    assert "signal SIGHUP: reading the config file again" in sidecar.log()

    assert sidecar.stop(signal.SIGQUIT, timeout=30) == 0
    assert "signal SIGQUIT: draining and stopping" in sidecar.log()
    wait_for(lambda: not alive(processes), 5, what="nginx gone with proxyctl")


@pytest.mark.timeout(90)
def test_a_pod_change_while_nginx_is_stopped_is_applied_soon_after_it_resumes(kube_api: KubeApiServer, proxyctl,
                                                                             udp_sinks) -> None:
    port = free_port()
    udp_sinks("127.0.0.2", port)
    new = udp_sinks("127.0.0.3", port)
    kube_api.add_pod("agent-old", NS, AGENT, node="node-a", ip="127.0.0.2")
    sidecar = proxyctl(f"routes:\n  - {{name: statsd, port: {port}, protocol: udp, selector: app=agent, "
                       f"namespace: {NS}}}\n")
    master = sidecar.nginx_pid()
    os.kill(master, signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        kube_api.add_pod("agent-new", NS, AGENT, node="node-a", ip="127.0.0.3")
        kube_api.delete_pod(NS, "agent-old")
        wait_for(lambda: "nginx has not taken the change, trying again" in sidecar.log(), 10,
                 what="the reload timing out")
        code, body = sidecar.get("/readyz")
        assert code == 503 and "route statsd: the latest change is not applied yet, retrying" in body, body
        assert sidecar.metric("proxyctl_ready") == 0
        time.sleep(max(0.0, stopped + 12 - time.monotonic()))  # the fault itself: 12 s stopped
    finally:
        os.kill(master, signal.SIGCONT)
    resumed = time.monotonic()

    def converged() -> bool:
        send(port, b"probe:1|c")
        return bool(new.received) and sidecar.get("/readyz")[0] == 200

    wait_for(converged, 10, interval=0.05, what="the change applied and /readyz 200")
    print(f"\nnginx stopped 12 s during a pod change: converged {time.monotonic() - resumed:.2f} s after it resumed")
    assert time.monotonic() - resumed < 5
    assert sidecar.metric("proxyctl_ready") == 1


@pytest.mark.timeout(90)
def test_a_flapping_pod_reloads_at_a_bounded_rate_and_drains_a_bounded_number_of_workers(
        kube_api: KubeApiServer, proxyctl, tcp_echoes) -> None:
    from proxyctl.dataplane import MAX_DRAINING, RELOAD_BURST, RELOADS_PER_SECOND

    port = free_port()
    tcp_echoes("127.0.0.2", port)
    tcp_echoes("127.0.0.3", port)
    kube_api.add_pod("steady", NS, AGENT, node="node-a", ip="127.0.0.2")
    kube_api.add_pod("flapping", NS, AGENT, node="node-a", ip="127.0.0.3")
    sidecar = proxyctl(f"routes:\n  - {{name: forward, port: {port}, protocol: tcp, selector: app=agent, "
                       f"namespace: {NS}}}\n")
    master = sidecar.nginx_pid()
    reloads = sidecar.metric("proxyctl_reloads_total") or 0
    held: list[socket.socket] = []
    most_workers, flaps, started = 0, 0, time.monotonic()
    try:
        while time.monotonic() - started < 6:  # ready, not ready, ... every 50 ms; a new stream every 100 ms
            kube_api.update_pod(NS, "flapping", ready=flaps % 2 == 1)
            flaps += 1
            if flaps % 2 == 0:
                conn = socket.create_connection(("127.0.0.1", port), timeout=5)
                held.append(conn)
                conn.sendall(b"x")
            most_workers = max(most_workers, len(Path(f"/proc/{master}/task/{master}/children").read_text().split()))
            time.sleep(0.05)
        lasted = time.monotonic() - started
        kube_api.update_pod(NS, "flapping", ready=True)
        wait_for(lambda: '"127.0.0.3:' in sidecar.get("/routes")[1], 10, what="the pod's last state, ready")
        done = (sidecar.metric("proxyctl_reloads_total") or 0) - reloads
    finally:
        for conn in held:
            conn.close()
    print(f"\n{flaps} pod changes in {lasted:.1f} s: {done:.0f} reloads, at most {most_workers} nginx workers")
    assert done <= RELOAD_BURST + RELOADS_PER_SECOND * (lasted + 1) + 1
    assert most_workers <= 1 + MAX_DRAINING + 1  # the newest old worker may live a moment before it is closed
    assert done >= RELOADS_PER_SECOND * lasted / 2  # it kept applying changes meanwhile
    assert "more than 8 old nginx workers draining" in sidecar.log()


def test_a_flood_of_nginx_error_lines_never_blocks_its_traffic(tmp_path: Path, nginx_stream_module: str | None,
                                                               tcp_echoes) -> None:
    """The log reader stops (here: the handler it logs through is held, as a full stderr would hold it).

    One server of the nginx fails every connection with an error line; the other must keep
    forwarding once the pipe is full: nginx drops lines rather than wait.
    """
    failing, working, nowhere = free_port(), free_port(), free_port()
    echo = tcp_echoes("127.0.0.2", working)
    load = f"load_module {nginx_stream_module};\n" if nginx_stream_module else ""
    nginx = Nginx(tmp_path)
    nginx.write(f"""{load}daemon off;
pid "{tmp_path}/nginx.pid";
error_log stderr notice;
events {{ worker_connections 1024; }}
stream {{
    server {{ listen 127.0.0.1:{failing}; proxy_pass 127.0.0.2:{nowhere}; }}
    server {{ listen 127.0.0.1:{working}; proxy_pass 127.0.0.2:{working}; }}
}}
""")
    handler = logging.StreamHandler(open(os.devnull, "w"))
    lines: list[str] = []
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("proxyctl.nginx")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    nginx.start()
    try:
        handler.acquire()  # the reader thread blocks in its next log call: nobody reads the pipe
        try:
            failed = 0
            for _ in range(1500):  # ~200 bytes of [error] each: several times the 64 KiB a pipe holds
                with socket.create_connection(("127.0.0.1", failing), timeout=5) as conn:
                    failed += conn.recv(1) == b""
            assert failed == 1500
            answered = [tcp_exchange(working, b"ping-%d" % i, timeout=5) for i in range(20)]
            assert answered == [b"127.0.0.2:ping-%d" % i for i in range(20)]
        finally:
            handler.release()
        wait_for(lambda: any("no live upstreams" in line or "connect() failed" in line for line in lines), 5,
                 what="the reader going on")
        logged = sum("no live upstreams" in line or "connect() failed" in line for line in lines)
        print(f"\n1500 failed connections while nobody read nginx's log: {logged} of their lines logged, "
              f"the rest dropped by nginx; 20/20 requests on the other server answered")
        assert logged < 1500  # the pipe was full and nginx went on without writing
        assert echo.connections == 20
    finally:
        logger.removeHandler(handler)
        nginx.stop(grace=1)


class TinyStateDir(Proxyctl):
    """`proxyctl run` whose state dir is a tmpfs of 256 KiB in a mount namespace of its own."""

    fill_first = False

    def command(self) -> list[str]:
        state = shlex.quote(str(self.state_dir))
        fill = f"dd if=/dev/zero of={state}/filler bs=4k 2>/dev/null; " if self.fill_first else ""
        return ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                f"mkdir -p {state} && mount -t tmpfs -o size=256k tmpfs {state} && {fill}"
                f"exec {' '.join(shlex.quote(a) for a in super().command())}"]

    def inside(self, command: str) -> subprocess.CompletedProcess[str]:
        """Run a shell command in the sidecar's mount namespace, where its tmpfs is."""
        assert self.process is not None
        return subprocess.run(["nsenter", "-t", str(self.process.pid), "-m", "sh", "-c", command],
                              capture_output=True, text=True, timeout=30)

    def fill(self) -> None:
        result = self.inside(f"dd if=/dev/zero of={shlex.quote(str(self.state_dir))}/filler bs=4k")
        assert "No space left on device" in result.stderr, result

    def make_room(self) -> None:
        assert self.inside(f"rm {shlex.quote(str(self.state_dir))}/filler").returncode == 0


def _mount_namespace_problem() -> str | None:
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                            "mount -t tmpfs -o size=64k tmpfs /mnt"], capture_output=True, text=True)
    return None if probe.returncode == 0 else probe.stderr.strip() or f"exit {probe.returncode}"


def test_a_full_state_dir_keeps_the_last_good_config_serving_and_retries_until_there_is_room(
        kube_api: KubeApiServer, tmp_path: Path, udp_sinks, again) -> None:
    problem = _mount_namespace_problem()
    if problem:
        pytest.skip(f"no private tmpfs here: {problem}")
    port = free_port()
    old, new = udp_sinks("127.0.0.2", port), udp_sinks("127.0.0.3", port)
    kube_api.add_pod("agent-old", NS, AGENT, node="node-a", ip="127.0.0.2")
    sidecar = TinyStateDir(tmp_path / "p", kube_api, f"routes:\n  - {{name: statsd, port: {port}, protocol: udp, "
                                                     f"selector: app=agent, namespace: {NS}}}\n")
    again.append(sidecar)
    sidecar.start()
    sidecar.fill()
    kube_api.add_pod("agent-new", NS, AGENT, node="node-a", ip="127.0.0.3")
    kube_api.delete_pod(NS, "agent-old")

    said = f"{sidecar.state_dir}/routes/statsd/nginx.conf.candidate: No space left on device"
    wait_for(lambda: said in sidecar.log(), 10, what="the full disk, located, in the log")
    code, body = sidecar.get("/readyz")
    assert code == 503 and said in body, body
    send(port, b"meanwhile:1|c")
    wait_for(lambda: b"meanwhile:1|c" in old.received, 5, what="the last good config still forwarding")
    assert sidecar.process.poll() is None and "Traceback" not in sidecar.log()

    sidecar.make_room()

    def converged() -> bool:
        send(port, b"after:1|c")
        return b"after:1|c" in new.received and sidecar.get("/readyz")[0] == 200

    wait_for(converged, 10, interval=0.05, what="the change applied once there is room")


def test_a_full_state_dir_at_start_up_is_one_clear_line_and_exit_1(kube_api: KubeApiServer, tmp_path: Path,
                                                                   again) -> None:
    problem = _mount_namespace_problem()
    if problem:
        pytest.skip(f"no private tmpfs here: {problem}")
    sidecar = TinyStateDir(tmp_path / "p", kube_api, routes(free_port()))
    sidecar.fill_first = True
    again.append(sidecar)
    sidecar.start(wait_ready=False)
    assert sidecar.process.wait(10) == 1
    lines = sidecar.log().splitlines()
    assert len(lines) == 1 and f"cannot write state dir {sidecar.state_dir}: " in lines[0] \
        and "No space left on device" in lines[0], lines


def test_out_of_file_descriptors_keeps_the_last_good_config_serving_and_recovers(kube_api: KubeApiServer, proxyctl,
                                                                                udp_sinks) -> None:
    port = free_port()
    old, new = udp_sinks("127.0.0.2", port), udp_sinks("127.0.0.3", port)
    kube_api.add_pod("agent-old", NS, AGENT, node="node-a", ip="127.0.0.2")
    sidecar = proxyctl(f"routes:\n  - {{name: statsd, port: {port}, protocol: udp, selector: app=agent, "
                       f"namespace: {NS}}}\n")
    pid = sidecar.process.pid
    limits = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (len(os.listdir(f"/proc/{pid}/fd")), limits[1]))
    try:
        kube_api.add_pod("agent-new", NS, AGENT, node="node-a", ip="127.0.0.3")
        kube_api.delete_pod(NS, "agent-old")
        wait_for(lambda: "Too many open files" in sidecar.log(), 10, what="EMFILE in the log")
        send(port, b"meanwhile:1|c")
        wait_for(lambda: b"meanwhile:1|c" in old.received, 5, what="the last good config still forwarding")
        assert sidecar.process.poll() is None
    finally:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, limits)

    def converged() -> bool:
        send(port, b"after:1|c")
        return b"after:1|c" in new.received and sidecar.get("/readyz")[0] == 200

    wait_for(converged, 10, interval=0.05, what="the change applied once files can be opened")
    assert "Traceback" not in sidecar.log()


class WithTemplate(Proxyctl):
    template: Path

    def command(self) -> list[str]:
        return [*super().command(), "--template", str(self.template)]


def test_an_unexpected_error_in_one_pass_of_the_loop_is_logged_and_the_loop_goes_on(
        kube_api: KubeApiServer, tmp_path: Path, udp_sinks, again) -> None:
    """A --template that fails when a route has two backends: an error no check before it catches."""
    from proxyctl.render import default_template

    port = free_port()
    sinks = {host: udp_sinks(host, port) for host in ("127.0.0.2", "127.0.0.3", "127.0.0.4")}
    template = tmp_path / "nginx.conf.j2"
    template.write_text("{% for backends in endpoints.values() if backends|length > 1 %}{{ no_such_value }}"
                        "{% endfor %}" + default_template().read_text())
    kube_api.add_pod("agent-a", NS, AGENT, node="node-a", ip="127.0.0.2")
    sidecar = WithTemplate(tmp_path / "p", kube_api, f"routes:\n  - {{name: statsd, port: {port}, protocol: udp, "
                                                     f"selector: app=agent, namespace: {NS}}}\n")
    sidecar.template = template
    again.append(sidecar)
    sidecar.start()

    kube_api.add_pod("agent-b", NS, AGENT, node="node-a", ip="127.0.0.3")
    wait_for(lambda: "unexpected error, carrying on: UndefinedError: 'no_such_value' is undefined" in sidecar.log(),
             10, what="the error logged")
    assert "Traceback" not in sidecar.log()
    kube_api.delete_pod(NS, "agent-a")
    kube_api.delete_pod(NS, "agent-b")
    kube_api.add_pod("agent-c", NS, AGENT, node="node-a", ip="127.0.0.4")

    def moved() -> bool:
        send(port, b"later:1|c")
        return b"later:1|c" in sinks["127.0.0.4"].received

    wait_for(moved, 10, interval=0.05, what="a later change applied: the loop lives on")
    assert sidecar.process.poll() is None
