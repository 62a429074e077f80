# proxyctl: nginx (stream) kept in step with the pods on this node.
#
# The base image is pinned by tag; it fixes the Debian release (bookworm) and so the nginx
# series (1.22). The Debian packages are left unpinned: bookworm-security replaces nginx
# builds, so an exact version pinned today stops installing when the next fix lands, and
# which build the image gets cannot be checked without building it.
FROM python:3.12-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The install of `make deps` (nginx with the stream module), plus tini to be PID 1:
# it reaps what exits and passes SIGTERM on, so proxyctl can drain nginx.
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nginx libnginx-mod-stream tini \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY proxyctl ./proxyctl
COPY templates ./templates
RUN pip install -c constraints.txt . && cd / && rm -rf /src

# A numeric user, so that the kubelet can check runAsNonRoot. The state dir exists for
# `docker run`; in a pod it is an emptyDir, as the root filesystem is read-only there.
RUN groupadd --system --gid 10001 proxyctl \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin proxyctl \
    && mkdir -p /var/run/proxyctl \
    && chown 10001:10001 /var/run/proxyctl
USER 10001:10001
WORKDIR /

# Health, readiness, metrics and /routes (listening on 127.0.0.1 unless `health` says otherwise).
EXPOSE 9901
ENTRYPOINT ["/usr/bin/tini", "--", "proxyctl"]
CMD ["run"]
