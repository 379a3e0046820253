# syntax=docker/dockerfile:1
# Build stage: a wheel of the service and wheels of everything it needs.
FROM python:3.11.10-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY schemas ./schemas
COPY service ./service
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

# Runtime stage: the wheels installed into a slim Python, run as an unprivileged user.
FROM python:3.11.10-slim-bookworm
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    METRICS_PORT=9108
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links=/wheels ac-audience-sync==0.1.0 \
    && rm -rf /wheels \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin acsync
# Nothing is written at run time: the root filesystem can be mounted read-only.
USER 10001:10001
EXPOSE 9108
ENTRYPOINT ["ac-audience-sync", "run"]
