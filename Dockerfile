# proxyctl: nginx (stream) kept in step with the pods on this node.
#
# Debian bookworm throughout: its python3 (3.11) runs proxyctl from a virtualenv, its nginx
# (1.22) with the stream module forwards. The base is pinned by tag; the Debian packages are
# left unpinned, since bookworm-security replaces nginx builds and an exact version pinned
# today stops installing when the next fix lands. Where no registry can be reached,
# .ci/debian-base makes debian:bookworm-slim from Debian's archive.

FROM debian:bookworm-slim AS build
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY proxyctl ./proxyctl
COPY templates ./templates
# Behind a TLS-intercepting proxy, pass its CA bundle for pip: `--secret id=pip-ca,src=FILE`.
# A secret mount is never part of a layer.
RUN --mount=type=secret,id=pip-ca \
    if [ -s /run/secrets/pip-ca ]; then export PIP_CERT=/run/secrets/pip-ca; fi \
    && python3 -m venv /opt/proxyctl \
    && /opt/proxyctl/bin/pip install --no-cache-dir --no-compile --disable-pip-version-check \
       -c constraints.txt . \
    # The kubernetes package's asyncio client (kubernetes.aio, two thirds of the package) and
    # the aiohttp it needs are never imported by proxyctl; tests ship inside some packages.
    && /opt/proxyctl/bin/pip uninstall --yes --disable-pip-version-check aiohttp aiohttp-retry aiosignal \
       aiohappyeyeballs yarl multidict frozenlist propcache attrs \
    && /opt/proxyctl/bin/pip uninstall --yes --disable-pip-version-check pip \
    && cd /opt/proxyctl/lib/python3.11/site-packages \
    && rm -rf kubernetes/aio kubernetes/dynamic/test_*.py kubernetes/*/test kubernetes/e2e_test setuptools \
       pkg_resources _distutils_hack distutils-precedence.pth \
    # Bytecode now: the root filesystem is read-only at run time, and compiling the kubernetes
    # client on every start would take seconds. The client's generated API and model classes
    # (33 MB of source) are kept as bytecode only.
    && /opt/proxyctl/bin/python -m compileall -q -b -j 0 kubernetes \
    && find kubernetes -name '*.py' -delete \
    && /opt/proxyctl/bin/python -m compileall -q -j 0 /opt/proxyctl/lib

FROM debian:bookworm-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/proxyctl/bin:$PATH
# nginx with the stream module (what `make deps` installs), python3 for the virtualenv, and
# tini as PID 1: it reaps what exits and passes SIGTERM on, so proxyctl can drain nginx.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nginx libnginx-mod-stream \
       python3 tini \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/* /var/log/apt /var/log/dpkg.log /var/cache/debconf/*-old
COPY --from=build /opt/proxyctl /opt/proxyctl

# A numeric user, so that the kubelet can check runAsNonRoot. The state dir is an emptyDir in
# a pod; here it is mode 1777 like /tmp, for any uid. A `--tmpfs` over it is root's with mode
# 1755 (podman applies the umask to this directory's mode): proxyctl then says so and uses a
# directory in /tmp, which `podman run --read-only` mounts as a tmpfs too.
RUN groupadd --system --gid 10001 proxyctl \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin proxyctl \
    && mkdir -p /var/run/proxyctl \
    && chmod 1777 /var/run/proxyctl
USER 10001:10001
WORKDIR /

# Health, readiness, metrics and /routes (listening on 127.0.0.1 unless `health` says otherwise).
EXPOSE 9901
ENTRYPOINT ["/usr/bin/tini", "--", "proxyctl"]
CMD ["run"]
