"""The OpenAPI 3.1 document of sendtrail's HTTP API (``GET /api/v1/openapi.json``).

It describes every route: the report API of :mod:`sendtrail.api.routes` and
the web app's own (``/healthz``, ``/readyz``, ``/metrics``,
``POST /api/v1/events``, ``POST /webhooks/{provider}``). A test checks that
the registered routes and this document list the same paths and methods, and
that answers conform to the schemas.
"""
from __future__ import annotations

from typing import Any

from sendtrail.api.queries import (AUTOMATION_SORTS, AUTOMATION_STATUSES, CONTACT_SORTS, CONTACT_STATUSES,
                                   LIST_MEMBER_SORTS, MAILING_RECIPIENT_SORTS, MAILING_SORTS, MESSAGE_FLAGS,
                                   MESSAGE_SORTS, MESSAGE_STATUSES, NODE_CONTACT_SORTS, NODE_STATES,
                                   RECIPIENT_SORTS, STATIC_LIST_SORTS, TIMELINE_KINDS)

S = "string"
I = "integer"
T = {"type": "string", "format": "date-time"}
TN = {"type": ["string", "null"], "format": "date-time"}
SN = {"type": ["string", "null"]}
IN_ = {"type": ["integer", "null"]}


def obj(props: dict[str, Any], required: list[str] | None = None, extra: bool = True) -> dict:
    out: dict[str, Any] = {"type": "object", "properties": props,
                           "required": list(props) if required is None else required}
    if not extra:
        out["additionalProperties"] = False
    return out


def ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def page_of(item: str) -> dict:
    return obj({"items": {"type": "array", "items": ref(item)}, "total": {"type": I, "minimum": 0}})


def _t(kind: str) -> dict:
    return {"type": kind}


SCHEMAS: dict[str, Any] = {
    "Error": obj({"error": obj({"code": _t(S), "message": _t(S)}, ["code", "message"])}),
    "Step": obj({"index": _t(I), "name": _t(S), "kind": _t(S), "day": {"type": ["integer", "number", "null"]}},
                ["index"]),
    "Automation": obj({
        "automation_id": _t(S), "name": {"type": [S, "null"]}, "description": SN,
        "participation": {"type": [S, "null"], "enum": ["once", "unlimited", None]},
        "start_at": TN, "end_at": TN, "published_by": SN, "version": IN_,
        "status": {"type": [S, "null"], "enum": [*AUTOMATION_STATUSES, None]},
        "steps": {"type": "array", "items": ref("Step")}, "updated_at": TN,
    }),
    "Totals": obj({"contacts": _t(I), "runs": _t(I), "recipients": _t(I), "ignored_enrollments": _t(I),
                   "statuses": {"type": "object", "additionalProperties": _t(I)}}),
    "Recipient": obj({
        "recipient_id": _t(S), "automation_id": _t(S), "run": _t(I), "contact_id": _t(S), "user_id": _t(S),
        "user_name": _t(S), "email": _t(S), "step_index": _t(I),
        "step_details": {"description": "JSON object {day, inactive_days}"},
        "message_id": _t(S), "channel": _t(S), "mailing_id": _t(S), "sent_time": T,
        "metadata": {"description": "JSON object given with step.sent"},
    }),
    "Node": obj({"step_index": _t(I), "name": SN, "kind": SN, "day": {"type": ["integer", "number", "null"]},
                 "done": _t(I), "waiting": _t(I), "filtered": _t(I), "stopped": _t(I)}),
    "Report": obj({
        "automation": ref("Automation"),
        "period": obj({"from": TN, "to": TN}),
        "nodes": {"type": "array", "items": ref("Node")},
        "completion": obj({"completed": _t(I), "in_progress": _t(I), "not_started": _t(I), "left": _t(I),
                           "runs": _t(I)}, ["completed", "in_progress", "not_started"]),
        "statuses": {"type": "object", "additionalProperties": _t(I)},
    }, ["automation", "nodes", "completion", "statuses"]),
    "AutomationContact": obj({
        "contact_id": _t(S), "run": _t(I), "name": _t(S), "email": _t(S),
        "status": {"type": S, "enum": list(CONTACT_STATUSES)}, "reason": SN, "current_step": _t(I),
        "enrolled_at": TN, "status_at": T, "resume_at": TN, "updated_at": T,
    }),
    "NodeContact": obj({
        "contact_id": _t(S), "run": _t(I), "name": SN, "email": SN, "status": SN, "reason": SN,
        "current_step": IN_, "updated_at": TN, "state": {"type": S, "enum": list(NODE_STATES)}, "state_at": T,
    }),
    "Health": obj({
        "stuck": {"type": "array", "items": obj({"contact_id": _t(S), "run": _t(I), "step_index": _t(I),
                                                 "waiting_since": T})},
        "stuck_total": _t(I), "stuck_before": T, "older_than": _t(I),
        "duplicate_sends": {"type": "array", "items": obj({
            "contact_id": _t(S), "run": _t(I), "step_index": _t(I),
            "message_ids": {"type": "array", "items": _t(S)}})},
        "duplicate_sends_total": _t(I),
    }, ["stuck", "duplicate_sends"]),
    "StaticListCreate": {
        **obj({
            "name": {"type": S, "minLength": 1, "maxLength": 200, "pattern": "\\S",
                     "description": "not blank"},
            "automation_id": {"type": S, "minLength": 1},
            "step_index": {"type": [I, "null"], "minimum": 0, "maximum": 100_000},
            "state": {"type": [S, "null"], "enum": [*NODE_STATES, None],
                      "description": "needs step_index (the node whose contacts are taken)"},
            "status": {"type": [S, "null"], "enum": [*CONTACT_STATUSES, None]},
        }, ["name", "automation_id"], extra=False),
        "dependentSchemas": {"state": {"anyOf": [{"properties": {"state": {"type": "null"}}},
                                                 {"required": ["step_index"],
                                                  "properties": {"step_index": {"type": I}}}]}},
    },
    "StaticList": obj({"id": _t(S), "name": _t(S), "automation_id": _t(S), "step_index": IN_, "state": SN,
                       "status": SN, "count": _t(I), "created_at": T},
                      ["id", "name", "count", "created_at"]),
    "StaticListMember": obj({"contact_id": _t(S), "name": _t(S), "email": _t(S)}),
    "Mailing": obj({
        "mailing_id": _t(S), "automation_id": _t(S), "step_index": _t(I), "subject": _t(S),
        "sending_user": _t(S), "sending_email": _t(S), "status": _t(S), "date": TN, "total_sent": _t(I),
        "delivered": _t(I), "opened": _t(I), "clicked": _t(I), "bounced": _t(I), "dropped": _t(I),
        "deferred": _t(I), "spam_reports": _t(I), "unsubscribed": _t(I),
    }),
    "MailingRecipient": obj({
        "message_id": _t(S), "contact_id": _t(S), "name": _t(S), "email": _t(S),
        "status": {"type": S, "enum": list(MESSAGE_STATUSES)}, "status_at": T,
        **{f"{f}_at": TN for f in MESSAGE_FLAGS},
        "bounce_class": SN, "opens": _t(I), "clicks": _t(I), "run": _t(I), "step_index": _t(I),
    }),
    "ContactMessage": obj({
        "message_id": _t(S), "mailing_id": _t(S), "automation_id": _t(S), "run": _t(I), "step_index": _t(I),
        "subject": _t(S), "sending_user": _t(S), "sending_email": _t(S), "email": _t(S),
        "status": {"type": S, "enum": list(MESSAGE_STATUSES)}, "status_at": T,
        **{f"{f}_at": TN for f in MESSAGE_FLAGS}, "bounce_class": SN, "opens": _t(I), "clicks": _t(I),
    }),
    "Contact": obj({"contact_id": _t(S), "user_id": _t(S), "name": _t(S), "email": _t(S), "company": SN,
                    "attributes": {}, "updated_at": T}),
    "ContactAutomation": obj({
        "automation_id": _t(S), "name": _t(S), "run": _t(I), "status": _t(S), "reason": SN,
        "current_step": _t(I), "enrolled_at": TN, "status_at": T, "updated_at": T,
        "nodes": {"type": "array", "items": obj({"step_index": _t(I), "state": {"type": S, "enum": list(NODE_STATES)},
                                                 "at": T})},
    }),
    "StatusChange": obj({
        "change_id": _t(S), "kind": {"type": S, "enum": list(TIMELINE_KINDS)}, "automation_id": _t(S),
        "run": _t(I), "step_index": IN_, "message_id": SN, "from_status": SN, "to_status": _t(S), "reason": SN,
        "event_id": _t(S), "event_type": _t(S), "occurred_at": T,
    }),
    "Status": obj({"status": _t(S), "reasons": {"type": "array", "items": _t(S)}}, ["status"]),
    "EventsAccepted": {"type": "object", "description": "per-event results of the batch (see the events guide)"},
}
SCHEMAS["AutomationDetail"] = {"allOf": [ref("Automation"), obj({"totals": ref("Totals")})]}
SCHEMAS["AutomationPage"] = page_of("Automation")
SCHEMAS["RecipientPage"] = page_of("Recipient")
SCHEMAS["AutomationContactPage"] = page_of("AutomationContact")
SCHEMAS["NodeContactPage"] = page_of("NodeContact")
SCHEMAS["StaticListPage"] = page_of("StaticList")
SCHEMAS["StaticListWithMembers"] = {"allOf": [ref("StaticList"), page_of("StaticListMember")]}
SCHEMAS["MailingPage"] = page_of("Mailing")
SCHEMAS["MailingRecipientPage"] = page_of("MailingRecipient")
SCHEMAS["ContactMessagePage"] = page_of("ContactMessage")
SCHEMAS["ContactAutomationPage"] = obj({"contact": {"oneOf": [ref("Contact"), {"type": "null"}]},
                                        "items": {"type": "array", "items": ref("ContactAutomation")},
                                        "total": _t(I)})
SCHEMAS["StatusChangePage"] = page_of("StatusChange")


# What the handlers accept (sendtrail.api.routes.Params): free text up to 200 characters without control
# characters; integers within the ranges below; an empty value is the same as no value.
NO_CONTROL = "^[^\\x00-\\x1f]*$"
TEXT = {"type": S, "maxLength": 200, "pattern": NO_CONTROL}
STEP_Q = {"type": I, "minimum": 0, "maximum": 100_000}
RUN_Q = {"type": I, "minimum": 0, "maximum": 2**31 - 1}
# RFC 3339 date-time or a date (YYYY-MM-DD); without an offset the time is UTC
# (years 1970-2299, the range of ClickHouse's DateTime64 that the handlers accept)
YEARS = "^(19[7-9][0-9]|2[0-2][0-9][0-9])-"
PERIOD_BOUND = {"type": S, "anyOf": [{"format": "date-time", "pattern": YEARS}, {"format": "date", "pattern": YEARS},
                                     {"maxLength": 0}]}


def q(name: str, schema: dict, description: str, required: bool = False) -> dict:
    return {"name": name, "in": "query", "required": required, "description": description, "schema": schema}


def path_param(name: str, description: str, schema: dict | None = None) -> dict:
    return {"name": name, "in": "path", "required": True, "description": description,
            "schema": schema or {"type": S}}


LIMIT = q("limit", {"type": I, "minimum": 1, "maximum": 1000, "default": 50}, "page size")
OFFSET = q("offset", {"type": I, "minimum": 0, "maximum": 100_000_000, "default": 0}, "rows to skip")
ORDER = q("order", {"type": S, "enum": ["asc", "desc"], "default": "desc"}, "sort direction")
FROM = q("from", PERIOD_BOUND,
         "period start, inclusive (RFC 3339 or YYYY-MM-DD; no offset = UTC)")
TO = q("to", PERIOD_BOUND, "period end, exclusive (later than from)")
ID = path_param("id", "automation id")
STEP = path_param("step_index", "node (step) index, 0 = first", STEP_Q)
CONTACT = path_param("contact_id", "contact id")


def sort(choices: dict, default: str) -> dict:
    return q("sort", {"type": S, "enum": list(choices), "default": default}, "sort column")


def paging(choices: dict | None = None, default: str = "", order_default: str = "desc") -> list[dict]:
    out = [LIMIT, OFFSET]
    if choices:
        out += [sort(choices, default),
                q("order", {"type": S, "enum": ["asc", "desc"], "default": order_default}, "sort direction")]
    return out


def json_ok(schema: str, description: str = "OK") -> dict:
    return {"description": description, "content": {"application/json": {"schema": ref(schema)}}}


ERRORS = {
    "400": {"description": "bad parameter", "content": {"application/json": {"schema": ref("Error")}}},
    "401": {"description": "missing or wrong bearer token (when SENDTRAIL_API_TOKEN is set)",
            "content": {"application/json": {"schema": ref("Error")}}},
}
NOT_FOUND = {"404": {"description": "unknown id", "content": {"application/json": {"schema": ref("Error")}}}}


def get(summary: str, params: list[dict], response: dict, *, not_found: bool = True, tag: str = "reports",
        description: str = "") -> dict:
    op = {"summary": summary, "tags": [tag], "parameters": params,
          "responses": {"200": response, **ERRORS, **(NOT_FOUND if not_found else {})}}
    if description:
        op["description"] = description
    return {"get": op}


def csv_ok(description: str) -> dict:
    return {"description": description, "headers": {"Content-Disposition": {"schema": {"type": S}}},
            "content": {"text/csv": {"schema": {"type": S}}}}


PERIOD_DOC = (
    "Period selection (from inclusive, to exclusive, UTC): node counts take each run's latest state at the node "
    "when the time it reached that state (done time, filter time, or since when it waits / was stopped) lies in "
    "the period; statuses and completion count the runs enrolled in the period (enrolled_at, or status_at when "
    "the enrollment event has not arrived). Completion is positional: completed = every step done; in_progress = "
    "some steps done, steps left; not_started = enrolled, nothing done yet; left = filtered out before the end."
)

PATHS: dict[str, Any] = {
    "/api/v1/openapi.json": get("This document", [], {"description": "OpenAPI 3.1",
                                                      "content": {"application/json": {"schema": {"type": "object"}}}},
                                not_found=False, tag="meta"),
    "/api/v1/automations": get(
        "Automations", paging(AUTOMATION_SORTS, "updated_at") + [
            q("status", {"type": S, "enum": list(AUTOMATION_STATUSES)}, "lifecycle status"),
            q("q", TEXT, "name contains (case-insensitive)")],
        json_ok("AutomationPage"), not_found=False),
    "/api/v1/automations/{id}": get("Automation properties and totals", [ID], json_ok("AutomationDetail")),
    "/api/v1/automations/{id}/recipients": get(
        "Recipients page: one row per step sent", [ID] + paging(RECIPIENT_SORTS, "sent_time") + [
            q("step", STEP_Q, "only this step index"),
            q("contact_id", TEXT, "only this contact (did the contact receive step k? when?)"),
            q("q", TEXT, "e-mail or user name contains"),
            FROM, TO], json_ok("RecipientPage")),
    "/api/v1/automations/{id}/recipients/export": get(
        "Export every recipient row as a ZIP holding one CSV",
        [ID, q("step", STEP_Q, "only this step"), q("contact_id", TEXT, "only this contact"),
         FROM, TO],
        {"description": "automation_recipients_<automation_name>_<YYYYMMDD_HHMMSS>.zip (UTC), streamed",
         "headers": {"Content-Disposition": {"schema": {"type": S}}},
         "content": {"application/zip": {"schema": {"type": S, "format": "binary"}}}},
        description="CSV columns: Recipient ID, User ID, User Name, Email, Step Index, Step Details, Sent Time, "
                    "Metadata, Automation ID, Run, Contact ID, Message ID, Mailing ID, Channel. RFC 4180, UTF-8, "
                    "CRLF; text cells starting with = + - @ get a leading apostrophe."),
    "/api/v1/automations/{id}/report": get("Automation report: per-node counts, completion, statuses",
                                           [ID, FROM, TO], json_ok("Report"), description=PERIOD_DOC),
    "/api/v1/automations/{id}/report.svg": get(
        "The report as an SVG picture of the flow", [ID, FROM, TO],
        {"description": "SVG", "content": {"image/svg+xml": {"schema": {"type": S}}}}, description=PERIOD_DOC),
    "/api/v1/automations/{id}/report.png": get(
        "The report as a PNG picture of the flow",
        [ID, FROM, TO, q("scale", {"type": I, "minimum": 1, "maximum": 4, "default": 2}, "pixel scale")],
        {"description": "PNG", "content": {"image/png": {"schema": {"type": S, "format": "binary"}}}},
        description=PERIOD_DOC),
    "/api/v1/automations/{id}/contacts": get(
        "Contacts in the automation with their status", [ID] + paging(CONTACT_SORTS, "updated_at") + [
            q("status", {"type": S, "enum": list(CONTACT_STATUSES)}, "only this status"),
            q("q", TEXT, "name or e-mail contains, or the contact id"),
            q("run", RUN_Q, "only this run")], json_ok("AutomationContactPage")),
    "/api/v1/automations/{id}/contacts.csv": get(
        "Contacts in the automation (CSV)", [ID, sort(CONTACT_SORTS, "updated_at"), ORDER,
                                             q("status", {"type": S, "enum": list(CONTACT_STATUSES)}, "status"),
                                             q("q", TEXT, "search"), q("run", RUN_Q, "run")],
        csv_ok("Contact ID, Run, Name, Email, Status, Reason, Current Step, Enrolled At, Status At, Updated At")),
    "/api/v1/automations/{id}/nodes/{step_index}/contacts": get(
        "Contacts at a node with their state and the reason", [ID, STEP] + paging(NODE_CONTACT_SORTS, "at") + [
            q("state", {"type": S, "enum": list(NODE_STATES)}, "only this state"), FROM, TO],
        json_ok("NodeContactPage")),
    "/api/v1/automations/{id}/nodes/{step_index}/contacts.csv": get(
        "Contacts at a node (CSV)", [ID, STEP, sort(NODE_CONTACT_SORTS, "at"), ORDER,
                                     q("state", {"type": S, "enum": list(NODE_STATES)}, "state"), FROM, TO],
        csv_ok("Contact ID, Run, Name, Email, State, State At, Status, Reason, Current Step, Updated At")),
    "/api/v1/automations/{id}/health": get(
        "Campaign health: contacts stuck at a node, duplicate sends",
        [ID, q("older_than", {"type": I, "minimum": 0, "maximum": 100 * 365 * 86400},
               "seconds waiting that count as stuck (default SENDTRAIL stuck_after_seconds, 7 days)"),
         LIMIT, OFFSET], json_ok("Health")),
    "/api/v1/static-lists": {
        "post": {"summary": "Freeze the matching contacts into a static list", "tags": ["reports"],
                 "requestBody": {"required": True,
                                 "content": {"application/json": {"schema": ref("StaticListCreate")}}},
                 "responses": {"201": json_ok("StaticList", "created"), **ERRORS, **NOT_FOUND}},
        **get("Static lists", paging(STATIC_LIST_SORTS, "created_at") + [q("automation_id", TEXT, "of")],
              json_ok("StaticListPage"), not_found=False),
    },
    "/api/v1/static-lists/{id}": get("A static list and its members",
                                     [path_param("id", "list id")] + paging(LIST_MEMBER_SORTS, "contact_id", "asc"),
                                     json_ok("StaticListWithMembers")),
    "/api/v1/static-lists/{id}.csv": get("A static list's members (CSV)", [path_param("id", "list id")],
                                         csv_ok("Contact ID, Name, Email")),
    "/api/v1/mailings": get(
        "Mail analytics: one row per mailing (automation step)", paging(MAILING_SORTS, "date") + [
            q("automation_id", TEXT, "only this automation"), q("step", STEP_Q, "step"),
            q("q", TEXT, "subject contains"),
            FROM, TO], json_ok("MailingPage"), not_found=False,
        description="from/to select mailings by their date (first send)."),
    "/api/v1/mailings.csv": get(
        "Mail analytics (CSV)", [sort(MAILING_SORTS, "date"), ORDER, q("automation_id", TEXT, "automation"),
                                 q("step", STEP_Q, "step"), q("q", TEXT, "subject contains"), FROM, TO],
        csv_ok("Mailing ID, Automation ID, Step Index, Subject, Sending User, Sending Email, Status, Date, "
               "Total Sent, Delivered, Opened, Clicked, Bounced, Dropped, Deferred, Spam Reports, Unsubscribed"),
        not_found=False),
    "/api/v1/mailings/{id}": get("One mailing's figures", [path_param("id", "mailing id")], json_ok("Mailing")),
    "/api/v1/mailings/{id}/recipients": get(
        "A mailing's recipients with their message status and its time",
        [path_param("id", "mailing id")] + paging(MAILING_RECIPIENT_SORTS, "date") + [
            q("status", {"type": S, "enum": list(MESSAGE_STATUSES)}, "only this status"),
            q("q", TEXT, "name or e-mail contains")],
        json_ok("MailingRecipientPage"),
        description="sort=status orders by severity (dropped > bounced > ... > sent); date = status_at."),
    "/api/v1/contacts/{contact_id}/automations": get(
        "Contact card: every automation (run) the contact entered, with status and position",
        [CONTACT, LIMIT, OFFSET], json_ok("ContactAutomationPage")),
    "/api/v1/contacts/{contact_id}/timeline": get(
        "Every status change of the contact, newest first", [CONTACT] + paging(
            {"occurred_at": "occurred_at"}, "occurred_at") + [
            q("kind", {"type": S, "enum": list(TIMELINE_KINDS)}, "only this kind"),
            q("automation_id", TEXT, "only this automation")], json_ok("StatusChangePage")),
    "/api/v1/contacts/{contact_id}/messages": get(
        "Every message sent to the contact, with its status", [CONTACT] + paging(MESSAGE_SORTS, "sent_at") + [
            q("status", {"type": S, "enum": list(MESSAGE_STATUSES)}, "only this status"),
            q("automation_id", TEXT, "only this automation")], json_ok("ContactMessagePage")),
    # --- the web app's routes (sendtrail/web.py)
    "/healthz": get("Liveness", [], json_ok("Status"), not_found=False, tag="operations"),
    "/readyz": {"get": {"summary": "Readiness (503 with reasons when not ready)", "tags": ["operations"],
                        "responses": {"200": json_ok("Status"), "503": json_ok("Status", "not ready")}}},
    "/metrics": {"get": {"summary": "Prometheus metrics", "tags": ["operations"],
                         "responses": {"200": {"description": "Prometheus text exposition format",
                                               "content": {"text/plain": {"schema": {"type": S}}}}}}},
    "/api/v1/events": {"post": {
        "summary": "Publish canonical events (one, a list, or {\"events\": [...]})", "tags": ["ingest"],
        "requestBody": {"required": True, "content": {"application/json": {"schema": {
            "oneOf": [{"type": "object"}, {"type": "array", "items": {"type": "object"}},
                      obj({"events": {"type": "array", "items": {"type": "object"}}})]}}}},
        "responses": {"200": json_ok("EventsAccepted", "accepted (per-event results)"),
                      "202": json_ok("EventsAccepted", "accepted"), **ERRORS,
                      "413": {"description": "body too large"}, "415": {"description": "not application/json"}}}},
    "/webhooks/{provider}": {"post": {
        "summary": "Provider webhooks (signatures verified)", "tags": ["ingest"],
        "parameters": [path_param("provider", "mail provider",
                                  {"type": S, "enum": ["sendgrid", "mailgun", "ses", "postmark"]})],
        "requestBody": {"required": True, "content": {"application/json": {"schema": {}}}},
        "responses": {"200": {"description": "accepted"}, "202": {"description": "accepted"},
                      "400": {"description": "malformed payload"}, "401": {"description": "bad signature"},
                      "403": {"description": "bad signature"},
                      "404": {"description": "unknown provider"},
                      "503": {"description": "the provider's secret is not configured"}}}},
}

# Paths that answer without the bearer token (sendtrail.web.OPEN_PATHS)
for _path in ("/api/v1/openapi.json", "/healthz", "/readyz", "/webhooks/{provider}"):
    for _op in PATHS[_path].values():
        _op["security"] = []
PATHS["/metrics"]["get"]["responses"]["401"] = ERRORS["401"]

OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "sendtrail",
        "version": "1",
        "description": (
            "Where every contact stands in every automation and what happened to every message. "
            "Lists answer {items, total} and take limit (1-1000, default 50) and offset; unknown or malformed "
            "parameters get a 400 {error: {code, message}}; unknown ids a 404. Times are RFC 3339 UTC. "
            "When SENDTRAIL_API_TOKEN is set, send Authorization: Bearer <token>."),
    },
    "servers": [{"url": "/"}],
    "components": {
        "schemas": SCHEMAS,
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
    },
    "security": [{"bearer": []}],
    "paths": PATHS,
}
