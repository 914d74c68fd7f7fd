# sendtrail image: `sendtrail worker` by default (agents, ClickHouse sink, API,
# webhooks and /metrics on port 6066). Build: docker build -t sendtrail .

# ---- build: a virtualenv with sendtrail and its dependencies (compilers
# stay in this stage; the runtime stage copies only the virtualenv)
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/sendtrail
ENV PATH=/opt/sendtrail/bin:$PATH
WORKDIR /src
# dependencies first (cached while only the code changes), then the package
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt
COPY . .
RUN pip install --no-deps .

# ---- runtime
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    SENDTRAIL_DATA_DIR=/data \
    SENDTRAIL_CLICKHOUSE_URL=chdb:///data/clickhouse \
    SENDTRAIL_WEB_PORT=6066 \
    PROMETHEUS_DISABLE_CREATED_SERIES=true \
    PATH=/opt/sendtrail/bin:$PATH
COPY --from=build /opt/sendtrail /opt/sendtrail
RUN groupadd --system --gid 10001 sendtrail \
    && useradd --system --uid 10001 --gid sendtrail --home-dir /home/sendtrail --create-home \
       --shell /usr/sbin/nologin sendtrail \
    && mkdir -p /data \
    && chown sendtrail:sendtrail /data
WORKDIR /data
# Local state (RocksDB tables, embedded ClickHouse when SENDTRAIL_CLICKHOUSE_URL
# is chdb://): one volume per container, so scaled workers never share a store.
VOLUME ["/data"]
USER 10001:10001
EXPOSE 6066
HEALTHCHECK --interval=15s --timeout=5s --start-period=90s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('SENDTRAIL_WEB_PORT', '6066'), timeout=4)"]
ENTRYPOINT ["sendtrail"]
CMD ["worker"]
