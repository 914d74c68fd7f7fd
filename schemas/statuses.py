"""The status vocabularies of the contract (SPEC section 3), defined once.

Pure data. The engine derives these values, the metrics bound their label sets
with them, and the API validates filters against them. (The oracle in
``streams/oracle.py`` keeps its own copy on purpose: it must stay independent
of the code it checks.)
"""
from __future__ import annotations

#: Contact status in an automation, one at a time per run.
CONTACT_STATUSES: tuple[str, ...] = (
    "waiting_enrichment",
    "ready",
    "active_limit",
    "coworkers_limit",
    "in_progress",
    "paused",
    "not_sent",
    "bounced",
    "finished",
    "canceled",
    "failed",
    "unsubscribed",
    "duplicate",
)
#: Statuses that end a run.
ENDED: frozenset[str] = frozenset({"finished", "canceled", "failed", "unsubscribed", "duplicate"})
#: Statuses whose current node is ``waiting`` (any other status: ``stopped``).
WAITING: frozenset[str] = frozenset({"waiting_enrichment", "ready", "active_limit", "coworkers_limit",
                                     "in_progress", "paused"})
#: Node state of a run at a node.
NODE_STATES: tuple[str, ...] = ("waiting", "stopped", "done", "filtered")
#: Message status, lowest to highest precedence.
MESSAGE_STATUSES: tuple[str, ...] = (
    "sent",
    "deferred",
    "delivered",
    "opened",
    "clicked",
    "unsubscribed",
    "spam_reported",
    "bounced",
    "dropped",
)
