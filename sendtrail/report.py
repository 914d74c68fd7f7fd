"""``sendtrail report``: a short text report read from the HTTP API (per automation node counts, per mailing totals).

With ``--oracle FILE`` (the expected end state ``sendtrail generate --oracle`` wrote) it also checks the
API's figures against it: every node count and status count of every automation, its completed runs
(every step done), and the totals of every e-mail mailing (the API's mailings are e-mails only, seed 003), and exits 1 on any difference.
"""
from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from typing import IO, Any

from sendtrail.settings import Settings

PAGE = 1000  # the API's largest page
#: The Mailings table leads with the subject line, as seed 003's sent-mail table does.
SUBJECT_WIDTH = 32
MAILING_COLUMNS = ("total_sent", "delivered", "opened", "clicked", "bounced", "dropped", "deferred",
                   "spam_reports", "unsubscribed")


class ReportError(Exception):
    """The API could not be read (unreachable, or it answered with an error)."""


def _get(base: str, path: str, token: str | None) -> Any:
    url = base.rstrip("/") + path
    req = urllib.request.Request(url)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as err:
        body = err.read()
        try:
            message = json.loads(body)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = body[:200].decode(errors="replace")
        hint = " (set SENDTRAIL_API_TOKEN to the API's token)" if err.code == 401 else ""
        raise ReportError(f"GET {url}: HTTP {err.code}: {message}{hint}") from err
    except (urllib.error.URLError, OSError) as err:
        raise ReportError(f"cannot reach the API at {base}: {getattr(err, 'reason', err)} "
                          "(is the worker or `sendtrail api` running? --url or SENDTRAIL_WEB_PORT)") from err


def _table(rows: list[list[Any]], header: list[str]) -> str:
    cells = [header] + [[("" if c is None else str(c)) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _all(base: str, path: str, token: str | None, page: int = PAGE) -> list[dict]:
    """Every item of a list endpoint, page by page."""
    items: list[dict] = []
    while True:
        body = _get(base, f"{path}?limit={page}&offset={len(items)}", token)
        items.extend(body["items"])
        if len(body["items"]) < page or len(items) >= body["total"]:
            return items


def fetch_report(base: str, token: str | None) -> tuple[list[dict], dict[str, dict], list[dict]]:
    """What the report shows, from the API: the automations, each one's report, the mailings."""
    automations = _all(base, "/api/v1/automations", token)
    reports = {a["automation_id"]: _get(base, f"/api/v1/automations/{urllib.parse.quote(a['automation_id'], safe='')}"
                                              "/report", token)
               for a in automations}
    return automations, reports, _all(base, "/api/v1/mailings", token)


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
    out.append(_table([[_short(m.get("subject")), m.get("mailing_id"), (m.get("date") or "")[:10],
                        *(m.get(c) for c in MAILING_COLUMNS)] for m in mailings],
                      ["subject", "mailing_id", "date", *MAILING_COLUMNS]))
    return "\n".join(out) + "\n"


def _short(text: str | None, width: int = SUBJECT_WIDTH) -> str:
    """A subject line cut to ``width`` characters (an ellipsis marks the cut)."""
    if not text:
        return ""
    return text if len(text) <= width else text[:width - 1] + "\u2026"


def oracle_differences(automations: list[dict], reports: dict[str, dict], mailings: list[dict],
                       oracle: dict) -> list[str]:
    """Every difference between what the API reports and the oracle, as readable lines (none: a match).

    The oracle's mailing ids are the default ``<automation_id>:<step_index>``; its mailings of steps
    that are not e-mails are not checked (the API lists e-mails only)."""
    diffs = []
    known = {a["automation_id"]: a for a in automations}
    for aid in sorted(set(oracle["node_counts"]) ^ set(known)):
        diffs.append(f"automation {aid}: " + ("in the API, not in the oracle" if aid in known
                                              else "in the oracle, not in the API"))
    for aid in sorted(set(oracle["node_counts"]) & set(known)):
        rep = reports.get(aid) or {}
        got_nodes = {str(n["step_index"]): {k: n[k] for k in ("done", "waiting", "filtered", "stopped")}
                     for n in rep.get("nodes") or ()}
        for step in sorted(set(got_nodes) | set(oracle["node_counts"][aid]), key=int):
            want = oracle["node_counts"][aid].get(step)
            got = got_nodes.get(step)
            if want is not None and got is not None:
                want = {k: want[k] for k in got}
            if got != want:
                diffs.append(f"automation {aid} step {step}: API {got}, oracle {want}")
        want_done = (oracle.get("completion") or {}).get(aid, {}).get("completed")
        got_done = (rep.get("completion") or {}).get("completed")
        if want_done is not None and got_done != want_done:
            diffs.append(f"automation {aid} completed runs: API {got_done}, oracle {want_done}")
        got_st = {k: v for k, v in (rep.get("statuses") or {}).items() if v}
        want_st = {k: v for k, v in oracle["status_counts"][aid].items() if v}
        for status in sorted(set(got_st) | set(want_st)):
            if got_st.get(status, 0) != want_st.get(status, 0):
                diffs.append(f"automation {aid} status {status}: API {got_st.get(status, 0)}, "
                             f"oracle {want_st.get(status, 0)}")
    email_steps = {f"{aid}:{s['index']}" for aid, a in known.items() for s in a.get("steps") or ()
                   if s.get("kind") == "email"}
    want_m = {mid: m for mid, m in oracle["mailings"].items() if mid in email_steps}
    got_m = {m["mailing_id"]: m for m in mailings}
    for mid in sorted(set(want_m) | set(got_m)):
        got, want = got_m.get(mid), want_m.get(mid)
        if got is None or want is None:
            diffs.append(f"mailing {mid}: {'not in the API' if got is None else 'not in the oracle'}")
            continue
        for col in MAILING_COLUMNS:
            if got.get(col) != want.get(col):
                diffs.append(f"mailing {mid} {col}: API {got.get(col)}, oracle {want.get(col)}")
    return diffs


def print_report(settings: Settings, base_url: str | None, out: IO[str], oracle: dict | None = None) -> bool:
    """Print the report; with ``oracle``, also check it (returns False on a difference, True otherwise)."""
    automations, reports, mailings = fetch_report(base_url or f"http://127.0.0.1:{settings.web_port}",
                                                  settings.api_token)
    out.write(render_report(automations, reports, mailings))
    if oracle is None:
        return True
    diffs = oracle_differences(automations, reports, mailings, oracle)
    if diffs:
        out.write(f"\nNOT as the oracle expects ({len(diffs)} differences):\n" + "".join(f"  {d}\n" for d in diffs))
        return False
    nodes = sum(len(steps) for steps in oracle["node_counts"].values())
    out.write(f"\nChecked against the oracle: the counts of all {nodes} nodes, the statuses and completed runs of "
              f"{len(oracle['node_counts'])} automations, and the totals of {len(mailings)} e-mail mailings, match.\n")
    return True
