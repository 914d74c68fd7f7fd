"""``sendtrail report``: the text it prints and its check against the generator's oracle."""
from __future__ import annotations

import copy
import io

import pytest

from sendtrail import report
from sendtrail.settings import Settings

AUTOMATIONS = [{"automation_id": "a1", "name": "Outreach", "participation": "once", "status": "active",
                "steps": [{"index": 0, "name": "Email 1", "kind": "email"},
                          {"index": 1, "name": "Connect", "kind": "linkedin_connect"}]}]
REPORTS = {"a1": {
    "nodes": [{"step_index": 0, "name": "Email 1", "kind": "email", "done": 5, "waiting": 1, "filtered": 0,
               "stopped": 2},
              {"step_index": 1, "name": "Connect", "kind": "linkedin_connect", "done": 3, "waiting": 2,
               "filtered": 0, "stopped": 0}],
    "completion": {"completed": 3, "in_progress": 2, "not_started": 1, "left": 2, "runs": 8},
    "statuses": {"finished": 3, "in_progress": 3, "bounced": 2, "paused": 0}}}
MAILING = {"total_sent": 5, "delivered": 4, "opened": 2, "clicked": 1, "bounced": 1, "dropped": 0, "deferred": 1,
           "spam_reports": 0, "unsubscribed": 0}
MAILINGS = [{"mailing_id": "a1:0", "automation_id": "a1", "step_index": 0, "date": "2026-11-12T05:27:00.152Z",
             "subject": "Email 1: a quick question about your Q3 pipeline", **MAILING}]
ORACLE = {
    "node_counts": {"a1": {"0": {"done": 5, "filtered": 0, "stopped": 2, "waiting": 1},
                           "1": {"done": 3, "filtered": 0, "stopped": 0, "waiting": 2}}},
    "status_counts": {"a1": {"bounced": 2, "finished": 3, "in_progress": 3}},
    # the oracle's in_progress / not_started put filtered runs by their steps, the API apart (left)
    "completion": {"a1": {"completed": 3, "in_progress": 4, "not_started": 1}},
    # the LinkedIn step's "mailing" is not an e-mail: the API does not list it, the check skips it
    "mailings": {"a1:0": dict(MAILING), "a1:1": {**MAILING, "total_sent": 3, "delivered": 0}},
}


def _diffs(automations=AUTOMATIONS, reports=REPORTS, mailings=MAILINGS, oracle=ORACLE):
    return report.oracle_differences(automations, reports, mailings, oracle)


def test_the_api_as_the_oracle_expects_has_no_differences():
    assert _diffs() == []


def test_a_node_count_that_differs_is_named_with_both_values():
    reports = copy.deepcopy(REPORTS)
    reports["a1"]["nodes"][1]["waiting"] = 1
    reports["a1"]["nodes"][1]["stopped"] = 1
    assert _diffs(reports=reports) == [
        "automation a1 step 1: API {'done': 3, 'waiting': 1, 'filtered': 0, 'stopped': 1}, "
        "oracle {'done': 3, 'waiting': 2, 'filtered': 0, 'stopped': 0}"]


def test_a_node_missing_on_either_side_is_a_difference():
    reports = copy.deepcopy(REPORTS)
    del reports["a1"]["nodes"][1]
    assert _diffs(reports=reports) == [
        "automation a1 step 1: API None, oracle {'done': 3, 'filtered': 0, 'stopped': 0, 'waiting': 2}"]


def test_status_counts_compare_per_status_zero_counts_being_absent():
    reports = copy.deepcopy(REPORTS)
    reports["a1"]["statuses"].update({"finished": 2, "unsubscribed": 1})
    assert _diffs(reports=reports) == ["automation a1 status finished: API 2, oracle 3",
                                       "automation a1 status unsubscribed: API 1, oracle 0"]


def test_completed_runs_are_compared():
    reports = copy.deepcopy(REPORTS)
    reports["a1"]["completion"]["completed"] = 2
    assert _diffs(reports=reports) == ["automation a1 completed runs: API 2, oracle 3"]


def test_mailing_totals_missing_extra_and_different_mailings():
    assert _diffs(mailings=[]) == ["mailing a1:0: not in the API"]
    extra = MAILINGS + [{"mailing_id": "a1:9", **MAILING}]
    assert _diffs(mailings=extra) == ["mailing a1:9: not in the oracle"]
    assert _diffs(mailings=[{**MAILINGS[0], "opened": 1}]) == ["mailing a1:0 opened: API 1, oracle 2"]


def test_an_automation_on_one_side_only():
    oracle = copy.deepcopy(ORACLE)
    oracle["node_counts"]["a2"] = {}
    oracle["status_counts"]["a2"] = {}
    assert _diffs(oracle=oracle) == ["automation a2: in the oracle, not in the API"]
    automations = AUTOMATIONS + [{"automation_id": "a0", "steps": []}]
    assert _diffs(automations=automations) == ["automation a0: in the API, not in the oracle"]


@pytest.mark.parametrize("oracle, ok, says", [
    (None, True, None),
    (ORACLE, True, "Checked against the oracle: the counts of all 2 nodes, the statuses and completed runs of 1 "
                   "automations, and the totals of 1 e-mail mailings, match."),
    ({**ORACLE, "status_counts": {"a1": {"finished": 8}}}, False, "NOT as the oracle expects (3 differences):"),
])
def test_print_report_prints_the_tables_and_the_verdict(monkeypatch, oracle, ok, says):
    monkeypatch.setattr(report, "fetch_report", lambda base, token: (AUTOMATIONS, REPORTS, MAILINGS))
    out = io.StringIO()
    assert report.print_report(Settings.from_env({}), None, out, oracle=oracle) is ok
    text = out.getvalue()
    assert "Automation Outreach (a1, once, active)" in text
    assert "statuses: bounced 2, finished 3, in_progress 3, paused 0" in text
    header, _, row = text.split("\nMailings\n")[1].splitlines()[:3]
    assert header.split()[:4] == ["subject", "mailing_id", "date", "total_sent"]
    assert row.startswith("Email 1: a quick question about\u2026 ")  # cut to 32 characters
    assert row.split()[-11:-9] == ["a1:0", "2026-11-12"]
    if says is None:
        assert "oracle" not in text
    else:
        assert says in text


def test_fetch_report_pages_through_lists_longer_than_the_apis_largest_page(monkeypatch):
    mailings = [{"mailing_id": f"a1:{i}", **MAILING} for i in range(2 * report.PAGE + 1)]
    asked = []

    def fake_get(base, path, token):
        asked.append(path)
        if path.startswith("/api/v1/automations/"):
            return REPORTS["a1"]
        rows = AUTOMATIONS if path.startswith("/api/v1/automations?") else mailings
        query = dict(kv.split("=") for kv in path.split("?")[1].split("&"))
        offset, limit = int(query["offset"]), int(query["limit"])
        assert limit <= 1000  # the API refuses larger pages
        return {"items": rows[offset:offset + limit], "total": len(rows)}

    monkeypatch.setattr(report, "_get", fake_get)
    automations, reports, got = report.fetch_report("http://api", None)
    assert automations == AUTOMATIONS and reports == REPORTS
    assert got == mailings
    assert [p for p in asked if p.startswith("/api/v1/mailings")] == [
        "/api/v1/mailings?limit=1000&offset=0", "/api/v1/mailings?limit=1000&offset=1000",
        "/api/v1/mailings?limit=1000&offset=2000"]


def _answer(monkeypatch, exc):
    def urlopen(req, timeout):
        raise exc
    monkeypatch.setattr(report.urllib.request, "urlopen", urlopen)


def test_an_api_error_is_reported_with_its_message_and_a_hint_for_401(monkeypatch):
    body = io.BytesIO(b'{"error":{"code":"unauthorized","message":"a bearer token is required"}}')
    _answer(monkeypatch, report.urllib.error.HTTPError("http://api/x", 401, "Unauthorized", {}, body))
    with pytest.raises(report.ReportError) as err:
        report.fetch_report("http://api", None)
    assert str(err.value) == ("GET http://api/api/v1/automations?limit=1000&offset=0: HTTP 401: a bearer token is "
                              "required (set SENDTRAIL_API_TOKEN to the API's token)")


def test_a_non_json_error_body_is_quoted(monkeypatch):
    _answer(monkeypatch, report.urllib.error.HTTPError("http://api/x", 502, "Bad Gateway", {},
                                                       io.BytesIO(b"<html>bad gateway</html>")))
    with pytest.raises(report.ReportError, match=r"HTTP 502: <html>bad gateway</html>$"):
        report.fetch_report("http://api", None)


def test_an_unreachable_api_is_named(monkeypatch):
    _answer(monkeypatch, report.urllib.error.URLError(ConnectionRefusedError(111, "Connection refused")))
    with pytest.raises(report.ReportError, match=r"^cannot reach the API at http://api: \[Errno 111\] Connection "
                                                 r"refused \(is the worker"):
        report.fetch_report("http://api", None)
