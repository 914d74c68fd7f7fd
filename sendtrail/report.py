"""``sendtrail report``: a short text report read from the HTTP API (per automation node counts, per mailing totals)."""
from __future__ import annotations

import json
import urllib.parse
import urllib.request
from typing import IO, Any

from sendtrail.settings import Settings


def _get(base: str, path: str, token: str | None) -> Any:
    req = urllib.request.Request(base.rstrip("/") + path)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def _table(rows: list[list[Any]], header: list[str]) -> str:
    cells = [header] + [[("" if c is None else str(c)) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def render_report(automations: list[dict], reports: dict[str, dict], mailings: list[dict]) -> str:
    out = []
    for auto in automations:
        aid = auto["automation_id"]
        rep = reports.get(aid) or {}
        out.append(f"\nAutomation {auto.get('name') or aid} ({aid}, {auto.get('participation', '')}, "
                   f"{auto.get('status', '')})")
        nodes = rep.get("nodes") or []
        out.append(_table([[n["step_index"], n.get("name"), n.get("kind"), n["done"], n["waiting"], n["filtered"],
                            n["stopped"]] for n in nodes],
                          ["step", "name", "kind", "done", "waiting", "filtered", "stopped"]))
        comp = rep.get("completion") or {}
        statuses = rep.get("statuses") or {}
        out.append("completion: " + ", ".join(f"{k} {v}" for k, v in comp.items()))
        out.append("statuses: " + ", ".join(f"{k} {v}" for k, v in sorted(statuses.items())))
    out.append("\nMailings")
    cols = ["mailing_id", "total_sent", "delivered", "opened", "clicked", "bounced", "dropped", "deferred",
            "spam_reports", "unsubscribed"]
    out.append(_table([[m.get(c) for c in cols] for m in mailings], cols))
    return "\n".join(out) + "\n"


def print_report(settings: Settings, base_url: str | None, out: IO[str]) -> None:
    base = base_url or f"http://127.0.0.1:{settings.web_port}"
    token = settings.api_token
    automations = _get(base, "/api/v1/automations?limit=1000", token)["items"]
    reports = {a["automation_id"]: _get(base, f"/api/v1/automations/{urllib.parse.quote(a['automation_id'], safe='')}"
                                              "/report", token)
               for a in automations}
    mailings = _get(base, "/api/v1/mailings?limit=1000", token)["items"]
    out.write(render_report(automations, reports, mailings))
