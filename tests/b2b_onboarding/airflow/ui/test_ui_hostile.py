"""Prospect data is hostile input: names, companies, ids, errors and run ids with markup render as
text on every page, never as markup, and every key links back to its own prospect."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from urllib.parse import urlsplit

import pandas as pd
import pytest
from test_ui_pages import Page
from ui_data import client_for, dag_run, prospect, pulled, record_failure, runs_of

_spec = importlib.util.spec_from_file_location("hostile_strings", Path(__file__).parents[2] / "hostile_strings.py")
hostile_strings = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(hostile_strings)

MARKUP = [
    "<script>alert(1)</script>",
    "</td></tr></table><script>alert(2)</script>",
    '"><img src=x onerror=alert(3)>',
    "' onmouseover='alert(4)",
    "javascript:alert(5)",
    "<a href=javascript:alert(6)>click</a>",
    "</textarea><svg onload=alert(7)>",
    "<!--",
    "]]><![CDATA[",
    "{{ 7 * 7 }}{% raw %}",
    "&lt;script&gt;",
    "&amp;",
    "<style>body{display:none}</style>",
    "<base href=//evil.example/>",
    "<meta http-equiv=refresh content=0;url=//evil.example/>",
]
# Keys a bad record may carry (ids are validated only for valid records; a bad one keeps its raw id).
HOSTILE_IDS = [*hostile_strings.HOSTILE_VALID_PROSPECT_IDS, '"><svg onload=alert(8)>', "<b>P</b>", "..", "../x",
               "a?b=c#d", "P&legal_entity=usmf", "%2e%2e", "/"]  # fmt: skip
EVIL_RUN = 'manual__"><script>alert(9)</script>'

# What the templates make: any other tag, any event handler, any script but the app's own is an injection.
ALLOWED_TAGS = {"html", "head", "meta", "title", "link", "script", "body", "header", "nav", "strong", "a", "form",
                "input", "button", "main", "h1", "h2", "p", "section", "div", "span", "table", "thead", "tbody",
                "tfoot", "tr", "th", "td", "small", "br", "label", "select", "option", "caption", "code", "ul",
                "li", "details", "summary", "em", "figure", "figcaption", "svg", "rect", "text"}  # fmt: skip


def assert_inert(html: str) -> Page:
    page = Page(html)
    for tag, attributes in page.tags:
        assert tag in ALLOWED_TAGS, f"injected <{tag}>"
        assert not any(name.startswith("on") for name in attributes), f"event handler on <{tag}>: {attributes}"
        if tag == "script":
            assert attributes.get("src", "").endswith("/static/frame.js")
        for name in ("href", "src", "action"):
            if name in attributes:
                assert attributes[name].startswith("/") and not attributes[name].startswith("//"), attributes[name]
    return page


@pytest.fixture
def hostile(store):
    names = MARKUP + [s for s in hostile_strings.HOSTILE_STRINGS if "\x00" not in s]
    rows = [prospect("usrt", f"N-{n:03d}", name=name, company=name) for n, name in enumerate(names)]
    rows += [prospect("usrt", key, name=f"key holder {n}") for n, key in enumerate(HOSTILE_IDS)]
    rows += [prospect('"><i>le', "P-1", error="<script>alert(10)</script> is not an email")]
    store.record_pulled(pulled(*rows), EVIL_RUN)
    store.update_many([(("usrt", "N-000"), {}, "<script>alert(11)</script>")], EVIL_RUN)
    store.record_anomalies([(("usrt", "N-001"), "lead_reopened", "<img src=x onerror=alert(12)>")], EVIL_RUN)
    store.record_drift(pd.DataFrame([{"kind": "missing lead", "legal_entity": "usrt", "prospect_id": "<b>x</b>",
                                      "lead_id": "<i>y</i>", "detail": "<script>alert(13)</script>"}]), EVIL_RUN)  # fmt: skip
    return store, names


def test_hostile_names_render_as_text_on_every_page(hostile):
    store, names = hostile
    with client_for(store) as client:
        listing = assert_inert(client.get("/prospects", params={"per_page": 200}).text)
        text = "".join(listing.text)
        for name in MARKUP:
            assert name in text  # shown as typed, as text
        for path in ["/", "/anomalies", "/drift", f"/drift?run_id={EVIL_RUN}"]:
            page = assert_inert(client.get(path).text)
        assert "<script>alert(13)</script>" in "".join(page.text)
        detail = assert_inert(client.get("/prospect", params={"legal_entity": "usrt", "prospect_id": "N-000"}).text)
        assert MARKUP[0] in "".join(detail.text) and "<script>alert(11)</script>" in "".join(detail.text)
        assert EVIL_RUN in "".join(detail.text)
        run_link = next(href for _, href, attrs in detail.links if "data-airflow-ui" in attrs)
        assert urlsplit(run_link).path.count("/") == 4  # /dags/<dag>/runs/<run id, one segment>
        assert "<" not in run_link and '"' not in run_link
        for name in MARKUP:  # searching for markup finds it and echoes the query as text
            found = assert_inert(client.get("/prospects", params={"q": name}).text)
            assert name in "".join(found.text)


def test_hostile_failures_runs_and_bad_values_render_as_text(hostile):
    """A failure's message and chunk, a run id, a bad record's value: text on the summary, the runs,
    the failures, the prospects held up and the bad record's page."""
    store, _ = hostile
    error = "prospect usrt/B-1: CompanyName: String should have at least 1 character"
    store.record_pulled(pulled({**prospect("usrt", "B-1", error=error), "prospect": {"CompanyName": MARKUP[1]}}), EVIL_RUN)
    message = "<script>alert(14)</script> refused"
    record_failure(store, "b2b_prospect_sync", EVIL_RUN, "push_leads", f"{message}\n<b>more</b>", 0,
                   ("usrt", "<b>", "z</td>"))  # fmt: skip
    runs = runs_of(b2b_prospect_sync=[dag_run(EVIL_RUN, "failed", "2026-11-21T02:15:00+00:00")])
    with client_for(store, dag_runs=runs) as client:
        for path in ["/", "/runs", "/failures", "/prospects?q=N-00"]:
            page = assert_inert(client.get(path).text)
            text = "".join(page.text)
            assert message in text and "[usrt <b>…z</td>]" in text and EVIL_RUN in text, path
        detail = assert_inert(client.get("/prospect", params={"legal_entity": "usrt", "prospect_id": "B-1"}).text)
        assert MARKUP[1] in "".join(detail.text)


def test_every_hostile_key_links_to_its_own_prospect(hostile):
    store, _ = hostile
    with client_for(store) as client:
        listing = Page(client.get("/prospects", params={"q": "key holder", "per_page": 200}).text)
        links = {text: href for text, href, _ in listing.links if href.startswith("/prospect?")}
        assert len(links) == len(HOSTILE_IDS)
        for key in HOSTILE_IDS:
            page = client.get(links[f"usrt/{key}"])
            assert page.status_code == 200
            heading = Page(page.text)
            assert f"usrt/{key}" in "".join(heading.text)
            json = client.get("/api/prospect", params={"legal_entity": "usrt", "prospect_id": key}).json()
            assert json["prospect"]["prospect_id"] == key
        bad = Page(client.get("/anomalies").text)
        bad_link = next(href for text, href, _ in bad.links if text == '"><i>le/P-1')
        assert client.get(bad_link).status_code == 200


def test_the_json_returns_hostile_values_as_they_are(hostile):
    store, names = hostile
    with client_for(store) as client:
        items = client.get("/api/prospects", params={"q": "<script>", "per_page": 200}).json()["items"]
        assert {item["name"] for item in items} >= {MARKUP[0], MARKUP[1]}
        response = client.get("/api/prospects", params={"per_page": 1})
        assert response.headers["content-type"] == "application/json"
