"""The onboarding pages (HTML) on a real state store: summary, search, timeline, anomalies, drift."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from urllib.parse import parse_qs, urlsplit

import pandas as pd
from ui_data import NEXT_NIGHT, NIGHT_RUN, PUSH_RUN, SYNC_RUN, client_for, prospect, pulled


class Page(HTMLParser):
    """What a page holds: its links (text → hrefs), its cells' text, its tags and attributes."""

    def __init__(self, html: str) -> None:
        super().__init__(convert_charrefs=True)
        self.links: list[tuple[str, str, dict]] = []
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []
        self._href: tuple[str, dict] | None = None
        self._link_text: list[str] = []
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list) -> None:
        attributes = dict(attrs)
        self.tags.append((tag, attributes))
        if tag == "a" and "href" in attributes:
            self._href, self._link_text = (attributes["href"], attributes), []

    def handle_endtag(self, tag: str) -> None:
        if tag == "a" and self._href:
            self.links.append(("".join(self._link_text).strip(), *self._href))
            self._href = None

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        if self._href:
            self._link_text.append(data)

    def href(self, text: str) -> str:
        return next(href for link_text, href, _ in self.links if link_text == text)


def test_the_summary_counts_prospects_by_stage_and_legal_entity_and_names_the_oldest_pending(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    html = Page(page.text)
    # One row per stage, a column per legal entity; counts link to the list filtered alike.
    assert html.href("approved") == "/prospects?stage=approved"
    assert "/prospects?stage=invalid&legal_entity=usrt" in [href for _, href, _ in html.links]
    summary = client.get("/api/summary").json()
    assert summary["by_legal_entity"]["usrt"]["approved"] == 1 and summary["by_legal_entity"]["usmf"]["lead_open"] == 1
    assert summary["pending"]["total"] == 3  # usrt P-3 (qualified), P-4 (invalid), usmf P-1 (lead_open)
    oldest = summary["pending"]["oldest"]
    assert (oldest["legal_entity"], oldest["prospect_id"]) == ("usmf", "P-1")  # same time: by key
    assert "/prospect?legal_entity=usmf&prospect_id=P-1" in [href for _, href, _ in html.links]


def test_the_oldest_pending_is_the_first_seen_of_the_undecided(store):
    store.record_pulled(pulled(prospect("usrt", "P-8", error="prospect usrt/P-8: CompanyName: empty")), "run-0")
    store.record_pulled(pulled(prospect("usrt", "P-9")), "run-1")
    store.record_pulled(pulled(prospect("usrt", "P-1")), "run-2")
    with client_for(store) as client:
        pending = client.get("/api/summary").json()["pending"]
        assert pending["oldest"]["prospect_id"] == "P-8" and pending["oldest"]["age_seconds"] >= 0
        assert pending["oldest_valid"]["prospect_id"] == "P-9"  # bad records aside
        store.update("usrt", "P-9", "run-3", decision="rejected")
        assert client.get("/api/summary").json()["pending"]["oldest_valid"]["prospect_id"] == "P-1"
        page = Page(client.get("/").text)
        assert "oldest pending:" in "".join(page.text) and "bad records aside:" in "".join(page.text)
        assert [text for text, _, _ in page.links if text.startswith("usrt/")] == ["usrt/P-8", "usrt/P-1"]


def test_the_search_finds_by_id_name_company_email_lead_and_error_in_any_case(client):
    def keys(**params) -> list[tuple[str, str]]:
        page = client.get("/prospects", params=params)
        assert page.status_code == 200
        return [tuple(parse_qs(urlsplit(href).query)[name][0] for name in ("legal_entity", "prospect_id"))
                for _, href, _ in Page(page.text).links if href.startswith("/prospect?")]  # fmt: skip

    assert keys(q="grace") == [("usrt", "P-2")]
    assert keys(q="SEMAPHORES") == [("usmf", "P-1")]
    assert keys(q="p-3@usrt.example") == [("usrt", "P-3")]
    assert keys(q="lead-usrt-p-1") == [("usrt", "P-1")]
    assert keys(q="HTTP 400") == [("usrt", "P-3")]
    assert keys(q="P-1") == [("usmf", "P-1"), ("usrt", "P-1")]
    assert keys(q="P-1", legal_entity="usrt") == [("usrt", "P-1")]
    assert keys(stage="invalid") == [("usrt", "P-4")]
    assert keys(q="nobody") == []
    # The list shows stage, lead, opportunity, decision and last error.
    page = client.get("/prospects", params={"q": "P-3"}).text
    assert "lead-usrt-P-3" in page and "opp-3" in page and "qualified" in page and "HTTP 400 Bad Request" in page
    assert "approved" in client.get("/prospects", params={"q": "Ada"}).text


def test_like_wildcards_in_the_search_match_themselves(store):
    store.record_pulled(pulled(prospect("usrt", "P-1", "100% Ada"), prospect("usrt", "P-2", "Grace_Hopper"),
                               prospect("usrt", "P-3", "Alan Turing")), "run-1")  # fmt: skip
    with client_for(store) as client:
        def names(q: str) -> list[str]:
            return [item["name"] for item in client.get("/api/prospects", params={"q": q}).json()["items"]]

        assert names("%") == ["100% Ada"]
        assert names("_") == ["Grace_Hopper"]
        assert names("\\") == []


def test_the_list_is_read_a_page_at_a_time(store):
    store.record_pulled(pulled(*(prospect("usrt", f"P-{n:04d}") for n in range(450))), "run-1")
    with client_for(store) as client:
        first = client.get("/api/prospects", params={"per_page": 200}).json()
        assert (len(first["items"]), first["total"], first["pages"]) == (200, 450, 3)
        last = client.get("/api/prospects", params={"per_page": 200, "page": 3}).json()
        assert [item["prospect_id"] for item in last["items"]] == [f"P-{n:04d}" for n in range(400, 450)]
        assert client.get("/api/prospects", params={"per_page": 201}).status_code == 422
        page = client.get("/prospects").text
        assert len(re.findall(r'href="/prospect\?', page)) == 50  # the default page
        assert Page(page).href("next ›") == "/prospects?page=2&per_page=50"


def test_the_timeline_shows_every_transition_with_links_to_its_run_and_task_in_airflow(client):
    page = client.get("/prospect", params={"legal_entity": "usrt", "prospect_id": "P-1"})
    assert page.status_code == 200
    html = Page(page.text)
    run = lambda dag, run_id: f"/dags/{dag}/runs/{run_id.replace(':', '%3A').replace('+', '%2B')}"  # noqa: E731
    sync, night = "b2b_prospect_sync", "b2b_outcome_reconciliation"
    expected = [  # (to stage, run link, task link)
        ("pulled", run(sync, SYNC_RUN), run(sync, SYNC_RUN) + "/tasks/pull_prospects/mapped"),
        ("lead_open", run(sync, PUSH_RUN), run(sync, PUSH_RUN) + "/tasks/push_leads/mapped"),
        ("qualified", run(night, NIGHT_RUN), run(night, NIGHT_RUN) + "/tasks/read_outcomes"),
        ("customers_created", run(night, NIGHT_RUN), run(night, NIGHT_RUN) + "/tasks/write_customers/mapped"),
        ("won", run(night, NEXT_NIGHT), run(night, NEXT_NIGHT) + "/tasks/read_outcomes"),
        ("approved", run(night, NEXT_NIGHT), run(night, NEXT_NIGHT) + "/tasks/approve_won/mapped"),
    ]
    airflow_links = [href for _, href, attrs in html.links if "data-airflow-ui" in attrs]
    for _, run_link, task_link in expected:
        assert run_link in airflow_links and task_link in airflow_links
    timeline = client.get("/api/prospects/usrt/P-1").json()["timeline"]["items"]
    assert [(t["to_stage"], t["run_url"], t["task_url"]) for t in timeline] == expected
    # The run id is shown as it is, the link carries it percent-encoded.
    assert SYNC_RUN in "".join(html.text)
    # An error kept without a change of stage: the run of the reconciliation, no task guessed.
    p3 = client.get("/api/prospects/usrt/P-3").json()["timeline"]["items"][-1]
    assert (p3["from_stage"], p3["to_stage"], p3["task_url"]) == ("qualified", "qualified", None)
    assert p3["run_url"] == run(night, NIGHT_RUN) and "HTTP 400" in p3["error"]


def test_links_hold_the_mount_and_the_airflow_base_path(filled):
    """Mounted as Airflow mounts it, below `[api] base_url` = http://host/airflow/."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from b2b_onboarding.airflow.ui import URL_PREFIX

    airflow = FastAPI(root_path="/airflow")
    airflow.mount(URL_PREFIX, client_for(filled).app)
    with TestClient(airflow) as client:
        page = client.get("/airflow/b2b-onboarding/prospect", params={"legal_entity": "usrt", "prospect_id": "P-2"})
        links = [href for _, href, _ in Page(page.text).links]
        assert any(href.startswith("/airflow/dags/b2b_outcome_reconciliation/runs/") for href in links)
        assert "/airflow/b2b-onboarding/prospects" in links
        assert '<link rel="stylesheet" href="/airflow/b2b-onboarding/static/style.css">' in page.text


def test_the_same_prospect_id_in_two_legal_entities_has_two_timelines(client):
    usmf = client.get("/prospect", params={"legal_entity": "usmf", "prospect_id": "P-1"}).text
    assert "Edsger Dijkstra" in usmf and "Ada Lovelace" not in usmf


def test_an_unknown_prospect_is_a_404_page(client):
    page = client.get("/prospect", params={"legal_entity": "usrt", "prospect_id": "P-404"})
    assert page.status_code == 404 and "usrt/P-404" in page.text


def test_anomalies_and_kept_records_show_their_errors(client):
    html = client.get("/anomalies").text
    assert "lead_reopened" in html and "the lead of prospect usrt/P-2 is open in Sales" in html
    assert "value is not a valid email address" in html  # the bad record
    assert "HTTP 400 Bad Request" in html  # the record Commerce refused
    page = Page(html)
    assert f"/dags/b2b_outcome_reconciliation/runs/{NEXT_NIGHT.replace(':', '%3A').replace('+', '%2B')}" in [
        href for _, href, _ in page.links]  # fmt: skip
    anomalies = client.get("/api/anomalies").json()["items"]
    assert [(a["kind"], a["times_seen"], a["first_run_id"], a["last_run_id"]) for a in anomalies] == [
        ("lead_reopened", 2, NIGHT_RUN, NEXT_NIGHT)]  # fmt: skip
    kept = client.get("/api/kept").json()["items"]
    assert sorted((k["prospect_id"], k["stage"]) for k in kept) == [("P-3", "qualified"), ("P-4", "invalid")]
    assert next(k for k in kept if k["prospect_id"] == "P-4")["last_run_url"].startswith("/dags/b2b_prospect_sync/")


def test_the_drift_page_shows_the_latest_check_with_findings(client):
    html = client.get("/drift").text
    assert "lead usrt:P-77 names no B2B prospect in Commerce" in html and "state disagreement" in html
    assert "B2B prospect (Pending) has no Commerce B2B lead" not in html  # the night before
    assert "check_drift log" in html
    earlier = client.get("/drift", params={"run_id": NIGHT_RUN}).text
    assert "B2B prospect (Pending) has no Commerce B2B lead" in earlier


def test_a_later_clean_drift_check_is_told_apart_from_older_findings(filled):
    later = {"run_id": "scheduled__2026-11-22T02:00:00+00:00", "ended_at": "2999-01-01T00:00:00+00:00"}
    with client_for(filled, latest_drift_check=lambda: later) as client:
        assert "found no drift" in client.get("/drift").text
        assert "none found by the latest check" in client.get("/").text
        report = client.get("/api/drift").json()
        assert report["latest_check_found_nothing"] and report["run_id"] == NEXT_NIGHT
    same = {"run_id": NEXT_NIGHT, "ended_at": "2999-01-01T00:00:00+00:00"}
    with client_for(filled, latest_drift_check=lambda: same) as client:
        assert not client.get("/api/drift").json()["latest_check_found_nothing"]


def test_pages_before_any_run_say_so(tmp_path):
    import sqlalchemy as sa
    from fastapi.testclient import TestClient

    from b2b_onboarding.airflow.ui import auth
    from b2b_onboarding.airflow.ui.app import create_app

    app = create_app(sa.create_engine(f"sqlite:///{tmp_path / 'empty.db'}"), latest_drift_check=lambda: None)
    app.dependency_overrides[auth.reader] = lambda: None
    with TestClient(app) as client:
        page = client.get("/")
        assert page.status_code == 503 and "no run of the onboarding DAGs" in page.text
        assert client.get("/api/summary").status_code == 503


def test_pages_are_not_cached_and_allow_only_their_own_scripts(client):
    page = client.get("/")
    assert page.headers["cache-control"] == "no-store" and page.headers["x-content-type-options"] == "nosniff"
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "frame-ancestors 'self'" in policy
    assert client.get("/static/frame.js").headers["content-type"].startswith("text/javascript")
    assert client.get("/static/../app.py").status_code == 404
    assert client.get("/static/app.py").status_code == 404


def test_the_json_detail_takes_any_key_as_query_parameters(store):
    store.record_pulled(pulled(prospect("usrt", "P/2"), prospect("usrt", "..")), "run-1")
    with client_for(store) as client:
        by_path = client.get("/api/prospects/usrt/P%2F2")
        assert by_path.status_code == 200 and by_path.json()["prospect"]["prospect_id"] == "P/2"
        by_query = client.get("/api/prospect", params={"legal_entity": "usrt", "prospect_id": ".."})
        assert by_query.status_code == 200 and by_query.json()["prospect"]["prospect_id"] == ".."
        assert client.get("/api/prospect", params={"legal_entity": "usrt", "prospect_id": "P-404"}).status_code == 404
        assert pd.notna(by_query.json()["prospect"]["created_at"])


def test_the_timeline_says_what_changed_without_a_change_of_stage(filled):
    filled.record_pulled(pulled(prospect("usmf", "P-1", "Edsger W. Dijkstra", "Semaphores BV")), NEXT_NIGHT)
    client = client_for(filled)
    last = client.get("/api/prospects/usmf/P-1").json()["timeline"]["items"][-1]
    assert (last["from_stage"], last["to_stage"], last["detail"]) == ("lead_open", "lead_open",
                                                                      "corrected in Commerce: ProspectName")  # fmt: skip
    page = client.get("/prospect", params={"legal_entity": "usmf", "prospect_id": "P-1"})
    assert "corrected in Commerce: ProspectName" in page.text
