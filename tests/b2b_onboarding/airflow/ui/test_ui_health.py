"""How the runs are doing, on the pages: each DAG's run history and its chart, the task failures with
the log of each failed try, the prospects a failed task holds up, the summary's word on a failed last
run and on missing pools. Airflow's runs and pools are what the test gives `create_app`."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from test_ui_pages import Page
from ui_data import (
    NEXT_NIGHT,
    NIGHT_RUN,
    client_for,
    dag_run,
    prospect,
    pulled,
    record_failure,
    record_result,
    runs_of,  # fmt: skip
)

from b2b_onboarding.airflow.ui import health

SYNC, OUTCOMES, NIGHT = "b2b_prospect_sync", "b2b_outcomes", "b2b_outcome_reconciliation"
OUTCOMES_RUN = "asset_triggered__2026-11-21T02:05:00+00:00"
FAILED = "scheduled__2026-11-21T02:15:00+00:00"
SUCCEEDED = "scheduled__2026-11-21T02:00:00+00:00"
RUNNING = "scheduled__2026-11-21T02:30:00+00:00"
DRY = "manual__2026-11-21T01:50:00+00:00"
# A one line longer than any column: shown whole.
AUTH = ("AuthenticationError: Entra ID refused the client secret of Airflow connection 'd365_sales' (tenant "
        "contoso, AADSTS7000215: invalid client secret provided) for Dataverse (Sales): upsert leads for usrt:P-1 … "
        "usrt:P-3 failed with HTTP 401. Next step: renew the secret in Entra ID and set it on the connection d365_sales.")
THROTTLED = "D365Error: Commerce HQ: approve for usrt:P-1 failed after 6 attempts with HTTP 429. Next step: wait."


def path(run_id: str) -> str:
    """A run id as a link carries it: one path segment."""
    return run_id.replace(":", "%3A").replace("+", "%2B")


def words(page: Page) -> str:
    """A page's text as a reader reads it: its words, one space apart."""
    return " ".join("".join(page.text).split())


def sync_runs(*runs: dict):
    """Airflow's runs of the sync (newest first), and none of the reconciliation."""
    return runs_of(**{SYNC: list(runs)})


@pytest.fixture
def history(store):
    """The sync: a run running, one that failed at one chunk of push_leads (correct_leads recorded
    nothing), one that succeeded, a dry run; the reconciliation: one that failed at read_outcomes,
    one that succeeded."""
    record_result(store, SYNC, FAILED, "pull_prospects", 0, "pull", "usrt", pulled=5, invalid=1, commerce_requests=2,
                  commerce_throttled=1)  # fmt: skip
    record_result(store, SYNC, FAILED, "pull_prospects", 1, "pull", "usmf", pulled=2, commerce_requests=1)
    record_result(store, SYNC, FAILED, "push_leads", 1, "push", "usmf", created=2, dataverse_requests=3)
    record_failure(store, SYNC, FAILED, "push_leads", AUTH, 0, ("usrt", "P-1", "P-3"))
    record_result(store, SYNC, SUCCEEDED, "pull_prospects", 0, "pull", "usrt", pulled=5, invalid=1, commerce_requests=2)
    record_result(store, SYNC, SUCCEEDED, "push_leads", 0, "push", "usrt", created=3, adopted=1, failed=1,
                  dataverse_requests=4, dataverse_throttled=2)  # fmt: skip
    record_result(store, SYNC, SUCCEEDED, "correct_leads", 0, "correct leads", "usrt", corrected=2, conflicts=1,
                  dataverse_requests=1)  # fmt: skip
    record_result(store, SYNC, DRY, "pull_prospects", 0, "pull", "usrt", dry_run=True, pulled=5)
    record_failure(store, NIGHT, NEXT_NIGHT, "read_outcomes", "AuthenticationError: Entra ID refused the secret.")
    record_result(store, NIGHT, NIGHT_RUN, "read_outcomes", -1, "read outcomes", leads_read=3, dataverse_requests=2)
    record_result(store, NIGHT, NIGHT_RUN, "write_customers", 0, "write customers", "usrt", written=2,
                  **{"created one by one": 1, "failed one by one": 1, "already done": 4}, commerce_requests=3)  # fmt: skip
    record_result(store, NIGHT, NIGHT_RUN, "approve_won", 0, "approve", "usrt", approved=1, conflicts=1,
                  commerce_requests=2, commerce_throttled=3)  # fmt: skip
    record_result(store, NIGHT, NIGHT_RUN, "reject_lost", 0, "reject", "usrt", written=1, commerce_requests=1)
    record_result(store, NIGHT, NIGHT_RUN, "check_drift", -1, "drift check", prospects=5, leads=5, commerce_requests=1,
                  dataverse_requests=1)  # fmt: skip
    record_result(store, OUTCOMES, OUTCOMES_RUN, "read_outcomes", -1, "read outcomes", leads_read=1,
                  dataverse_requests=2)  # fmt: skip
    record_result(store, OUTCOMES, OUTCOMES_RUN, "approve_won", 0, "approve", "usrt", approved=2, commerce_requests=1)
    runs = runs_of(**{
        SYNC: [dag_run(RUNNING, "running", (datetime.now(UTC) - timedelta(seconds=90)).isoformat(), None),
               dag_run(FAILED, "failed", "2026-11-21T02:15:00+00:00", 240),
               dag_run(SUCCEEDED, "success", "2026-11-21T02:00:00+00:00", 120),
               dag_run(DRY, "success", "2026-11-21T01:50:00+00:00", 30)],
        OUTCOMES: [dag_run(OUTCOMES_RUN, "success", "2026-11-21T02:05:00+00:00", 20)],
        NIGHT: [dag_run(NEXT_NIGHT, "failed", "2026-11-21T02:00:00+00:00", 60),
                dag_run(NIGHT_RUN, "success", "2026-11-20T02:00:00+00:00", 600)],
    })  # fmt: skip
    with client_for(store, dag_runs=runs) as client:
        yield client


def test_the_run_history_sums_each_runs_step_results_and_shows_missing_steps_as_missing(history):
    sync, outcomes, night = history.get("/api/runs").json()["dags"]
    assert [run["run_id"] for run in sync["runs"]] == [RUNNING, FAILED, SUCCEEDED, DRY]  # newest first
    running, failed, succeeded, dry = sync["runs"]
    assert succeeded["figures"] == {"pulled": 5, "invalid": 1, "leads_created": 3, "leads_adopted": 1,
                                    "leads_corrected": 2, "record_errors": 2, "commerce_requests": 2,
                                    "dataverse_requests": 5, "throttled": 2}  # fmt: skip
    assert (succeeded["partial"], succeeded["missing_steps"], succeeded["failures"]) == ([], [], [])
    assert (succeeded["duration_seconds"], succeeded["dry_run"]) == (120, False)
    # A chunk of push_leads failed: its figures are a floor; correct_leads recorded nothing: missing, not 0.
    assert failed["figures"]["pulled"] == 7 and failed["figures"]["leads_created"] == 2
    assert failed["figures"]["leads_corrected"] is None
    assert {"leads_created", "leads_adopted", "record_errors", "dataverse_requests"} <= set(failed["partial"])
    assert "pulled" not in failed["partial"]
    assert failed["missing_steps"] == ["correct_leads"]
    assert [(f["task_id"], f["chunk"], f["message"]) for f in failed["failures"]] == [
        ("push_leads", "usrt P-1…P-3", AUTH)]  # fmt: skip
    assert running["figures"]["pulled"] is None and 90 <= running["duration_seconds"] < 120  # so far
    assert dry["dry_run"] is True  # told by its step results, whatever the run's conf says
    [outcomes_run] = outcomes["runs"]  # the reconciliation's figures, of its own runs
    assert outcomes_run["figures"] == {"customers_written": 0, "approved": 2, "rejected": 0, "record_errors": 0,
                                       "commerce_requests": 1, "dataverse_requests": 2, "throttled": 0}  # fmt: skip
    night_failed, night_succeeded = night["runs"]
    assert set(night_failed["figures"].values()) == {None} and night_failed["missing_steps"][0] == "read_outcomes"
    assert night_succeeded["figures"] == {"customers_written": 3, "approved": 1, "rejected": 1, "record_errors": 2,
                                          "commerce_requests": 7, "dataverse_requests": 3, "throttled": 3}  # fmt: skip

    page = Page(history.get("/runs").text)
    text = words(page)
    assert "missing" in text and "≥ 2" in text and "no result from correct_leads" in text
    assert "dry run" in text and "AuthenticationError: Entra ID refused the client secret" in text
    assert f"/dags/{SYNC}/runs/{path(FAILED)}" in [href for _, href, _ in page.links]


def test_a_dry_run_is_marked_from_its_conf_too(store):
    runs = sync_runs(dag_run(DRY, "success", "2026-11-21T01:50:00+00:00", dry_run=True))
    with client_for(store, dag_runs=runs) as client:
        assert client.get("/api/runs").json()["dags"][0]["runs"][0]["dry_run"] is True


def test_a_run_older_than_the_step_results_shows_its_figures_as_missing(store):
    with client_for(store, dag_runs=sync_runs(dag_run(SUCCEEDED, "success", "2026-11-21T02:00:00+00:00"))) as client:
        run = client.get("/api/runs").json()["dags"][0]["runs"][0]
        assert set(run["figures"].values()) == {None} and len(run["missing_steps"]) == 3


def test_the_chart_has_one_bar_per_run_coloured_by_state_and_failed_runs_marked(history):
    html = history.get("/runs").text
    svg = re.findall(r"<svg[^>]*>.*?</svg>", html, re.S)
    assert len(svg) == 3  # one per DAG, inline: no script, no external asset
    sync = svg[0]
    assert 'role="img"' in sync and "aria-label=\"How long each of the last 4 runs of b2b_prospect_sync took" in sync
    assert "took, oldest first: 2 success, 1 failed, 1 running" in sync
    bars = re.findall(r'<rect class="bar ([^"]*)"[^>]*height="(\d+)"><title>([^<]*)</title></rect>', sync)
    titles = [title for _, _, title in bars]  # one a run, the oldest on the left; hovered, it names the run
    assert [title.rsplit(": ", 1)[0] for title in titles] == [DRY, SUCCEEDED, FAILED, RUNNING]
    assert titles[:3] == [f"{DRY}: success (dry run), 30 s", f"{SUCCEEDED}: success, 2 min", f"{FAILED}: failed, 4 min"]
    classes = [cls.split() for cls, _, _ in bars]
    assert classes == [["bar-success", "bar-dry"], ["bar-success"], ["bar-failed"], ["bar-running"]]
    heights = [int(height) for _, height, _ in bars]
    assert heights[0] < heights[3] < heights[1] < heights[2] == health.CHART_HEIGHT  # as long as each took (so far)
    assert sync.count("✕") == 1  # the failed run, marked above its bar
    assert "<script" not in html.split("<main>")[1] and "http" not in sync


def test_failures_are_listed_newest_first_with_their_whole_first_line_and_a_link_to_the_log_of_their_try(store):
    now = datetime.now(UTC)
    record_failure(store, SYNC, FAILED, "push_leads", AUTH + "\nTraceback (most recent call last):\n  …", 2,
                   ("usrt", "P-1", "P-3"), failed_at=now - timedelta(minutes=3))  # fmt: skip
    record_failure(store, NIGHT, NEXT_NIGHT, "approve_won", THROTTLED, 0, ("usrt", "P-1", "P-1"),
                   failed_at=now - timedelta(minutes=2))  # fmt: skip
    record_failure(store, NIGHT, NEXT_NIGHT, "read_outcomes", "AuthenticationError: refused.",
                   failed_at=now - timedelta(minutes=1))  # fmt: skip
    with client_for(store) as client:
        items = client.get("/api/failures").json()["items"]
        assert [f["task_id"] for f in items] == ["read_outcomes", "approve_won", "push_leads"]  # newest first
        read, approve, push = items
        # The log of the try that failed: the mapped instance's own.
        assert push["log_url"] == f"/dags/{SYNC}/runs/{path(FAILED)}/tasks/push_leads/mapped/2?try_number=3"
        assert approve["log_url"] == f"/dags/{NIGHT}/runs/{path(NEXT_NIGHT)}/tasks/approve_won/mapped/0?try_number=3"
        assert read["log_url"] == f"/dags/{NIGHT}/runs/{path(NEXT_NIGHT)}/tasks/read_outcomes?try_number=3"
        assert (push["message"], push["more_lines"]) == (AUTH, 2)  # the first line, whole
        page = Page(client.get("/failures").text)
        text = words(page)
        assert AUTH in text and "(+2 more lines in the log)" in text and "Traceback" not in text
        assert "[usrt P-1…P-3]" in text
        logs = [href for link_text, href, _ in page.links if link_text == "log"]
        assert logs == [read["log_url"], approve["log_url"], push["log_url"]]
        assert not any(href.startswith("javascript:") for _, href, _ in page.links)
        of_run = client.get("/api/failures", params={"dag_id": NIGHT, "run_id": NEXT_NIGHT}).json()["items"]
        assert [f["task_id"] for f in of_run] == ["read_outcomes", "approve_won"]
        assert "every task failure" in client.get("/failures", params={"dag_id": NIGHT}).text
        summary = Page(client.get("/").text)
        assert AUTH in words(summary) and summary.href("Every task failure") == "/failures"


@pytest.fixture
def waiting(store):
    """Prospects waiting for the sync's push (usrt P-1…P-5, usmf P-1), usmf P-9 a bad record, usrt
    L-1 waiting for its lead's outcome."""
    store.record_pulled(pulled(*(prospect("usrt", f"P-{n}") for n in range(1, 6)), prospect("usmf", "P-1"),
                               prospect("usmf", "P-9", error="prospect usmf/P-9: CompanyName: empty"),
                               prospect("usrt", "L-1")), SUCCEEDED)  # fmt: skip
    store.update("usrt", "L-1", SUCCEEDED, lead_id="lead-l-1", lead_state="open")
    return store


def held_up(client) -> dict[str, str]:
    items = client.get("/api/prospects").json()["items"]
    return {f"{p['legal_entity']}/{p['prospect_id']}": p["held_up"]["task_id"] for p in items if p["held_up"]}


def test_a_prospect_in_the_chunk_of_a_failed_next_step_is_held_up(waiting):
    record_failure(waiting, SYNC, FAILED, "push_leads", AUTH, 1, ("usrt", "P-2", "P-4"))
    runs = sync_runs(dag_run(RUNNING, "running", "2026-11-21T02:30:00+00:00", None),  # not finished: not the latest
                     dag_run(FAILED, "failed", "2026-11-21T02:15:00+00:00"))  # fmt: skip
    with client_for(waiting, dag_runs=runs) as client:
        assert held_up(client) == {"usrt/P-2": "push_leads", "usrt/P-3": "push_leads", "usrt/P-4": "push_leads"}
        listing = client.get("/prospects").text
        assert " ".join(Page(listing).text).count("held up") == 3
        # in the list, each row's line is cut (every row of the chunk repeats it), whole on hover
        assert AUTH not in " ".join(Page(listing).text) and AUTH[:150] in " ".join(Page(listing).text)
        assert listing.count('title="AuthenticationError: Entra ID refused') == 3
        page = client.get("/prospect", params={"legal_entity": "usrt", "prospect_id": "P-3"})
        html = Page(page.text)
        assert "held up" in html.text and AUTH in words(html)
        assert f"/dags/{SYNC}/runs/{path(FAILED)}/tasks/push_leads/mapped/1?try_number=3" in [h for _, h, _ in html.links]
        assert client.get("/api/prospects/usrt/P-3").json()["held_up"]["message"] == AUTH
        outside = client.get("/prospect", params={"legal_entity": "usrt", "prospect_id": "P-5"}).text
        assert "held up" not in outside and client.get("/api/prospects/usrt/P-5").json()["held_up"] is None


def test_a_failed_task_before_the_next_step_or_unmapped_holds_up_every_prospect_of_that_step(waiting):
    # pull_prospects failed for usmf: its bad record waits for a pull, and plan_push did not run at all.
    record_failure(waiting, SYNC, FAILED, "pull_prospects", AUTH, 1, ("usmf", None, None))
    record_failure(waiting, NIGHT, NEXT_NIGHT, "read_outcomes", "AuthenticationError: refused.")
    record_failure(waiting, NIGHT, NEXT_NIGHT, "check_sla", "FailedCheck: SLA check failed: 1 open anomalies.")
    runs = runs_of(**{SYNC: [dag_run(FAILED, "failed", "2026-11-21T02:15:00+00:00")],
                      NIGHT: [dag_run(NEXT_NIGHT, "failed", "2026-11-21T02:00:00+00:00")]})  # fmt: skip
    with client_for(waiting, dag_runs=runs) as client:
        held = held_up(client)
        assert held == {**{f"usrt/P-{n}": "pull_prospects" for n in range(1, 6)}, "usmf/P-1": "pull_prospects",
                        "usmf/P-9": "pull_prospects", "usrt/L-1": "read_outcomes"}  # fmt: skip


def test_nothing_is_held_up_once_a_later_run_succeeded_or_the_failed_task_was_rerun(waiting):
    record_failure(waiting, SYNC, FAILED, "push_leads", AUTH, 0, ("usrt", "P-1", "P-5"))
    fixed = sync_runs(dag_run(SUCCEEDED, "success", "2026-11-21T02:45:00+00:00"),
                      dag_run(FAILED, "failed", "2026-11-21T02:15:00+00:00"))  # fmt: skip
    with client_for(waiting, dag_runs=fixed) as client:
        assert held_up(client) == {}
    dry_run_failed = sync_runs(dag_run(DRY, "failed", "2026-11-21T02:45:00+00:00", dry_run=True),
                               dag_run(FAILED, "failed", "2026-11-21T02:15:00+00:00"))  # fmt: skip
    with client_for(waiting, dag_runs=dry_run_failed) as client:
        assert set(held_up(client).values()) == {"push_leads"}  # a dry run moves no prospect
        record_result(waiting, SYNC, FAILED, "push_leads", 0, "push", "usrt", created=5)  # cleared and rerun
        assert held_up(client) == {}


def test_the_summary_says_plainly_that_the_last_run_failed(history):
    page = Page(history.get("/").text)
    text = words(page)
    assert f"The last b2b_prospect_sync run ({FAILED}) failed: push_leads [usrt P-1…P-3]: {AUTH}" in text
    assert "The last b2b_outcome_reconciliation run" in text
    links = [href for _, href, _ in page.links]
    assert f"/dags/{SYNC}/runs/{path(FAILED)}/tasks/push_leads/mapped/0?try_number=3" in links
    latest = {entry["dag_id"]: entry["run"] for entry in history.get("/api/summary").json()["latest_runs"]}
    assert (latest[SYNC]["run_id"], latest[SYNC]["state"]) == (FAILED, "failed")  # the running run is not finished


def test_the_summary_says_nothing_of_a_last_run_that_succeeded(store):
    record_failure(store, SYNC, FAILED, "push_leads", AUTH, 0, ("usrt", "P-1", "P-3"))
    runs = sync_runs(dag_run(SUCCEEDED, "success", "2026-11-21T02:45:00+00:00"),
                     dag_run(FAILED, "failed", "2026-11-21T02:15:00+00:00"))  # fmt: skip
    with client_for(store, dag_runs=runs) as client:
        assert "The last b2b_prospect_sync run" not in client.get("/").text


def test_the_summary_names_every_failure_of_the_last_run_or_says_none_was_recorded(store):
    record_failure(store, NIGHT, NEXT_NIGHT, "read_outcomes", "AuthenticationError: refused.")
    record_failure(store, NIGHT, NEXT_NIGHT, "check_sla", "FailedCheck: SLA check failed: 1 open anomalies.")
    runs = runs_of(**{SYNC: [dag_run(FAILED, "failed", "2026-11-21T02:15:00+00:00")],
                      NIGHT: [dag_run(NEXT_NIGHT, "failed", "2026-11-21T02:00:00+00:00")]})  # fmt: skip
    with client_for(store, dag_runs=runs) as client:
        page = Page(client.get("/").text)
        text = words(page)
        assert "read_outcomes: AuthenticationError: refused." in text and "and 1 more failed task" in text
        assert page.href("every failure of this run") == f"/failures?dag_id={NIGHT}&run_id={path(NEXT_NIGHT)}"
        assert f"({FAILED}) failed; no task failure of it is recorded in the state store" in text


def test_the_summary_says_when_airflow_cannot_tell_how_the_last_run_went(filled):
    with client_for(filled, dag_runs=lambda dag_id, limit: None) as client:
        assert "could not be read from Airflow's metadata database" in client.get("/").text
        assert client.get("/api/runs").json()["dags"][0]["runs"] is None
        assert "could not be read" in client.get("/runs").text


def test_stage_rows_with_no_prospect_fold_away(client):
    page = client.get("/").text
    table = page.split("<h2>Prospects by stage</h2>")[1].split("</table>")[0]
    rows = re.findall(r'<td><a href="/prospects\?stage=(\w+)">', table)
    assert rows == ["invalid", "lead_open", "qualified", "approved", "rejected"]
    folded = re.search(r"<details[^>]*><summary>5 stages with no prospect</summary>(.*?)</details>", page, re.S)
    assert folded and "pulled, customers_created, disqualified, won, lost" in folded[1]
    empty = client.get("/api/summary").json()["empty_stages"]
    assert empty == ["pulled", "customers_created", "disqualified", "won", "lost"]


def test_missing_pools_are_named_with_the_command_that_imports_them(filled):
    with client_for(filled, pool_names=lambda: {"default_pool"}) as client:
        text = " ".join(" ".join(Page(client.get("/").text).text).split())
        assert ('Airflow has no pool d365_commerce or d365_sales: the tasks that run in them would wait "scheduled" '
                "forever") in text
        assert f"airflow pools import {health.POOLS_FILE}" in text and health.POOLS_FILE.is_file()
        assert client.get("/api/summary").json()["missing_pools"] == ["d365_commerce", "d365_sales"]
    with client_for(filled) as client:
        assert "airflow pools import" not in client.get("/").text


def test_a_bad_record_shows_the_value_it_came_with(store):
    received = {"dataAreaId": "usrt", "ProspectId": "P-7", "ProspectName": "Ada", "CompanyName": "  ",
                "PrimaryEmailAddress": "ada(at)contoso"}  # fmt: skip
    error = ("prospect usrt/P-7: CompanyName: String should have at least 1 character; PrimaryEmailAddress: value is "
             "not a valid email address: An email address must have an @-sign.")  # fmt: skip
    not_kept = "prospect usrt/P-8: PrimaryEmailAddress: value is not a valid email address"
    store.record_pulled(pulled({**prospect("usrt", "P-7", error=error), "prospect": received},
                               prospect("usrt", "P-8", error=not_kept)), "run-1")  # fmt: skip
    with client_for(store) as client:
        bad = client.get("/api/prospects/usrt/P-7").json()["prospect"]["bad_fields"]
        assert bad == [{"field": "CompanyName", "received": True, "value": "  "},
                       {"field": "PrimaryEmailAddress", "received": True, "value": "ada(at)contoso"}]  # fmt: skip
        page = client.get("/prospect", params={"legal_entity": "usrt", "prospect_id": "P-7"}).text
        assert '<th>PrimaryEmailAddress</th>\n      <td><code class="received">ada(at)contoso</code>' in page
        assert '<th>CompanyName</th>\n      <td><span class="note">(blank)</span>' in page
        page = client.get("/prospect", params={"legal_entity": "usrt", "prospect_id": "P-8"}).text
        assert "PrimaryEmailAddress" in page and "not kept in the state store" in page


def test_pages_on_a_store_older_than_them_say_what_it_lacks(store):
    store.record_pulled(pulled(prospect("usrt", "P-1")), "run-1")
    with store.engine.begin() as connection:
        connection.execute(sa.text("DROP TABLE b2b_step_results"))
    with client_for(store) as client:
        page = client.get("/runs")
        assert page.status_code == 503 and "lacks b2b_step_results" in page.text and "next task" in page.text


def test_the_airflow_readers_read_its_runs_newest_first_and_its_pools(airflow_db):
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session

    started = datetime(2026, 11, 21, 2, tzinfo=UTC)
    with create_session() as session:
        for hour, (state, conf) in enumerate([("success", {}), ("failed", {"dry_run": True}), ("running", None)]):
            at = started + timedelta(hours=hour)
            session.add(DagRun(dag_id="b2b_ui_probe", run_id=f"manual__{hour}", run_type="manual", state=state, conf=conf,
                               run_after=at, logical_date=at, start_date=at))  # fmt: skip
    try:
        runs = health.airflow_dag_runs("b2b_ui_probe", 2)
        assert [(run["run_id"], run["state"], run["dry_run"]) for run in runs] == [
            ("manual__2", "running", False), ("manual__1", "failed", True)]  # fmt: skip
        assert runs[0]["started_at"] == (started + timedelta(hours=2)).isoformat() and runs[0]["ended_at"] is None
        assert {"d365_commerce", "d365_sales"} <= health.airflow_pool_names()  # airflow_db imports pools.json
    finally:
        with create_session() as session:
            session.execute(sa.delete(DagRun).where(DagRun.dag_id == "b2b_ui_probe"))
