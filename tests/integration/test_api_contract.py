"""Contract test: schemathesis drives the running API from its OpenAPI document.

The worker's web app (``sendtrail.web.build_web_app``: bearer-token auth, error
handling, the report routes, ``/healthz``, ``/readyz``, ``/metrics``) runs on a
real loopback port over the known dataset of ``api_fixtures``, with
``SENDTRAIL_API_TOKEN`` set. For every documented operation of that app,
schemathesis sends generated requests built from the document (the one served
at ``/api/v1/openapi.json``): valid ones (positive mode) and malformed ones
(negative mode: wrong types, numbers out of range, unknown enum values, control
characters, missing or extra parts). All of its checks run: every response is
documented (status code, content type, JSON body schema), no request gets a
5xx, a malformed request gets a 4xx (``negative_data_rejection``), a valid one
is not refused (``positive_data_acceptance``), and requests without or with a
wrong token get 401 (except on the open paths).

Left out: ``POST /api/v1/events`` and the webhooks (mounted only with a Kafka
publisher; ``test_webhooks_http`` covers them). Runs are deterministic (hypothesis derandomized, no
example database) and bounded by ``MAX_EXAMPLES`` per operation.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import threading

import pytest

schemathesis = pytest.importorskip("schemathesis")

from aiohttp import web  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.specs.openapi.checks import positive_data_acceptance  # noqa: E402

from sendtrail.api import make_deps_for_client  # noqa: E402
from sendtrail.api.openapi import OPENAPI  # noqa: E402
from sendtrail.metrics import Metrics  # noqa: E402
from sendtrail.settings import Settings  # noqa: E402
from sendtrail.web import WebDeps, build_web_app  # noqa: E402
from tests.integration import api_fixtures as F  # noqa: E402

pytestmark = pytest.mark.network

DB = "api_contract"
MAX_EXAMPLES = 15
TOKEN = "contract-test-token"
# mounted only with a Kafka publisher (ingest), which this app has not
INGEST = r"^/(webhooks/.*|api/v1/events)$"


class ServerThread:
    """The worker's web app (``build_web_app``: auth middleware, error handling, the report routes,
    ``/healthz``, ``/readyz``, ``/metrics``) on 127.0.0.1:<free port>, served from a background event
    loop (the test client, requests, is synchronous)."""

    def __init__(self, api_deps):
        self.api_deps = api_deps
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.port = 0
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="contract-api", daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            metrics = Metrics.create(process_collectors=False)
            app = build_web_app(WebDeps(settings=Settings(api_token=TOKEN), metrics=metrics,
                                        registry=metrics.registry, api_deps=self.api_deps,
                                        now=self.api_deps.now))
            self.runner = web.AppRunner(app)
            self.loop.run_until_complete(self.runner.setup())
            site = web.TCPSite(self.runner, "127.0.0.1", 0)
            self.loop.run_until_complete(site.start())
            self.port = site._server.sockets[0].getsockname()[1]
        except BaseException as exc:  # pragma: no cover - surfaced by start()
            self.error = exc
            self.ready.set()
            return
        self.ready.set()
        self.loop.run_forever()
        self.loop.run_until_complete(self.runner.cleanup())
        self.loop.close()

    def start(self) -> str:
        self.thread.start()
        self.ready.wait(30)
        if self.error is not None:
            raise self.error
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)


@pytest.fixture(scope="module")
def contract_server(tmp_path_factory):
    path = tmp_path_factory.mktemp("api-contract-chdb")
    main = F.open_database(str(path), DB)
    F.load_dataset(main, DB)
    now = lambda: F.NOW.replace(tzinfo=dt.timezone.utc).timestamp()  # noqa: E731
    deps = make_deps_for_client(main, DB, client_factory=lambda: F.open_database(str(path), DB), now=now)
    server = ServerThread(deps)
    base_url = server.start()
    yield base_url
    server.stop()
    main.close()


def _schema():
    # The document the app serves (test_api checks that /api/v1/openapi.json is this very document).
    # Loaded at import so that every operation is its own pytest test; the base URL (a free port)
    # is given per call.
    loaded = schemathesis.openapi.from_dict(OPENAPI)
    loaded.config.generation.update(
        modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
        max_examples=MAX_EXAMPLES,
        deterministic=True,
        database="none",
        no_shrink=True,
    )
    return loaded.exclude(path_regex=INGEST)


schema = _schema()


EXCLUDED: list = []


def _inverted_period(case) -> bool:
    """from/to that are each valid but to <= from: a rule across two parameters that OpenAPI cannot
    state; the API answers 400 (tested in test_api), so the positive-data check does not apply."""
    query = case.query or {}
    try:
        start, end = (_dt_param(query.get(k)) for k in ("from", "to"))
    except ValueError:
        return False
    return start is not None and end is not None and end <= start


def _dt_param(value):
    if not isinstance(value, str) or not value:
        return None
    parsed = dt.datetime.fromisoformat(value.replace("z", "Z"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.timezone.utc)


@schema.parametrize()
def test_responses_match_the_openapi_document(case, contract_server):
    excluded = EXCLUDED + ([positive_data_acceptance] if _inverted_period(case) else [])
    case.call_and_validate(base_url=contract_server, headers={"Authorization": f"Bearer {TOKEN}"},
                           excluded_checks=excluded)
