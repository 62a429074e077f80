#!/usr/bin/env python3
"""`make demo`: proxyctl keeping localhost:PORT pointed at the DogStatsD agent on its node.

Everything is real but the cluster: nginx runs under `proxyctl run`, metrics go out through
the `datadog` client library, and the agent "pods" are UDP listeners on 127.0.0.2-4. The
Kubernetes API server is the one the tests use (tests/kubeapi.py), so the demo needs no
cluster and sends nothing beyond loopback.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from functools import partial
from pathlib import Path
from typing import Callable, NoReturn

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the test API server and the loopback sinks live in tests/

from datadog.dogstatsd import DogStatsd  # noqa: E402
from tests.kubeapi import KubeApiServer  # noqa: E402
from tests.support import UdpSink, free_port, wait_for  # noqa: E402

NODE, OTHER_NODE = "node-a", "node-b"
NAMESPACE, LABELS = "monitoring", {"app": "datadog-agent"}
OLD_IP, NEW_IP, OTHER_IP = "127.0.0.2", "127.0.0.3", "127.0.0.4"
NAMES = {OLD_IP: "datadog-agent-7k2xq", NEW_IP: "datadog-agent-zx81c", OTHER_IP: "datadog-agent-p9d4m"}
SETTLED = 20  # datagrams in a row at the new agent that count as "moved"
# Variables of the caller's shell that would change what proxyctl does, or send its API
# requests through a proxy instead of to the loopback test server.
NOT_INHERITED = ("PORT", "SOURCE_PORT", "TARGET_PORT", "SELECTOR", "PROTOCOL", "NAMESPACE", "LOG_LEVEL",
                 "PROXYCTL_CONFIG", "KUBERNETES_SERVICE_HOST", "MY_POD_NAME", "MY_POD_NAMESPACE", "POD_NAME",
                 "http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")
# No proxy for the health server either: urllib would otherwise honour http_proxy.
HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_start = time.monotonic()
_print_lock = threading.Lock()


def say(text: str) -> None:
    """One line, stamped with seconds since the demo started; proxyctl's log interleaves."""
    with _print_lock:
        print(f"{time.monotonic() - _start:6.2f}s  {text}", flush=True)


def http_get(url: str) -> tuple[int, str]:
    try:
        with HTTP.open(url, timeout=2) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()
    except OSError:
        return 0, ""


# --- the agent pods: UDP listeners on loopback addresses ----------------------------------------


def open_sinks() -> tuple[int, dict[str, UdpSink]]:
    """One port on which all three agent addresses can listen (each pod has its own IP)."""
    for _ in range(20):
        port, sinks = free_port(), {}
        try:
            for ip in (OLD_IP, NEW_IP, OTHER_IP):
                sinks[ip] = UdpSink(ip, port)
            return port, sinks
        except OSError:  # taken on one of the other addresses: try another port
            for sink in sinks.values():
                sink.close()
    raise RuntimeError("no UDP port free on 127.0.0.2-4")


def add_agent(api: KubeApiServer, name: str, node: str, ip: str, port: int) -> None:
    api.add_pod(name, NAMESPACE, LABELS, node=node, ip=ip,
                ports=[{"name": "dogstatsd", "containerPort": port, "protocol": "UDP"}])
    where = "this pod's node" if node == NODE else "another node"
    say(f"pod {NAMESPACE}/{name} is Ready on {node} ({where}), IP {ip}")


def received(sinks: dict[str, UdpSink]) -> dict[str, int]:
    return {ip: len(sink.received) for ip, sink in sinks.items()}


def landing(sinks: dict[str, UdpSink], before: dict[str, int], timeout: float = 1.0) -> str | None:
    """The address of the agent that got the next datagram, or None when none did in time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for ip, count in received(sinks).items():
            if count > before[ip]:
                return ip
        time.sleep(0.001)
    return None


def send_and_trace(metrics: list[tuple[str, Callable[[], None]]], sinks: dict[str, UdpSink]) -> None:
    """Send one metric at a time and show which agent it reached."""
    for what, send in metrics:
        before = received(sinks)
        send()
        ip = landing(sinks, before)
        if ip is None:
            raise RuntimeError(f"{what}: reached no agent within 1 s")
        say(f"  {what:<28} -> {ip} {NAMES[ip]}: {sinks[ip].received[before[ip]].decode()!r}")


# --- proxyctl run, as a child process --------------------------------------------------------------


def follow_log(process: subprocess.Popen[str]) -> None:
    """Show proxyctl's JSON log lines as they come, next to what the demo does."""
    assert process.stderr is not None
    for line in process.stderr:
        try:
            entry = json.loads(line)
            text = f"{entry['level']:<7} {entry['message']}"
        except (ValueError, KeyError, TypeError):
            text = line.rstrip()
        for part in text.splitlines():
            say(f"    proxyctl | {part}")


def start_proxyctl(config: Path, state: Path, kubeconfig: str) -> tuple[subprocess.Popen[str], threading.Thread]:
    env = {k: v for k, v in os.environ.items() if k not in NOT_INHERITED}
    env.update(NODE_NAME=NODE, POD_NAMESPACE="default", KUBECONFIG=kubeconfig, LOG_FORMAT="json")
    say(f"$ NODE_NAME={NODE} proxyctl run --config {config} --state-dir {state}")
    process = subprocess.Popen([sys.executable, "-m", "proxyctl", "run", "--config", str(config),
                                "--state-dir", str(state)], env=env, cwd=REPO, stdin=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    follower = threading.Thread(target=follow_log, args=(process,), daemon=True)
    follower.start()
    return process, follower


def stop_proxyctl(process: subprocess.Popen[str], follower: threading.Thread, state: Path) -> int:
    """SIGTERM, as the kubelet sends it; whatever still runs after that is killed."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    follower.join(5)
    # Each route's nginx runs in its own session; it removes its pid file when it exits, so a
    # file left behind means proxyctl could not stop it.
    for pid_file in state.glob("routes/*/nginx.pid"):
        with contextlib.suppress(OSError, ValueError):
            pid = int(pid_file.read_text())
            if b"nginx" in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.killpg(pid, signal.SIGKILL)
    return process.returncode


def switch(statsd: DogStatsd, sinks: dict[str, UdpSink], deadline: float) -> list[tuple[str | None, float]]:
    """Send metrics back to back, as a busy app would, until SETTLED in a row reach the new agent.

    Returns where each one landed (None: lost), and when.
    """
    landed: list[tuple[str | None, float]] = []
    while [ip for ip, _ in landed[-SETTLED:]] != [NEW_IP] * SETTLED and time.monotonic() < deadline:
        before = received(sinks)
        statsd.increment("demo.during_switch")
        landed.append((landing(sinks, before, 0.5), time.monotonic()))
    return landed


# --- the story -----------------------------------------------------------------------------------


def demo(stack: contextlib.ExitStack) -> int:
    work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="proxyctl-demo-")))
    port, sinks = open_sinks()
    for sink in sinks.values():
        stack.callback(sink.close)
    print(f"proxyctl demo: localhost:{port}/udp -> the DogStatsD agent on this pod's node ({NODE})\n")

    api = KubeApiServer()
    api.start()
    stack.callback(api.stop)
    say(f"Kubernetes API (a test server, no real cluster) at {api.url}")
    add_agent(api, NAMES[OLD_IP], NODE, OLD_IP, port)
    add_agent(api, NAMES[OTHER_IP], OTHER_NODE, OTHER_IP, port)

    health = f"127.0.0.1:{free_port()}"
    (work / "config").mkdir()
    config = work / "config" / "proxyctl.yaml"
    config.write_text(f"health: {health}\nroutes:\n  - name: dogstatsd\n    port: {port}\n    protocol: udp\n"
                      f"    selector: app=datadog-agent\n    namespace: {NAMESPACE}\n")
    state = work / "state"
    process, follower = start_proxyctl(config, state, api.write_kubeconfig(work / "kubeconfig"))
    stack.callback(stop_proxyctl, process, follower, state)
    wait_for(lambda: http_get(f"http://{health}/readyz")[0] == 200 or process.poll() is not None, 20,
             what="/readyz")
    if process.poll() is not None:
        say(f"proxyctl exited with {process.returncode}")
        return 1
    say(f"GET /readyz -> 200: nginx serves localhost:{port}")

    statsd = DogStatsd(host="127.0.0.1", port=port, constant_tags=["env:demo"], disable_telemetry=True,
                       origin_detection_enabled=False)
    say(f"sending with the datadog client: DogStatsd(host='127.0.0.1', port={port})")
    send_and_trace([("increment demo.page_views", lambda: statsd.increment("demo.page_views")),
                    ("gauge demo.queue_depth 7", lambda: statsd.gauge("demo.queue_depth", 7)),
                    ("histogram demo.request_ms 42", lambda: statsd.histogram("demo.request_ms", 42))], sinks)
    show_routes(health)

    print()
    if not replace_agent(api, statsd, sinks, port):
        return 1
    again = partial(statsd.increment, "demo.page_views")
    send_and_trace([(f"increment demo.page_views #{i}", partial(again, tags=[f"n:{i}"])) for i in range(3)],
                   sinks)
    show_routes(health)
    for line in http_get(f"http://{health}/metrics")[1].splitlines():
        if line.startswith(("proxyctl_reloads_total", "proxyctl_route_backends", "proxyctl_config_valid")):
            say(f"GET /metrics: {line}")

    print()
    other = len(sinks[OTHER_IP].received)
    say(f"{NAMES[OTHER_IP]} on {OTHER_NODE} received {other} datagrams: only this node's pods are backends")
    say("SIGTERM to proxyctl, as the kubelet does when the pod stops")
    code = stop_proxyctl(process, follower, state)
    say(f"proxyctl exited with {code}")
    return 0 if code == 0 and other == 0 else 1


def replace_agent(api: KubeApiServer, statsd: DogStatsd, sinks: dict[str, UdpSink], port: int) -> bool:
    """What a DaemonSet rollout does to the agent pod; says how the traffic followed."""
    say(f"the agent is replaced: pod {NAMES[OLD_IP]} deleted, {NAMES[NEW_IP]} created at {NEW_IP}")
    changed_at = time.monotonic()
    api.delete_pod(NAMESPACE, NAMES[OLD_IP])
    add_agent(api, NAMES[NEW_IP], NODE, NEW_IP, port)
    landed = switch(statsd, sinks, changed_at + 10)
    where = [ip for ip, _ in landed]
    first_new = sinks[NEW_IP].first_at
    if first_new is None or where[-SETTLED:] != [NEW_IP] * SETTLED:
        say("the traffic did not move to the new agent within 10 s")
        return False
    last_old = max((at for ip, at in landed if ip == OLD_IP), default=changed_at)
    say(f"first datagram at the new agent {(first_new - changed_at) * 1000:.0f} ms after the pod change; "
        f"the last at the old one after {(last_old - changed_at) * 1000:.0f} ms")
    say(f"  {len(landed)} sent back to back meanwhile: {where.count(OLD_IP)} reached the old agent, "
        f"{where.count(NEW_IP)} the new one, {where.count(None)} lost")
    say("  (after a reload, nginx's old worker forwards what it still reads until it exits)")
    return True


def show_routes(health: str) -> None:
    say(f"GET /routes -> {json.loads(http_get(f'http://{health}/routes')[1])['routes']}")


def _interrupt(signum: int, frame: object) -> NoReturn:
    raise KeyboardInterrupt


def main() -> int:
    # Ctrl-C and SIGTERM both unwind through the ExitStack, which stops every process
    # started here and removes the temporary directory.
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        with contextlib.ExitStack() as stack:
            code = demo(stack)
    except KeyboardInterrupt:
        print("\ninterrupted: proxyctl and nginx stopped, temporary files removed", file=sys.stderr)
        return 130
    except (RuntimeError, AssertionError) as error:  # a step did not happen in time
        print(f"\ndemo failed: {error}", file=sys.stderr)
        return 1
    print("\ndone: proxyctl and nginx stopped, temporary files removed")
    return code


if __name__ == "__main__":
    sys.exit(main())
