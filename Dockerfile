# dns-sidecar: a DNS caching proxy run as a sidecar container in Amazon ECS tasks.
#
#   docker build -t dns-sidecar .
#   docker build --build-arg CLOUDMAP=true -t dns-sidecar:cloudmap .   # with boto3
#   docker run --rm dns-sidecar --version
#
# Two stages: the first builds a virtualenv in /opt/venv from pinned wheels (requirements.lock),
# the second copies only that virtualenv onto the same base. Alpine rather than Debian slim: the
# sidecar needs no glibc (uvloop ships musllinux wheels), and the base is about 50 MB unpacked
# against about 125 MB, which keeps the image under the 80 MB target. Pin the base by digest too
# (python:3.11.14-alpine3.22@sha256:...) in your own registry mirror for reproducible builds.
# See docs/deployment.md for how the image is meant to run on ECS.

FROM python:3.11.14-alpine3.22 AS build

ENV PIP_DISABLE_PIP_VERSION_CHECK=1
# A C compiler for mypyc, which compiles the query path's modules (setup.py): in this stage only,
# never in the image. Not pinned by version: Alpine keeps one version per release, and the base
# image pins the release. --copies: the virtualenv gets its own interpreter binary, the only file
# that the runtime stage gives the right to bind port 53 (see below).
# hadolint ignore=DL3018
RUN apk add --no-cache gcc musl-dev \
    && python -m venv --copies /opt/venv
COPY requirements.lock requirements-cloudmap.lock requirements-build.lock /tmp/
# CLOUDMAP=true adds boto3 for Cloud Map health (zones with `cloudmap`); off by default to keep
# the image small. Without it a config that asks for Cloud Map stops at start with a clear error.
ARG CLOUDMAP=false
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps --only-binary=:all: \
        -r /tmp/requirements.lock \
    && if [ "$CLOUDMAP" = "true" ]; then \
        /opt/venv/bin/pip install --no-cache-dir --no-deps --only-binary=:all: \
            -r /tmp/requirements-cloudmap.lock; \
    fi \
    && /opt/venv/bin/pip install --no-cache-dir --no-deps --only-binary=:all: \
        -r /tmp/requirements-build.lock
COPY pyproject.toml README.md setup.py /src/
COPY sidecar /src/sidecar
# The project itself, not editable, without re-resolving dependencies, its query path compiled;
# then check that the locks were complete and drop the build tools from the virtualenv.
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps --no-build-isolation /src \
    && /opt/venv/bin/pip check \
    && /opt/venv/bin/pip uninstall --yes -r /tmp/requirements-build.lock \
    && /opt/venv/bin/pip uninstall --yes pip \
    && /opt/venv/bin/dns-sidecar --version


FROM python:3.11.14-alpine3.22

# A fixed numeric user: the process never runs as root (unless a task definition says so, as the
# awsvpc/Fargate variant with --manage-resolv-conf must, to rewrite resolv.conf).
RUN addgroup -S -g 10053 dns-sidecar \
    && adduser -S -D -H -u 10053 -G dns-sidecar -h /nonexistent -s /sbin/nologin dns-sidecar

COPY --from=build /opt/venv /opt/venv

# Port 53 as a non-root user. In a container's own network namespace (bridge, awsvpc) Docker
# >= 20.10 sets net.ipv4.ip_unprivileged_port_start=0 and nothing more is needed. In `host`
# network mode the instance's setting applies (normally 1024) and ECS cannot change it
# (systemControls are not supported there), so the virtualenv's interpreter carries the file
# capability cap_net_bind_service+ep (what `setcap` writes, set here with os.setxattr so that no
# extra package is needed). It needs NET_BIND_SERVICE in the container's capability bounding set
# (Docker's default): with it dropped, the interpreter does not start at all.
#
# The sidecar runs with PYTHONOPTIMIZE=2: no docstrings (and no asserts) kept in memory, about
# 1 MiB less RSS in every task. The .opt-2.pyc files of every module it imports are written
# here, once (as root, before PYTHONDONTWRITEBYTECODE): without them each start would compile
# those modules again, slower and with more memory.
RUN /opt/venv/bin/python -c "import os, struct; \
[os.setxattr('/opt/venv/bin/' + n, 'security.capability', struct.pack('<5I', 0x02000001, 1 << 10, 0, 0, 0)) \
 for n in ('python', 'python3', 'python3.11')]" \
    && PYTHONOPTIMIZE=2 /opt/venv/bin/python -m sidecar.warm

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONOPTIMIZE=2

USER 10053:10053

# DNS on UDP and TCP; /metrics, /health, /ready over HTTP.
EXPOSE 53/udp 53/tcp 9153/tcp

# Asks the sidecar `id.server CH TXT`, which it answers itself: healthy while the VPC resolver
# is slow or down. An ECS task definition's healthCheck replaces this one.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["dns-sidecar", "healthcheck"]

ENTRYPOINT ["dns-sidecar"]
CMD ["--listen", "127.0.0.1:53", "--metrics-listen", "0.0.0.0:9153"]
