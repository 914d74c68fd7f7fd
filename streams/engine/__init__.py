"""Pure state machines of sendtrail (docs/semantics.md): no Faust, Kafka, ClickHouse, clock or I/O.

- :mod:`streams.engine.enrollment`: per (automation_id, contact_id) runs, contact status and node states.
- :mod:`streams.engine.message`: per message_id flags, status and the outcomes forwarded to contacts.
"""
from . import enrollment, message

__all__ = ["enrollment", "message"]
