"""The image as a pod runs it: uid 10001, read-only root, state on a tmpfs, in-cluster config over HTTPS.

The container shares the host's network (its loopback is ours), reaches the test API server
as `KUBERNETES_SERVICE_HOST`, and reads a service-account token, CA and namespace mounted where
the kubelet mounts them. Needs docker or podman and the image (`make image`; .ci/run builds it
and sets PROXYCTL_IMAGE, which turns a skip into a failure).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import subprocess
import uuid
from pathlib import Path
from typing import Iterator

import pytest
from kubernetes import client, config

from tests.harness import ConfigMapDir
from tests.kubeapi import KubeApiServer, self_signed_tls
from tests.support import UdpSink, free_port, http_get, wait_for

ROOT = Path(__file__).resolve().parent.parent
IMAGE = os.environ.get("PROXYCTL_IMAGE", "proxyctl:0.1.0")
NS = "monitoring"
AGENT = {"app": "agent"}
SERVICE_ACCOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"


def container_engine() -> list[str] | None:
    """docker where its daemon answers, else podman (with this repository's settings unless told others)."""
    if shutil.which("docker") and subprocess.run(["docker", "info"], capture_output=True).returncode == 0:
        return ["docker"]
    if shutil.which("podman"):
        os.environ.setdefault("CONTAINERS_CONF", str(ROOT / ".ci" / "containers.conf"))
        if subprocess.run(["podman", "info"], capture_output=True).returncode == 0:
            return ["podman"]
    return None


def _skip_or_fail(reason: str) -> None:
    if "PROXYCTL_IMAGE" in os.environ:  # .ci/run: the image test must run
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def engine() -> list[str]:
    found = container_engine()
    if found is None:
        _skip_or_fail("no container engine can run containers here (docker or podman)")
    assert found is not None
    if subprocess.run([*found, "image", "inspect", IMAGE], capture_output=True).returncode != 0:
        _skip_or_fail(f"image {IMAGE} is not built: make image")
    return found


@pytest.fixture
def https_api(tmp_path: Path) -> Iterator[tuple[KubeApiServer, str]]:
    """The test API server over TLS, and its CA certificate."""
    tls, ca = self_signed_tls(tmp_path)
    server = KubeApiServer(tls=tls)
    server.start()
    try:
        yield server, ca
    finally:
        server.stop()


def test_the_in_cluster_client_reaches_the_test_api_server_over_tls(https_api, tmp_path: Path) -> None:
    """What every pod does: the kubernetes client's in-cluster loader, its `bearer` token, HTTPS."""
    server, ca = https_api
    server.add_pod("agent", NS, AGENT, node="node-a", ip="127.0.0.2")
    token = Path(server.write_token_file(tmp_path / "token"))
    configuration = client.Configuration()
    config.incluster_config.InClusterConfigLoader(
        token_filename=str(token), cert_filename=ca,
        environ={"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": str(server.port)},
    ).load_and_set(configuration)
    assert configuration.api_key["BearerToken"].startswith("bearer ")
    pods = client.CoreV1Api(client.ApiClient(configuration)).list_namespaced_pod(NS)
    assert [p.metadata.name for p in pods.items] == ["agent"]


class Container:
    """`ENGINE run IMAGE run` as a pod would run it, in the foreground; stopped at the end."""

    def __init__(self, engine: list[str], root: Path, api: KubeApiServer, ca: str, config: str) -> None:
        self.engine, self.name = engine, f"proxyctl-test-{uuid.uuid4().hex[:8]}"
        self.health = free_port()
        self.configmap = ConfigMapDir(root / "config")
        self.write(config)
        secrets = root / "serviceaccount"
        secrets.mkdir()
        api.write_token_file(secrets / "token")
        shutil.copy(ca, secrets / "ca.crt")
        (secrets / "namespace").write_text("apps")
        for path in (root / "config", secrets):
            path.chmod(0o755)
        self.log_path = root / "container.log"
        self.command = [
            *engine, "run", "--rm", "--name", self.name, "--network", "host", "--user", "10001:10001",
            "--read-only", "--tmpfs", "/var/run/proxyctl",
            "-v", f"{root / 'config'}:/etc/proxyctl:ro", "-v", f"{secrets}:{SERVICE_ACCOUNT}:ro",
            "-e", "KUBERNETES_SERVICE_HOST=127.0.0.1", "-e", f"KUBERNETES_SERVICE_PORT={api.port}",
            "-e", "NODE_NAME=node-a", IMAGE,
        ]
        self.process: subprocess.Popen[bytes] | None = None

    def write(self, config: str) -> None:
        self.configmap.write(f"health: 127.0.0.1:{self.health}\n{config}")

    def start(self) -> Container:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT)
        return self

    def exited(self) -> bool:
        return self.process is not None and self.process.poll() is not None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def get(self, path: str) -> tuple[int, str]:
        return http_get(self.health, path)

    def exec(self, *command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self.engine, "exec", self.name, *command], capture_output=True, text=True)

    def remove(self) -> None:
        subprocess.run([*self.engine, "rm", "--force", self.name], capture_output=True)
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def test_the_ca_bundle_given_to_the_build_is_not_in_the_image(engine: list[str]) -> None:
    """`make image` passes this machine's CA bundle for pip as a build secret; no file of the image is it."""
    bundle = next((Path(os.environ[v]) for v in ("PIP_CERT", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE")
                   if os.environ.get(v) and Path(os.environ[v]).is_file()), None)
    if bundle is None:
        pytest.skip("no CA bundle was given to the build")
    digest = hashlib.sha256(bundle.read_bytes()).hexdigest()
    found = subprocess.run([*engine, "run", "--rm", "--user", "0", "--entrypoint", "sh", IMAGE, "-c",
                            f"find / -xdev -type f -size {bundle.stat().st_size}c -exec sha256sum {{}} +"],
                           capture_output=True, text=True)
    assert found.returncode == 0, found.stderr
    assert digest not in found.stdout, found.stdout


def udp_route(name: str, port: int) -> str:
    return f"routes:\n  - {{name: {name}, port: {port}, protocol: UDP, selector: app=agent, namespace: {NS}}}\n"


def send(port: int, payload: bytes) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.sendto(payload, ("127.0.0.1", port))


def test_the_image_forwards_follows_a_config_swap_and_stops_on_sigterm(engine: list[str], https_api,
                                                                       tmp_path: Path) -> None:
    server, ca = https_api
    first, second = free_port(), free_port()
    sinks = [UdpSink("127.0.0.2", first), UdpSink("127.0.0.2", second)]
    server.add_pod("agent", NS, AGENT, node="node-a", ip="127.0.0.2")
    server.add_pod("elsewhere", NS, AGENT, node="node-b", ip="127.0.0.3")
    container = Container(engine, tmp_path, server, ca, udp_route("statsd", first)).start()
    try:
        try:
            wait_for(lambda: container.get("/readyz")[0] == 200 or container.exited(), 60,
                     what="/readyz 200 from the container")
            assert not container.exited(), "the container exited"
        except AssertionError as exc:
            raise AssertionError(f"{exc}; log:\n{container.log()}") from None
        assert container.exec("id", "-u").stdout.strip() == "10001"
        assert container.exec("touch", "/etc/x").returncode != 0, "the root filesystem is writable"
        # podman's tmpfs is root's, mode 1755: proxyctl falls back to a dir in podman's /tmp tmpfs.
        state = re.search(r"using (/\S+)", container.log())
        state_dir = state.group(1) if state else "/var/run/proxyctl"
        assert container.exec("stat", "-f", "-c", "%T", state_dir).stdout.strip() == "tmpfs", container.log()
        assert container.exec("test", "-s", f"{state_dir}/routes/statsd/nginx.conf").returncode == 0
        assert any(r.status == 200 for r in server.requests), "no request of the container was answered"

        wait_for(lambda: (send(first, b"one:1|c"), sinks[0].received)[1], 10, what="a datagram at the agent")
        assert sinks[0].received[0] == b"one:1|c"

        container.write(udp_route("statsd-moved", second))
        wait_for(lambda: f'"port": {second}' in container.get("/routes")[1], 30, what="the swapped config served")
        wait_for(lambda: (send(second, b"two:1|c"), sinks[1].received)[1], 10, what="a datagram on the new port")
        assert sinks[1].received[0] == b"two:1|c"

        subprocess.run([*engine, "kill", "--signal", "TERM", container.name], check=True, capture_output=True)
        assert container.process is not None
        assert container.process.wait(40) == 0, container.log()
        assert "Traceback" not in container.log(), container.log()
    finally:
        container.remove()
        for sink in sinks:
            sink.close()
