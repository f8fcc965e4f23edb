"""Retries against the fakes' fault injection, over real MSAL, TLS and HTTP: what is repeated, what
is not, the per-task budget, tokens revoked mid-run, and writes whose answer was lost (a timeout or
a reset after the service acted) repeated without doing anything twice."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from b2b_onboarding.clients.auth import token_provider
from b2b_onboarding.clients.commerce import CommerceClient
from b2b_onboarding.clients.odata import RETRY_RATIO, TOKEN_RETRY_MIN_WAIT_S, ODataClient, RetryBudget, _Gate
from b2b_onboarding.clients.sales import SalesClient
from b2b_onboarding.errors import ConfigurationError, D365Error
from b2b_onboarding.flow import reconcile, sync
from d365_fakes.actors import Clerk, Seller
from d365_fakes.dataverse import company_id
from d365_fakes.running import FakeAdmin
from d365_fakes.scenario import CUSTOMER_GROUP
from d365_fakes.tls import ensure_tls

RUN = "manual__retries"


def connect(world, client_class, resource: str, **extra):
    return client_class.connect(world.settings(resource, **extra))


@pytest.fixture
def sales(world, admin: FakeAdmin) -> Iterator[SalesClient]:
    client = connect(world, SalesClient, world.endpoints.dataverse)
    client.whoami()  # a token in MSAL's cache: the faults below meet the Web API calls
    yield client
    client.odata.close()


def requests_to(admin: FakeAdmin, system: str) -> int:
    return admin.counts()[system]["requests"]


def seed(admin: FakeAdmin, count: int) -> None:
    admin.seed_prospects([
        {"dataAreaId": "usrt", "ProspectId": f"P-{n:06d}", "ProspectName": f"Ada Lovelace{n}",
         "CompanyName": f"Engines {n}", "PrimaryEmailAddress": f"p{n}@engines.example"}
        for n in range(1, count + 1)
    ])  # fmt: skip


# --- the budget ----------------------------------------------------------------------------------


def test_the_budget_allows_its_base_plus_a_share_of_the_requests():
    budget = RetryBudget(retries=2)
    for _ in range(10):
        budget.sent()
    allowed = 0
    while budget.spend_retry():
        allowed += 1
    assert allowed == 2 + int(RETRY_RATIO * 10)


def test_the_budget_bounds_the_time_spent_waiting_out_throttling():
    budget = RetryBudget(throttled_wait_s=10)
    assert budget.spend_throttled_wait(6) and not budget.spend_throttled_wait(6) and budget.spend_throttled_wait(4)


def test_threads_throttled_together_spend_their_wait_once():
    # Found at 100,000 prospects on LocalExecutor: four threads throttled at once each spent the whole
    # Retry-After, so a task gave up after a quarter of its 15 minutes of throttling.
    budget, gate = RetryBudget(throttled_wait_s=100), _Gate()
    arrived = threading.Barrier(4)

    def throttled(_: int) -> bool:
        arrived.wait()
        return gate.pause(30, budget)

    with ThreadPoolExecutor(max_workers=4) as pool:
        assert all(pool.map(throttled, range(4)))
    assert 30 <= budget.throttled_wait_s < 31 and budget.retries == 4
    assert gate.pause(45, budget) and 45 <= budget.throttled_wait_s < 46  # a longer wait adds only its excess
    assert not gate.pause(200, budget) and budget.throttled_wait_s < 46  # past the budget: refused, not paused


# --- what is retried -----------------------------------------------------------------------------


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_server_and_gateway_failures_of_a_read_are_retried(sales, admin, status):
    admin.add_fault(system="dataverse", status=status, count=2, route="WhoAmI")
    before = requests_to(admin, "dataverse")

    assert sales.whoami()["UserId"]
    assert requests_to(admin, "dataverse") - before == 3 and sales.odata.retried == 2


def test_a_post_not_known_to_be_repeatable_is_not_repeated_when_the_service_may_have_acted(world, admin):
    commerce = connect(world, CommerceClient, world.endpoints.commerce)
    customer = {"dataAreaId": "usrt", "CustomerAccount": "C-1", "PartyType": "Organization", "OrganizationName": "X",
                "CustomerGroupId": CUSTOMER_GROUP}
    admin.add_fault(system="commerce", status=502, count=1, method="POST")
    before = requests_to(admin, "commerce")

    with pytest.raises(D365Error) as failed:
        commerce.odata.request("POST", "CustomersV3", operation="create customer", json=customer)
    assert failed.value.status == 502 and requests_to(admin, "commerce") - before == 1

    admin.add_fault(system="commerce", status=503, count=1, method="POST")  # 503: refused before acting
    assert commerce.odata.request("POST", "CustomersV3", operation="create customer", json=customer).status_code == 201
    assert commerce.odata.retried == 1


def test_a_storm_of_failures_spends_the_task_budget_and_fails_before_the_attempt_limit(world, admin):
    sales = connect(world, SalesClient, world.endpoints.dataverse, retry_budget=2, max_attempts=10)
    sales.whoami()
    admin.add_fault(system="dataverse", status=500, share=1.0)
    before = requests_to(admin, "dataverse")

    with pytest.raises(D365Error) as failed:
        sales.whoami()

    # Retries stop once they exceed 2 + a fifth of the requests: the fourth attempt is the last.
    assert requests_to(admin, "dataverse") - before == 4
    message = str(failed.value)
    assert message.startswith("Dataverse (Sales) via Airflow connection 'd365_test': WhoAmI failed after 4 attempts with HTTP 500")
    assert "retries are spent" in message and "rerun the task later" in message


# --- tokens ---------------------------------------------------------------------------------------


def test_a_token_revoked_mid_run_is_replaced_once(sales, admin):
    issued = admin.counts()["entra"]["tokens_issued"]
    admin.revoke_tokens()

    assert sales.whoami()["UserId"]
    assert admin.counts()["entra"]["tokens_issued"] == issued + 1 and sales.odata.retried == 1


def test_a_token_refused_again_after_the_refresh_fails_clearly(sales, admin):
    issued = admin.counts()["entra"]["tokens_issued"]
    admin.add_fault(system="dataverse", status=401, count=2)

    with pytest.raises(D365Error) as failed:
        sales.whoami()

    assert failed.value.status == 401 and failed.value.attempts == 2
    assert "check the connection's client id, secret and authority" in str(failed.value)
    assert admin.counts()["entra"]["tokens_issued"] == issued + 1


def test_an_entra_outage_is_waited_out(sales, admin):
    sales.odata._tokens.forget()  # the next call must ask Entra ID, which is down once
    admin.add_fault(system="entra", status=503, count=1)
    started = time.monotonic()

    assert sales.whoami()["UserId"]
    assert time.monotonic() - started >= TOKEN_RETRY_MIN_WAIT_S  # MSAL's own 5-s throttle of a 5xx
    assert admin.faults()["served"]["entra"] == {"503": 1}


# --- writes whose answer was lost ------------------------------------------------------------------


def test_a_reset_after_the_upsert_landed_is_repeated_without_a_second_lead(world, admin, store):
    seed(admin, 6)
    commerce = connect(world, CommerceClient, world.endpoints.commerce)
    sync.pull_prospects(commerce, store, "usrt", RUN)
    sales = connect(world, SalesClient, world.endpoints.dataverse)
    admin.add_fault(system="dataverse", kind="reset", phase="after", route="UpsertMultiple", count=1)

    result = sync.push_leads(sales, store, "usrt", RUN)

    assert result["created"] == 6 and sales.odata.retried == 1
    assert admin.faults()["served"]["dataverse"] == {"reset": 1}
    seller = Seller(world.endpoints, world.cast.seller["client_id"], world.cast.seller["client_secret"])
    leads = seller.view("All Commerce B2B leads")
    assert sorted((lead["msdyn_prospectid"], lead["_msdyn_company_value"]) for lead in leads) == [
        (f"P-{n:06d}", company_id("usrt")) for n in range(1, 7)
    ]
    assert set(store.frame()["lead_id"]) == {lead["leadid"] for lead in leads}


def two_won(world, admin, store) -> tuple[CommerceClient, SalesClient]:
    """Two prospects synced, their leads won and read back: ready for customers."""
    seed(admin, 2)
    commerce = connect(world, CommerceClient, world.endpoints.commerce)
    sales = connect(world, SalesClient, world.endpoints.dataverse)
    sync.pull_prospects(commerce, store, "usrt", RUN)
    sync.push_leads(sales, store, "usrt", RUN)
    admin.decide([{"msdyn_prospectid": f"P-{n:06d}", "company": "usrt", "outcome": "won"} for n in (1, 2)])
    reconcile.read_outcomes(sales, store, RUN)
    return commerce, sales


def test_an_approval_answered_too_late_is_repeated_without_a_second_email(world, admin, store):
    commerce, sales = two_won(world, admin, store)
    reconcile.write_customers(commerce, sales, store, "usrt", RUN, CUSTOMER_GROUP)
    impatient = connect(world, CommerceClient, world.endpoints.commerce, timeout_s=0.5)
    admin.add_fault(system="commerce", kind="slow", delay_s=1.5, phase="after", route=r"\$batch", count=1)

    result = reconcile.approve_won(impatient, store, "usrt", RUN)

    assert admin.faults()["served"]["commerce"] == {"slow": 1} and impatient.odata.retried == 1
    assert "written" not in result and result["approved one by one"] == 2  # the repeat found the work done
    clerk = Clerk(world.endpoints, world.cast.clerk["client_id"], world.cast.clerk["client_secret"])
    assert {row["B2BProspectStatus"] for row in clerk.all("Prospects")} == {"Approved"}
    assert sorted(mail["ProspectId"] for mail in admin.outbox()) == ["P-000001", "P-000002"]
    assert len(clerk.all("CustomerHiearchies")) == 2 and len(clerk.all("CustomerHierarchyNodes")) == 2
    assert set(store.frame()["decision"]) == {"approved"}


def test_customers_numbered_by_hq_answered_too_late_are_not_sent_again_and_the_rerun_adopts_them(world, admin, store):
    commerce, sales = two_won(world, admin, store)
    impatient = connect(world, CommerceClient, world.endpoints.commerce, timeout_s=0.5)
    admin.add_fault(system="commerce", kind="slow", delay_s=1.5, phase="after", route=r"\$batch", count=1)

    # HQ numbers the customers: a repeat of the changeset would make two more, so it is not repeated.
    with pytest.raises(D365Error):
        reconcile.write_customers(impatient, sales, store, "usrt", RUN, CUSTOMER_GROUP)
    assert admin.faults()["served"]["commerce"] == {"slow": 1} and impatient.odata.retried == 0
    clerk = Clerk(world.endpoints, world.cast.clerk["client_id"], world.cast.clerk["client_secret"])
    made = {(row["PartyType"], row["PrimaryContactEmail"]): row["CustomerAccount"] for row in clerk.all("CustomersV3")}
    assert len(made) == 4

    result = reconcile.write_customers(commerce, sales, store, "usrt", "manual__rerun", CUSTOMER_GROUP)

    assert result["already done"] == 2 and result["existing customers reused"] == 4 and "written" not in result
    assert len(clerk.all("CustomersV3")) == 4
    tracked = store.frame().set_index("prospect_id")
    assert {pid: (tracked.at[pid, "org_customer_account"], tracked.at[pid, "person_customer_account"])
            for pid in ("P-000001", "P-000002")} == {
        f"P-{n:06d}": (made[("Organization", f"p{n}@engines.example")], made[("Person", f"p{n}@engines.example")])
        for n in (1, 2)
    }  # fmt: skip


def test_a_service_certificate_the_bundle_does_not_trust_fails_at_once_naming_the_bundle(world, admin, tmp_path):
    other_ca = str(ensure_tls(tmp_path / "another-ca").ca_bundle)
    settings = world.settings(world.endpoints.dataverse)  # Entra ID trusted; the Web API under another CA
    tokens = token_provider(settings.authority, settings.client_id, settings.client_secret.get_secret_value(),
                            settings.verify)  # fmt: skip
    client = ODataClient(system="Dataverse (Sales)", service_root=f"{settings.resource}/api/data/v9.2",
                         scope=settings.scope, tokens=tokens, verify=other_ca)  # fmt: skip

    with pytest.raises(ConfigurationError) as failed:
        client.get("WhoAmI", operation="WhoAmI")

    assert f"is not trusted by the CA bundle {other_ca}" in str(failed.value)
    assert "TLS verification stays on" in str(failed.value) and client.retried == 0
