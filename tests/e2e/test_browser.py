"""The onboarding as a person sees it: a real Airflow (api-server, scheduler, dag-processor) runs both
DAGs against the fakes (triggered through the REST API, the sellers deciding in between), then
headless Chromium, driven by Playwright, logs in, looks at the runs, opens the B2B onboarding page
from Airflow's navigation, searches for a known prospect and opens its timeline.

The browser is Debian's `chromium` (`.ci/run` installs it), never one Playwright downloads. Without
it the test is skipped, unless `CI` is set: then it fails. Screenshots of every step go to
`.artifacts/screenshots/` (a failure adds `failure.png` and `failure.html`).
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from d365_fakes.scenario import play_sellers, prospects

pytestmark = pytest.mark.e2e
pytest_plugins = ["airflow_services"]

REPO = Path(__file__).resolve().parents[2]
SCREENSHOTS = REPO / ".artifacts" / "screenshots"
SYNC = "b2b_prospect_sync"
RECONCILIATION = "b2b_outcome_reconciliation"
TIMEOUT_MS = 30_000


def _missing(what: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{what} (CI is set, so the browser test must run; .ci/run installs chromium)")
    pytest.skip(f"{what}; CI is not set. Install it with: apt-get install -y chromium")


@pytest.fixture
def chromium() -> str:
    """Debian's chromium, and Playwright to drive it (asked for before Airflow starts, so that a
    skip costs nothing)."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        _missing("playwright is not installed (requirements.txt)")
    for candidate in (shutil.which("chromium"), "/usr/bin/chromium"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    _missing("Debian's chromium is not installed")
    raise AssertionError("unreachable")


@pytest.fixture
def page(chromium, airflow_services) -> Iterator:
    from playwright.sync_api import sync_playwright

    from airflow_services import write_artifact_gitignore

    write_artifact_gitignore()
    shutil.rmtree(SCREENSHOTS, ignore_errors=True)
    SCREENSHOTS.mkdir(parents=True)
    with sync_playwright() as playwright:
        # --no-sandbox: Playwright's default for Chromium (CI runs as root); no /dev/shm in small containers.
        browser = playwright.chromium.launch(executable_path=chromium, headless=True,
                                             args=["--disable-dev-shm-usage"])  # fmt: skip
        context = browser.new_context(viewport={"width": 1440, "height": 1000}, base_url=airflow_services.base_url)
        context.set_default_timeout(TIMEOUT_MS)
        try:
            yield context.new_page()
        finally:
            context.close()
            browser.close()


def shot(page, name: str) -> None:
    page.screenshot(path=SCREENSHOTS / f"{name}.png", full_page=True)


@contextmanager
def failure_kept(page) -> Iterator[None]:
    """On a failure, the page as it was: `failure.png` and `failure.html`."""
    try:
        yield
    except BaseException:
        shot(page, "failure")
        (SCREENSHOTS / "failure.html").write_text(page.content())
        raise


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

    with failure_kept(page):
        # Log in (Simple auth manager: Airflow's own login page).
        page.goto("/")
        expect(page.get_by_role("button", name="Sign in")).to_be_visible()
        shot(page, "01-login")
        page.locator("input[name=username]").fill(services.username)
        page.locator("input[name=password]").fill(services.password)
        page.get_by_role("button", name="Sign in").click()
        page.wait_for_url(re.compile(r"^(?!.*/auth/login).*$"))
        browse = page.get_by_role("button", name="Browse")
        expect(browse).to_be_visible()

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
