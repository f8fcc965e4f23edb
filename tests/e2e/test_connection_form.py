"""The product's connection types as a person meets them in Admin → Connections of a real Airflow
(api-server, scheduler, dag-processor; b2b_drivers.airflow_processes enables the Test button): the
`d365_sales` connection's form with its fields relabelled and its options as fields; the add form of a
Commerce headquarters connection with every option, saved and tested from the command line; the Test
button succeeding against the fakes, then, with a wrong secret, failing with a message that says what
to fix. And the same test queued to a worker through the REST API, which the LocalExecutor runs.

Airflow 3.3.2's UI tests a connection in the api-server (`POST /api/v2/connections/test`), under a
random conn_id, from the list's Test button only. Debian's chromium as in test_browser.py; the
screenshots go to `.artifacts/screenshots/connections/` (a failure adds `failure.png` and `failure.html`).
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Iterator

import pytest
from browser import SCREENSHOTS as BROWSER_SCREENSHOTS
from browser import browser_page, failure_kept, log_in

pytestmark = pytest.mark.e2e
pytest_plugins = ["airflow_services"]

SCREENSHOTS = BROWSER_SCREENSHOTS / "connections"
SERVICE_LABELS = ("Environment URL", "Client ID", "Client secret")
COMMERCE_OPTIONS = ("Tenant ID", "Authority", "CA bundle", "Timeout (s)", "Legal entities", "Customer group",
                    "Customer account template", "Bulk writes", "Batch size", "Max concurrency", "Max attempts",
                    "Retry budget")  # fmt: skip


@pytest.fixture
def page(chromium, airflow_services) -> Iterator:
    # Tall enough for the add form's every field in one screenshot.
    with browser_page(chromium, airflow_services.base_url, SCREENSHOTS, height=2000) as page:
        yield page


def shot(target, name: str) -> None:
    """The page, or one element of it (a dialog), once the toasts and dialogs have come to rest."""
    page = getattr(target, "page", target)
    page.wait_for_function("() => document.getAnimations().every(animation => animation.playState !== 'running' "
                           "|| animation.effect.getTiming().iterations === Infinity)")  # a spinner never rests
    target.screenshot(path=SCREENSHOTS / f"{name}.png")


def connection_row(page, conn_id: str):
    page.goto("/connections")
    row = page.get_by_role("row").filter(has_text=conn_id)
    from playwright.sync_api import expect

    expect(row).to_have_count(1)
    return row


def after_pressing_test(page, conn_id: str, outcome: str):
    """Presses the row's Test button; the toast that answers, which must say `outcome` (its title)."""
    from playwright.sync_api import expect

    connection_row(page, conn_id).get_by_role("button", name="Test Connection").click()
    toast = page.get_by_role("status").filter(has_text=re.compile("^Test Connection (Successful|Failed)"))
    expect(toast).to_be_visible(timeout=60_000)
    expect(toast).to_contain_text(outcome)  # else it shows what the test said
    return toast


def test_the_forms_show_the_product_fields_and_the_test_button_says_what_to_fix(chromium, airflow_services, page):
    from playwright.sync_api import expect

    services = airflow_services
    secret = services.cast.integration["client_secret"]
    with failure_kept(page, SCREENSHOTS):
        log_in(page, services)

        # The Sales connection's form: the standard fields relabelled, schema and port hidden, its options as fields.
        connection_row(page, "d365_sales").get_by_role("button", name="Edit Connection").click()
        form = page.get_by_role("dialog")
        expect(form.get_by_text("Dynamics 365 Sales (Dataverse)")).to_be_visible()
        for label in SERVICE_LABELS:
            expect(form.get_by_text(label, exact=True)).to_be_visible()
        expect(form.locator("input[name=host]")).to_have_value(services.endpoints.dataverse)
        expect(form.locator("input[name=schema]")).to_have_count(0)
        expect(form.locator("input[name=port]")).to_have_count(0)
        form.get_by_text("Extra Fields", exact=True).click()
        for label in ("Authority", "CA bundle", "Page size"):
            expect(form.get_by_text(label, exact=True)).to_be_visible()
        expect(form.locator("input[name=element_page_size]")).to_have_value("5000")
        expect(form.get_by_text("default and maximum 5000")).to_be_visible()
        shot(form, "01-sales-connection-form")
        form.get_by_role("button", name="Close").click()

        # The add form of a Commerce headquarters connection: every option, with what it means.
        page.get_by_role("button", name="Add Connection").click()
        form = page.get_by_role("dialog")
        form.locator("input[name=connection_id]").fill("hq_from_the_form")
        form.get_by_role("combobox").click()
        page.keyboard.type("Dynamics 365 Commerce headquarters")
        page.keyboard.press("Enter")
        for label in SERVICE_LABELS:
            expect(form.get_by_text(label, exact=True)).to_be_visible()
        host = form.locator("input[name=host]")
        expect(host).to_have_attribute("placeholder", "https://contoso.operations.dynamics.com")
        host.fill(services.endpoints.commerce)
        form.locator("input[name=login]").fill(services.cast.integration["client_id"])
        form.locator("input[name=password]").fill(secret)
        form.get_by_text("Extra Fields", exact=True).click()
        for label in COMMERCE_OPTIONS:
            expect(form.get_by_text(label, exact=True)).to_be_visible()
        for name, value in (("authority", services.endpoints.authority), ("ca_bundle", services.endpoints.ca_bundle),
                            ("legal_entities", "usrt, usmf"), ("customer_group", "10")):  # fmt: skip
            form.locator(f"input[name=element_{name}]").fill(value)
        expect(form.locator("input[name=element_bulk]")).to_be_checked()  # the default, shown as it is
        shot(form, "02-commerce-add-form")
        form.get_by_role("button", name="Save").click()
        expect(form).to_have_count(0)

        # Saved as the form keeps it: each option under its own name in the extra, the unset ones null.
        saved = services.api("GET", "/connections/hq_from_the_form")
        assert saved["conn_type"] == "d365_commerce"
        extra = json.loads(saved["extra"])
        assert extra["legal_entities"] == "usrt, usmf" and extra["customer_group"] == "10" and extra["bulk"] is True
        assert extra["tenant_id"] is None and extra["batch_size"] is None
        # The command line tests it by its own conn_id; the list's Test button too.
        assert "Connection success!" in services.cli("connections", "test", "hq_from_the_form").stdout
        expect(after_pressing_test(page, "hq_from_the_form", "Test Connection Successful")).to_contain_text(
            "Prospects of legal entity usrt are readable")

        # The Test button of d365_sales: a token and WhoAmI against the fakes.
        toast = after_pressing_test(page, "d365_sales", "Test Connection Successful")
        expect(toast).to_contain_text("Dynamics 365 Sales (Dataverse) at " + services.endpoints.dataverse)
        expect(toast).to_contain_text("WhoAmI: application user")
        shot(page, "03-test-succeeded")

    wrong = "pasted-wrong-" + uuid.uuid4().hex
    try:
        with failure_kept(page, SCREENSHOTS):
            # A wrong secret pasted into the form, saved: the Test button says what to fix, never the secret.
            connection_row(page, "d365_sales").get_by_role("button", name="Edit Connection").click()
            form = page.get_by_role("dialog")
            form.locator("input[name=password]").fill(wrong)
            form.get_by_role("button", name="Save").click()
            expect(form).to_have_count(0)
            toast = after_pressing_test(page, "d365_sales", "Test Connection Failed")
            expect(toast).to_contain_text("Dataverse (Sales): Entra ID")
            expect(toast).to_contain_text(re.compile(r"HTTP 401 invalid_client\. Next step: check the connection's "
                                                     r"client id \(login\), secret \(password\)"))  # fmt: skip
            expect(toast).to_contain_text("Invalid client secret provided")
            assert wrong not in toast.inner_text() and secret not in toast.inner_text()
            shot(page, "04-test-failed-wrong-secret")
    finally:
        services.set_password("d365_sales", secret)
        services.api("DELETE", "/connections/hq_from_the_form")


def test_a_test_queued_through_the_rest_api_runs_on_the_executor(airflow_services):
    """`POST /api/v2/connections/enqueue-test`: the scheduler hands the test to the LocalExecutor, whose
    worker runs the hook's test_connection; the answer is polled with the token it gave."""
    services = airflow_services
    body = {"connection_id": "d365_sales", "conn_type": "d365_sales", "host": services.endpoints.dataverse,
            "login": services.cast.integration["client_id"], "password": services.cast.integration["client_secret"],
            "extra": json.dumps({"authority": services.endpoints.authority, "ca_bundle": services.endpoints.ca_bundle})}  # fmt: skip
    token = services.api("POST", "/connections/enqueue-test", json=body)["token"]
    deadline = time.monotonic() + 120
    while (answer := services.api("GET", "/connections/enqueue-test", headers={"Airflow-Connection-Test-Token": token})
           )["state"] not in ("success", "failed"):  # fmt: skip
        assert time.monotonic() < deadline, f"the queued test is still {answer['state']}"
        services.check_alive()
        time.sleep(1)
    assert answer["state"] == "success", answer["result_message"]
    assert "WhoAmI: application user" in answer["result_message"]
