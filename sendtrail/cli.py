"""The ``sendtrail`` command: worker, gateway, api, migrate, generate, export, report."""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from pathlib import Path

from sendtrail.settings import Settings, SettingsError

log = logging.getLogger("sendtrail")

LEVELS = {"crit": logging.CRITICAL, "error": logging.ERROR, "warn": logging.WARNING, "info": logging.INFO,
          "debug": logging.DEBUG}


def _setup_logging(settings: Settings) -> None:
    logging.basicConfig(level=LEVELS[settings.log_level],
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def cmd_worker(settings: Settings, args: argparse.Namespace) -> int:
    from agents.worker import run_worker

    run_worker(settings)
    return 0


def cmd_gateway(settings: Settings, args: argparse.Namespace) -> int:
    from sendtrail.gateway import run_gateway

    return run_gateway(settings, host=args.host, port=args.port)


def cmd_api(settings: Settings, args: argparse.Namespace) -> int:
    from sendtrail.gateway import run_api

    return run_api(settings, host=args.host, port=args.port)


def cmd_migrate(settings: Settings, args: argparse.Namespace) -> int:
    from sendtrail.clickhouse import connect
    from sendtrail.migrate import migrate

    client = connect(settings.clickhouse_url)
    try:
        applied = migrate(client)
    finally:
        client.close()
    log.info("applied %d migration(s)%s", len(applied), (": " + ", ".join(applied)) if applied else "")
    return 0


def cmd_generate(settings: Settings, args: argparse.Namespace) -> int:
    import orjson

    from streams.generator import generate, write_jsonl

    now_ms = int(time.time() * 1000)
    base_ms = now_ms - args.days * 86_400_000
    workload = generate(args.seed, automations=args.automations, contacts=args.contacts, base_ms=base_ms,
                        now_ms=now_ms, invalid=args.invalid)
    if args.jsonl:
        write_jsonl(workload, Path(args.jsonl))
        log.info("wrote %d events and the oracle to %s", len(workload.events), args.jsonl)
    if args.oracle:
        Path(args.oracle).parent.mkdir(parents=True, exist_ok=True)
        Path(args.oracle).write_bytes(orjson.dumps(workload.oracle, option=orjson.OPT_SORT_KEYS))
    if not args.no_kafka:
        from agents.worker import ensure_topics

        asyncio.run(ensure_topics(settings))
        sent = asyncio.run(produce(settings, workload.events))
        log.info("produced %d events to %s (prefix %r)", sent, settings.kafka, settings.topic_prefix)
    return 0


async def produce(settings: Settings, events) -> int:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka, acks="all", linger_ms=20,
                                max_batch_size=1 << 20, enable_idempotence=True)
    await producer.start()
    try:
        futures = []
        for topic, key, value in events:
            futures.append(await producer.send(settings.topic(topic), value=value,
                                               key=key.encode() if isinstance(key, str) else key))
            if len(futures) >= 10_000:
                await asyncio.gather(*futures)
                futures.clear()
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return len(events)


def cmd_export(settings: Settings, args: argparse.Namespace) -> int:
    from sendtrail.api.export import export_recipients_zip_to_dir
    from sendtrail.clickhouse import connect

    client = connect(settings.clickhouse_url)
    try:
        path = export_recipients_zip_to_dir(client, args.automation, Path(args.out))
    finally:
        client.close()
    log.info("wrote %s", path)
    sys.stdout.write(f"{path}\n")
    return 0


def cmd_report(settings: Settings, args: argparse.Namespace) -> int:
    from sendtrail.report import ReportError, print_report

    oracle = None
    if args.oracle:
        try:
            oracle = json.loads(Path(args.oracle).read_bytes())
        except (OSError, ValueError) as exc:
            sys.stderr.write(f"sendtrail report: cannot read the oracle {args.oracle}: {exc}\n")
            return 2
    try:
        return 0 if print_report(settings, base_url=args.url, out=sys.stdout, oracle=oracle) else 1
    except ReportError as exc:
        sys.stderr.write(f"sendtrail report: {exc}\n")
        return 2


def cmd_wait(settings: Settings, args: argparse.Namespace) -> int:
    from agents.offsets import wait_caught_up

    try:
        lag = asyncio.run(wait_caught_up(settings, timeout=args.timeout))
    except TimeoutError as exc:
        sys.stderr.write(f"sendtrail wait: {exc}\n")
        return 1
    log.info("worker caught up: %s", lag)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sendtrail", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("worker", help="run the agents, the ClickHouse sink, the API and /metrics")
    for name, help_text in (
            ("gateway", "serve only the webhooks and POST /api/v1/events (plus /metrics, /healthz, /readyz), "
                        "publishing to Kafka; no agents, no ClickHouse"),
            ("api", "serve only the report API against SENDTRAIL_CLICKHOUSE_URL (a server URL; with chdb:// "
                    "never beside a worker on the same path: one process per chDB path)")):
        edge = sub.add_parser(name, help=help_text)
        edge.add_argument("--host", default=None, help="listen address (default $SENDTRAIL_WEB_HOST)")
        edge.add_argument("--port", type=int, default=None, help="listen port (default $SENDTRAIL_WEB_PORT)")
    sub.add_parser("migrate", help="apply the ClickHouse migrations")
    gen = sub.add_parser("generate", help="write a seeded synthetic workload to Kafka and its oracle to a file")
    gen.add_argument("--seed", type=int, default=1)
    gen.add_argument("--contacts", type=int, default=10_000)
    gen.add_argument("--automations", type=int, default=5)
    gen.add_argument("--days", type=int, default=14, help="spread the events over this many past days")
    gen.add_argument("--invalid", type=int, default=0, help="add N invalid messages of every kind")
    gen.add_argument("--oracle", help="write the expected end state (JSON) here")
    gen.add_argument("--jsonl", help="also write the events as JSON lines to this folder")
    gen.add_argument("--no-kafka", action="store_true", help="do not produce to Kafka")
    exp = sub.add_parser("export", help="write an automation's recipients ZIP to a folder")
    exp.add_argument("--automation", required=True)
    exp.add_argument("--out", default=".")
    rep = sub.add_parser("report", help="print per-automation node counts and per-mailing totals from the API")
    rep.add_argument("--url", default=None, help="API base URL (default http://127.0.0.1:$SENDTRAIL_WEB_PORT)")
    rep.add_argument("--oracle", default=None,
                     help="also check the figures against this oracle (from generate --oracle); exit 1 if they differ")
    wait = sub.add_parser("wait", help="wait until the worker has consumed and committed everything")
    wait.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        sys.stderr.write(f"sendtrail: {exc}\n")
        return 2
    _setup_logging(settings)
    handler = {"worker": cmd_worker, "gateway": cmd_gateway, "api": cmd_api, "migrate": cmd_migrate,
               "generate": cmd_generate, "export": cmd_export,
               "report": cmd_report, "wait": cmd_wait}[args.command]
    return handler(settings, args)


if __name__ == "__main__":
    sys.exit(main())
