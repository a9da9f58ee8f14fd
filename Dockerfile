# syntax=docker/dockerfile:1
# callbridge: a Twilio phone number to Deepgram Voice Agent bridge.
# Build: docker build -t callbridge .   Run: docker run --env-file .env -p 8080:8080 callbridge

FROM python:3.13-slim AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# 1. The dependencies alone, at the versions in constraints.txt (what CI tested): this layer is
#    rebuilt only when pyproject.toml or constraints.txt change, never for a code change.
#    Every dependency ships manylinux wheels (uvloop, httptools, audioop-lts...): no compiler.
COPY pyproject.toml constraints.txt bin/_pyproject_deps.py ./
RUN python _pyproject_deps.py pyproject.toml > requirements.txt \
    && python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --only-binary=:all: -c constraints.txt -r requirements.txt
# 2. The code, on top, without touching the dependencies.
COPY README.md ./
COPY app ./app
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps . \
    && /opt/venv/bin/pip check \
    && /opt/venv/bin/python -c "import app, uvloop, httptools, audioop"

FROM python:3.13-slim
LABEL org.opencontainers.image.title="callbridge" \
      org.opencontainers.image.description="Twilio Media Streams to Deepgram Voice Agent bridge" \
      org.opencontainers.image.licenses="MIT"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOST=0.0.0.0 \
    PORT=8080 \
    REQUIRE_DEEPGRAM=1 \
    PROMETHEUS_MULTIPROC_DIR=/tmp/callbridge-metrics
# WORKERS (unset): one worker process per core the container may use (its CPU limit, rounded
# down); the metrics and the workers' shared file go to PROMETHEUS_MULTIPROC_DIR, under /tmp
# (mount a tmpfs there: docker run --read-only --tmpfs /tmp).
RUN useradd --system --no-log-init --uid 10001 --no-create-home --shell /usr/sbin/nologin callbridge
COPY --from=build /opt/venv /opt/venv
USER 10001
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PORT', '8080'), timeout=2)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["callbridge"]
CMD ["serve"]
