# syntax=docker/dockerfile:1
# Build (README "Deploy", step 1): the version comes from pyproject.toml, nowhere else:
#   VERSION=$(python3 -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')
#   docker build --build-arg VERSION="$VERSION" --build-arg REVISION="$(git rev-parse HEAD)" \
#     --build-arg CREATED="$(date -u +%Y-%m-%dT%H:%M:%SZ)" -t REGISTRY/ac-audience-sync:"$VERSION" .
# Every package comes from a hash-pinned lock (deploy/image/update-locks regenerates them).

# Build stage: a wheel of the service, built by the locked build backend (no build isolation, so
# nothing unpinned is fetched).
FROM python:3.11.10-slim-bookworm AS build
WORKDIR /src
COPY requirements-build.lock ./
RUN pip install --no-cache-dir --disable-pip-version-check --require-hashes --no-deps \
        -r requirements-build.lock
COPY pyproject.toml README.md ./
COPY schemas ./schemas
COPY service ./service
RUN pip wheel --no-cache-dir --disable-pip-version-check --no-deps --no-build-isolation \
        --wheel-dir /wheels .

# Runtime stage: the locked dependencies, then the service's wheel (whatever its version: the
# file name is globbed), checked consistent by `pip check`; run as an unprivileged user under
# dumb-init, so SIGTERM reaches the service from the first instant.
FROM python:3.11.10-slim-bookworm
ARG VERSION
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="ac-audience-sync" \
      org.opencontainers.image.description="Keeps ActiveCampaign lists in step with CDP audience-membership events from Kafka." \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.source="https://github.com/example/ac-audience-sync" \
      org.opencontainers.image.documentation="https://github.com/example/ac-audience-sync/blob/main/deploy/RUNBOOK.md" \
      org.opencontainers.image.licenses="LicenseRef-Proprietary" \
      org.opencontainers.image.base.name="docker.io/library/python:3.11.10-slim-bookworm"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    METRICS_PORT=9108
COPY requirements.lock /tmp/requirements.lock
COPY --from=build /wheels /wheels
# The VERSION build argument must name the wheel's version (pyproject.toml's): the label cannot lie.
RUN test -f "/wheels/ac_audience_sync-${VERSION:?pass --build-arg VERSION from pyproject.toml}-py3-none-any.whl" \
    && pip install --no-cache-dir --disable-pip-version-check --require-hashes --no-deps \
        -r /tmp/requirements.lock \
    && pip install --no-cache-dir --disable-pip-version-check --no-deps /wheels/ac_audience_sync-*.whl \
    && pip check \
    && rm -rf /wheels /tmp/requirements.lock \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin acsync
# Nothing is written at run time: the root filesystem can be mounted read-only.
USER 10001:10001
EXPOSE 9108
ENTRYPOINT ["dumb-init", "--", "ac-audience-sync", "run"]
