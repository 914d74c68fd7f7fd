"""Replays after a crash, through ``agents.app.Pipeline.prepare`` (local RocksDB, no Kafka).

A SIGKILL can land while a batch's state is written to its changelogs: the changelog then holds
part of the batch (say the unparked enrollments) and not the rest (the automation replica the
same batch wrote). The state recovered from it has keys without their automation's definition,
until the replay reaches the definition's fan-out again.
"""
from __future__ import annotations

import copy

import orjson
from aiokafka import TopicPartition

from agents.app import Pipeline, apply_automation_event, node_span
from schemas.examples import EXAMPLES
from schemas.topics import topic_names
from sendtrail.settings import Settings
from tests.unit.pipeline_helpers import Rec, local_pipeline

AID, CID = "auto-1", "contact-1"
KEY = f"{AID}\x1f{CID}".encode()


def _event(kind: str, **fields) -> dict:
    return {**copy.deepcopy(EXAMPLES[kind]), **fields}


def _batch(pipeline: Pipeline, records: list[Rec], replay: bool = False):
    fetched: dict[TopicPartition, list[Rec]] = {}
    for rec in records:
        fetched.setdefault(TopicPartition(rec.topic, rec.partition), []).append(rec)
    until = {tp: recs[-1].offset + 1 for tp, recs in fetched.items()} if replay else None
    ctx = pipeline.prepare(fetched, until)
    pipeline.tables.seal()
    return ctx


def _contact_events(names: dict) -> list[Rec]:
    recs = [Rec(names["enrollments"], 0, 0, CID.encode(),
                orjson.dumps(_event("contact.enrolled", event_id="enr")))]
    for i in range(3):  # every step of the 3-step definition
        recs.append(Rec(names["sends"], 0, i, CID.encode(), orjson.dumps(_event(
            "step.sent", event_id=f"sent-{i}", step_index=i, message_id=f"m{i}",
            occurred_at=f"2024-05-0{1 + 2 * i}T10:00:00Z"))))
    return recs


def _fan_out(pipeline: Pipeline, names: dict) -> Rec:
    ctx = _batch(pipeline, [Rec(names["automations"], 0, 0, AID.encode(),
                                orjson.dumps(_event("automation.published")))])
    (topic, key, value, partition), = [s for s in ctx.sends if s[0] == names["internal.to-contacts"]]
    return Rec(topic, partition, 0, key, value)


def test_a_replay_never_snapshots_a_key_without_its_automations_definition(tmp_path):
    names = topic_names(Settings().topic_prefix)
    crashed = local_pipeline(tmp_path / "crashed", 1)
    fan_out = _fan_out(crashed, names)
    _batch(crashed, [fan_out] + _contact_events(names))
    state = crashed.tables.get("enrollments", 0, KEY)
    assert state is not None and crashed.tables.get("automation-replicas", 0, AID.encode()) is not None

    # What a changelog recovery may give: the key's state without the replica written with it.
    replay = local_pipeline(tmp_path / "replay", 1)
    replay.tables.store("enrollments", 0).write({KEY: state}, 0)
    first = _batch(replay, _contact_events(names)[1:], replay=True)  # the fan-out is in a later batch
    second = _batch(replay, [fan_out], replay=True)

    node_rows = first.rows.get("node_states", []) + second.rows.get("node_states", [])
    assert not [r for r in node_rows if r["step_index"] >= 3], "a node outside the definition was emitted"
    assert not first.rows.get("enrollments"), "snapshot without the definition"
    snapshot = second.rows["enrollments"]
    assert [(r["contact_id"], r["status"]) for r in snapshot] == [(CID, "finished")]
    assert {r["step_index"]: r["state"] for r in second.rows["node_states"]} == {0: "done", 1: "done", 2: "done"}
    assert min(r["_version"] for r in second.rows["node_states"]) > orjson.loads(state)["version"]


def test_a_snapshot_covers_the_nodes_of_every_definition_the_automation_had():
    published = _event("automation.published")
    longer = apply_automation_event(None, {**published, "steps": published["steps"] + [
        {"index": 3, "name": "Last", "kind": "email", "day": 5}], "occurred_at": 1})
    shorter = apply_automation_event(longer, {**published, "version": 2, "occurred_at": 2})
    assert node_span(longer) == 4 and node_span(shorter) == 4  # the step 3 rows of v1 get their `none`
    assert node_span(apply_automation_event(None, {**published, "occurred_at": 1})) == 3
