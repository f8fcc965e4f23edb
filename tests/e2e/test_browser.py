"""The onboarding as a person sees it: a real Airflow (api-server, scheduler, dag-processor) runs both
DAGs against the fakes (triggered through the REST API, the sellers deciding in between), then
headless Chromium, driven by Playwright, logs in, looks at the runs, opens the B2B onboarding page
from Airflow's navigation, searches for a known prospect and opens its timeline. Then on-call's
night: a wrong secret in the connection `d365_sales` turns the sync's run red, the failed task's log
and the plugin say why in one line, and after the fix a cleared task turns the run green.

The browser is Debian's `chromium` (`.ci/run` installs it), never one Playwright downloads. Without
it the test is skipped, unless `CI` is set: then it fails. Screenshots of every step go to
`.artifacts/screenshots/` (a failure adds `failure.png` and `failure.html`).
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator

import pytest
from browser import SCREENSHOTS as BROWSER_SCREENSHOTS
from browser import browser_page, failure_kept, log_in

from d365_fakes.scenario import play_sellers, prospects

pytestmark = pytest.mark.e2e
pytest_plugins = ["airflow_services"]

SCREENSHOTS = BROWSER_SCREENSHOTS
SYNC = "b2b_prospect_sync"
RECONCILIATION = "b2b_outcome_reconciliation"


@pytest.fixture
def page(chromium, airflow_services) -> Iterator:
    with browser_page(chromium, airflow_services.base_url, SCREENSHOTS) as page:
        yield page


def shot(page, name: str) -> None:
    page.screenshot(path=SCREENSHOTS / f"{name}.png", full_page=True)


def test_a_person_logs_in_sees_the_runs_and_follows_a_prospect_to_its_timeline(chromium, airflow_services, page):
    from playwright.sync_api import expect

    services = airflow_services
    # The story: 20 prospects, the sync, the sellers' decisions in Sales, the reconciliation.
    services.fresh_world()
    seeded, plan = prospects(20)
    with services.admin() as admin:
        admin.seed_prospects(seeded)
    sync_run = services.run_dag(SYNC)
    seller = services.seller()
    play_sellers(seller, plan)
    seller.close()
    reconciliation_run = services.run_dag(RECONCILIATION)
    known = seeded[0]  # usrt P-000001, "Lovelace Trading 0": won, so approved
    assert plan[known["PrimaryEmailAddress"]] == "won"

    with failure_kept(page, SCREENSHOTS):
        log_in(page, services, screenshot=SCREENSHOTS / "01-login.png")
        browse = page.get_by_role("button", name="Browse")

        # Home, with the plugin's entry in the Browse menu.
        browse.click()
        entry = page.get_by_role("menuitem", name="B2B onboarding")
        expect(entry).to_be_visible()
        shot(page, "02-home-browse-menu")
        page.keyboard.press("Escape")

        # The runs the test made, as Airflow shows them: each run's page, its tasks.
        for number, (dag_id, run) in enumerate(((SYNC, sync_run), (RECONCILIATION, reconciliation_run)), start=3):
            page.goto(f"/dags/{dag_id}/runs/{run['dag_run_id']}")
            expect(page.get_by_text(run["dag_run_id"]).first).to_be_visible()
            expect(page.get_by_text("Success").first).to_be_visible()
            shot(page, f"0{number}-run-{dag_id}")

        # The plugin's page, from the navigation.
        page.goto("/")
        page.get_by_role("button", name="Browse").click()
        page.get_by_role("menuitem", name="B2B onboarding").click()
        page.wait_for_url(re.compile(r"/plugin/b2b-onboarding"))
        frame = page.frame_locator("iframe")
        expect(frame.get_by_role("heading").first).to_be_visible()
        shot(page, "05-plugin")

        # Search for the known prospect by its company, then open its timeline.
        search = frame.get_by_role("searchbox", name="Search prospects")
        search.fill(known["CompanyName"])
        search.press("Enter")
        row = frame.get_by_role("row").filter(has_text=known["CompanyName"])
        expect(row).to_have_count(1)
        expect(row).to_contain_text(known["ProspectId"])
        expect(row).to_contain_text("approved")
        shot(page, "06-search")
        row.get_by_role("link", name=re.compile(re.escape(known["ProspectId"]))).first.click()
        expect(frame.get_by_role("heading", name="Timeline")).to_be_visible()
        expect(frame.get_by_text(sync_run["dag_run_id"]).first).to_be_visible()
        expect(frame.get_by_text(reconciliation_run["dag_run_id"]).last).to_be_visible()
        text = frame.locator("body").inner_text()
        timeline = text[text.index("Timeline"):]
        stages = ("pulled", "lead_open", "qualified", "won", "approved")
        assert all(stage in timeline for stage in stages), timeline
        assert sorted(stages, key=timeline.index) == list(stages), timeline  # in the order they happened
        frame.get_by_text(reconciliation_run["dag_run_id"]).last.scroll_into_view_if_needed()
        shot(page, "07-timeline")


def test_a_wrong_secret_turns_the_run_red_on_call_sees_why_in_one_line_and_the_fix_turns_it_green(
    chromium, airflow_services, page
):
    from playwright.sync_api import expect

    services = airflow_services
    services.fresh_world()
    seeded, _ = prospects(10)
    with services.admin() as admin:
        admin.seed_prospects(seeded)
    secret = services.cast.integration["client_secret"]
    # The DAG list shows a DAG's latest run: no scheduled run may come after this test's until it is checked.
    services.no_scheduled_run_within(SYNC, 300)
    services.set_password("d365_sales", "pasted-wrong-" + uuid.uuid4().hex)  # Entra ID refuses it
    try:
        run_id = services.trigger(SYNC)
        services.wait_for_run(SYNC, run_id, expected="failed")
        states = {(task_id, index): state for task_id, index, state in services.task_states(SYNC, run_id)}
        # Each pull failed at once (a refused secret is not retried): it reads the tenant's lead model
        # from Sales before it validates a prospect, so nothing was pushed; the report still ran; the
        # run's last task names the failure and turns the run red.
        assert {state for (task_id, _), state in states.items() if task_id == "pull_prospects"} == {"failed"}
        assert {state for (task_id, _), state in states.items() if task_id == "push_leads"} <= {"upstream_failed"}
        assert states[("report", -1)] == "success" and states[("all_tasks_succeeded", -1)] == "failed"
        instances = services.api("GET", f"/dags/{SYNC}/dagRuns/{run_id}/taskInstances/pull_prospects/0/tries")
        assert [attempt["try_number"] for attempt in instances["task_instances"]] == [1]

        with failure_kept(page, SCREENSHOTS):
            log_in(page, services)

            # Red in the DAG list, and in the run's page (its grid).
            page.goto("/dags")
            latest = page.locator(f'a[href="/dags/{SYNC}/runs/{run_id}"]')
            expect(latest).to_have_accessible_name(re.compile(r"\bfailed$"))  # its state icon, red
            shot(page, "10-dag-list-red")
            page.goto(f"/dags/{SYNC}/runs/{run_id}")
            expect(page.get_by_text("Failed").first).to_be_visible()
            shot(page, "11-run-red")

            # The failed task's log: its one line first, whole, naming the connection to fix.
            page.goto(f"/dags/{SYNC}/runs/{run_id}/tasks/pull_prospects/mapped/0")
            line = page.get_by_text("via Airflow connection 'd365_sales'").first
            expect(line).to_be_visible()
            log = page.locator("body").inner_text()
            first = log.index("via Airflow connection 'd365_sales'")
            assert "HTTP 401 invalid_client. Next step: check the connection's client id" in log[first:]
            assert "Traceback" not in log[:first] and "Task failed with exception" not in log[:first]
            line.scroll_into_view_if_needed()  # the log view opens at its end, the traceback
            shot(page, "12-failed-task-log")

            # The plugin: the summary says the last run failed; the run history lists it red, in
            # its table and its chart; the failures name the task with its one line and its log.
            page.goto("/plugin/b2b-onboarding")
            frame = page.frame_locator("iframe")
            banner = frame.get_by_text(re.compile(rf"last {SYNC} run .* failed", re.I)).first
            expect(banner).to_be_visible()
            shot(page, "13-plugin-summary-last-run-failed")
            frame.get_by_role("link", name="Runs", exact=True).click()
            expect(frame.get_by_role("heading", name="Runs")).to_be_visible()
            chart = frame.get_by_role("img", name=re.compile(rf"runs of {SYNC} took.*\bfailed"))
            expect(chart).to_be_visible()
            expect(chart.locator("rect.bar-failed").filter(has_text=run_id)).to_have_count(1)  # its bar, red
            history = frame.get_by_role("row").filter(has_text=run_id).first
            expect(history).to_contain_text("failed")
            what_failed = frame.locator("table.runs").first.get_by_role("row").nth(2)  # under the run's row
            expect(what_failed).to_contain_text("pull_prospects")
            shot(page, "14-plugin-run-history")
            frame.get_by_role("link", name="Task failures").click()
            failure = frame.get_by_role("row").filter(has_text="pull_prospects").filter(has_text=run_id).first
            expect(failure).to_contain_text("via Airflow connection 'd365_sales'")
            expect(failure).to_contain_text("HTTP 401 invalid_client")
            shot(page, "15-plugin-failures")
            log_link = failure.get_by_role("link", name="log")
            assert re.search(r"/tasks/pull_prospects/mapped/\d+\?try_number=1$", log_link.get_attribute("href"))
    finally:
        services.set_password("d365_sales", secret)

    with failure_kept(page, SCREENSHOTS):
        # Fixed: clear the failed tasks of the run, as on-call does, and the same run turns green.
        page.goto(f"/dags/{SYNC}/runs/{run_id}")
        page.get_by_role("button", name="Press shift+c to clear").first.click()  # the run's Clear button
        dialog = page.get_by_role("dialog")
        dialog.get_by_text("Clear only failed tasks").click()
        shot(page, "17-clear-failed-tasks")
        dialog.get_by_role("button", name=re.compile("^Confirm", re.I)).click()
        deadline = time.monotonic() + 60  # the clear request is on its way: the run is failed until it lands
        while services.api("GET", f"/dags/{SYNC}/dagRuns/{run_id}")["state"] == "failed":
            assert time.monotonic() < deadline, "the cleared run did not start again"
            time.sleep(0.5)
        services.wait_for_run(SYNC, run_id)
        page.reload()
        expect(page.get_by_text("Success").first).to_be_visible()
        shot(page, "18-run-green-after-the-fix")

        # The Trigger form: no param is marked required; a dry run triggered from it is recognisable
        # in the run list (`dry_run__…`, the api-server's middleware).
        page.goto(f"/dags/{SYNC}")
        page.get_by_role("button", name="Trigger Dag").first.click()
        form = page.get_by_role("dialog")
        expect(form.get_by_text("Dry run", exact=True).first).to_be_visible()
        expect(form.locator('[data-part="required-indicator"]')).to_have_count(0)
        expect(form.get_by_text("This field is required")).to_have_count(0)
        switch = form.locator('input[name="element_dry_run"]')
        form.locator('label[data-scope="switch"]:has(input[name="element_dry_run"])').click()  # its visible control
        expect(switch).to_be_checked()
        shot(page, "19-trigger-form-dry-run")
        form.get_by_role("button", name=re.compile("^Trigger")).last.click()
        expect(page.get_by_text(re.compile("dry_run__")).first).to_be_visible()  # the form's notice of the new run
        dry = next(run for run in reversed(services.runs(SYNC)) if (run["conf"] or {}).get("dry_run"))
        assert dry["dag_run_id"].startswith("dry_run__") and "writes nothing" in (dry["note"] or "")
        services.wait_for_run(SYNC, dry["dag_run_id"])
        page.goto(f"/dags/{SYNC}/runs")
        expect(page.get_by_role("link", name=dry["dag_run_id"]).first).to_be_visible()
        shot(page, "20-run-list-dry-run")
