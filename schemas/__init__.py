"""sendtrail's event contract: definitions, topics, parser, JSON Schema.

Pure code (no Kafka, ClickHouse or Faust; no environment reads).
"""
from schemas.events import EVENT_TYPES, EVENTS, SUPPORTED_SCHEMA_VERSION, EventType, Field
from schemas.examples import EXAMPLES
from schemas.parser import REASONS, Rejection, parse_event, parse_object, parse_timestamp, to_rfc3339
from schemas.topics import TOPICS, Topic, topic_names

__all__ = [
    "EVENTS",
    "EVENT_TYPES",
    "EXAMPLES",
    "REASONS",
    "SUPPORTED_SCHEMA_VERSION",
    "TOPICS",
    "EventType",
    "Field",
    "Rejection",
    "Topic",
    "parse_event",
    "parse_object",
    "parse_timestamp",
    "to_rfc3339",
    "topic_names",
]
