"""The product's clients (auth, Commerce, Sales, OData retries) against the fakes over real HTTPS.

Nothing here patches MSAL or httpx: tokens come from the fake Entra ID, data from the fake
Commerce HQ and Dataverse, through the same code paths as in production.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from b2b_onboarding.clients import sales
from b2b_onboarding.clients.auth import TokenProvider, token_provider
from b2b_onboarding.clients.commerce import CommerceClient
from b2b_onboarding.clients.settings import DEFAULT_MAX_ATTEMPTS
from b2b_onboarding.errors import AuthenticationError, D365Error
from d365_fakes.dataverse import company_id
from d365_fakes.running import FakeAdmin
from d365_fakes.tls import ensure_tls

COMMERCE_PAGE_SIZE = 3
HOSTILE_PROSPECT_IDS = [
    "O'Brien", "' or 1 eq 1", "P-1' or ProspectId ne '", "%27", "50%", "a/b", "../Prospects", "a#b", "a?b=c",
    "line\nbreak", "Zoë 李 😀",
]  # fmt: skip


@pytest.fixture
def commerce(world, admin: FakeAdmin) -> Iterator[CommerceClient]:
    client = CommerceClient.connect(world.settings(world.endpoints.commerce, legal_entities=["usrt", "usmf"]))
    yield client
    client.odata.close()


def prospect(prospect_id: str, legal_entity: str = "usrt", **fields) -> dict:
    return {"dataAreaId": legal_entity, "ProspectId": prospect_id, "ProspectName": "Ada Lovelace",
            "CompanyName": "Analytical Engines", "PrimaryEmailAddress": "ada@engines.example", **fields}  # fmt: skip


def lead(company: str, **fields) -> dict:
    return {"firstname": "Ada", "lastname": "Lovelace", "companyname": company, "msdyn_b2bcommerceprospect": True,
            **fields}  # fmt: skip


def requests_to(admin: FakeAdmin, system: str) -> int:
    return admin.counts()[system]["requests"]


# --- TokenProvider -------------------------------------------------------------------------------


def integration_provider(world, secret: str | None = None, verify: str | bool | None = None) -> TokenProvider:
    app = world.cast.integration
    return TokenProvider(world.endpoints.authority, app["client_id"], secret or app["client_secret"],
                         world.endpoints.ca_bundle if verify is None else verify)  # fmt: skip


def test_first_token_comes_from_entra_and_the_second_from_the_cache(world, admin):
    provider = integration_provider(world)
    scope = f"{world.endpoints.commerce}/.default"

    first = provider.token(scope)
    assert provider.last_token_source == "identity_provider"
    second = provider.token(scope)
    assert provider.last_token_source == "cache"

    assert first == second
    assert admin.counts()["entra"]["tokens_issued"] == 1


def test_token_provider_is_shared_per_authority_and_client_until_the_secret_changes(world, admin):
    app, endpoints = world.cast.integration, world.endpoints
    shared = token_provider(endpoints.authority, app["client_id"], app["client_secret"], endpoints.ca_bundle)

    assert token_provider(endpoints.authority, app["client_id"], app["client_secret"], endpoints.ca_bundle) is shared
    rotated = token_provider(endpoints.authority, app["client_id"], "rotated-secret", endpoints.ca_bundle)
    assert rotated is not shared
    assert token_provider(endpoints.authority, app["client_id"], "rotated-secret", endpoints.ca_bundle) is rotated


def test_a_wrong_secret_is_refused_naming_the_client_and_the_aadsts_error_but_not_the_secret(world, admin):
    wrong_secret = "wrong-" + uuid.uuid4().hex
    provider = integration_provider(world, secret=wrong_secret)

    with pytest.raises(AuthenticationError) as refused:
        provider.token(f"{world.endpoints.dataverse}/.default")

    message = str(refused.value)
    assert world.cast.integration["client_id"] in message
    assert "invalid_client" in message and "AADSTS7000215" in message
    assert wrong_secret not in message


@pytest.mark.parametrize("trust", ["system store", "unrelated CA"])
def test_a_ca_bundle_that_does_not_trust_the_server_fails_even_with_requests_ca_bundle_set(
    world, admin, tmp_path, monkeypatch, trust
):
    # requests lets REQUESTS_CA_BUNDLE override `verify=` (psf/requests#3829). Pointing it at the
    # fakes' own CA would make a requests-based MSAL trust the server: the provider must not.
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", world.endpoints.ca_bundle)
    verify = True if trust == "system store" else str(ensure_tls(tmp_path / "other").ca_bundle)

    with pytest.raises(AuthenticationError, match="CA bundle") as refused:
        integration_provider(world, verify=verify)

    assert world.endpoints.authority in str(refused.value)


# --- CommerceClient ------------------------------------------------------------------------------


def test_pending_prospects_are_read_across_pages_for_one_legal_entity_only(commerce, admin):
    pending = [prospect(f"P-{n:06d}") for n in range(1, 8)]
    admin.seed_prospects(pending + [
        prospect("P-000101", B2BProspectStatus="Approved"),
        prospect("P-000102", B2BProspectStatus="Rejected"),
        prospect("P-000103", IsB2BProspect="No"),
        prospect("P-000001", legal_entity="usmf"),  # same id, other company
    ])  # fmt: skip
    before = requests_to(admin, "commerce")

    pages = list(commerce.iter_prospect_pages("usrt"))

    assert [len(page) for page in pages] == [3, 3, 1]
    assert requests_to(admin, "commerce") - before == 3  # the first page and two nextLinks
    assert [(row["dataAreaId"], row["ProspectId"]) for page in pages for row in page] == [
        ("usrt", row["ProspectId"]) for row in pending
    ]
    assert {row["B2BProspectStatus"] for page in pages for row in page} == {"Pending"}


def test_a_missing_prospect_reads_as_none(commerce, admin):
    admin.seed_prospects([prospect("P-000001")])

    assert commerce.get_prospect("usrt", "P-000002") is None
    assert commerce.get_prospect("usmf", "P-000001") is None


def test_hostile_prospect_ids_are_read_back_exactly(commerce, admin):
    admin.seed_prospects([prospect("P-1")] + [prospect(prospect_id) for prospect_id in HOSTILE_PROSPECT_IDS])

    for prospect_id in HOSTILE_PROSPECT_IDS:
        row = commerce.get_prospect("usrt", prospect_id)
        assert row is not None, prospect_id
        assert row["ProspectId"] == prospect_id


def test_approving_with_a_stale_etag_fails_with_412(commerce, admin, clerk):
    admin.seed_prospects([prospect("P-000001")])
    stale = commerce.get_prospect("usrt", "P-000001")["@odata.etag"]
    clerk.call("PATCH", "Prospects(dataAreaId='usrt',ProspectId='P-000001')", params={"cross-company": "true"},
               json={"Note": "Called back"})  # someone edits the prospect in HQ after we read it

    with pytest.raises(D365Error) as failed:
        commerce.set_prospect_status("usrt", "P-000001", "Approved", stale)

    assert failed.value.status == 412
    assert commerce.get_prospect("usrt", "P-000001")["B2BProspectStatus"] == "Pending"
    assert admin.outbox() == []


def test_a_prospect_that_is_no_longer_pending_cannot_be_moved(commerce, admin):
    admin.seed_prospects([prospect("P-000009", B2BProspectStatus="Approved")])
    etag = commerce.get_prospect("usrt", "P-000009")["@odata.etag"]

    with pytest.raises(D365Error) as failed:
        commerce.set_prospect_status("usrt", "P-000009", "Rejected", etag)

    assert failed.value.status == 400
    assert "P-000009" in failed.value.message and "Approved" in failed.value.message
    assert "prospect usrt/P-000009" in str(failed.value)
    assert commerce.get_prospect("usrt", "P-000009")["B2BProspectStatus"] == "Approved"


# --- SalesClient ---------------------------------------------------------------------------------


def test_create_lead_creates_once_then_adopts_without_overwriting_the_sellers_change(sales_client, admin, seller):
    admin.seed_companies(["usrt"])
    lead_id, existing = sales_client.create_lead("usrt", "P-000001", lead("Analytical Engines"))
    assert existing is None
    seller.call("PATCH", f"leads({lead_id})", json={"companyname": "Analytical Engines Ltd"},
                headers={"If-Match": "*"})  # fmt: skip

    again_id, existing = sales_client.create_lead("usrt", "P-000001", lead("Babbage & Co", lastname="Byron"))

    assert again_id == lead_id and existing["leadid"] == lead_id
    assert (existing["companyname"], existing["lastname"]) == ("Analytical Engines Ltd", "Lovelace")
    row = seller.call("GET", f"leads({lead_id})", params={
        "$select": "msdyn_prospectid,_msdyn_company_value,companyname,lastname"}).json()  # fmt: skip
    assert (row["msdyn_prospectid"], row["_msdyn_company_value"]) == ("P-000001", company_id("usrt"))
    assert (row["companyname"], row["lastname"]) == ("Analytical Engines Ltd", "Lovelace")
    assert admin.counts()["dataverse"]["writes"]["leads"] == 2  # the create and the seller's change


def test_create_lead_adopts_the_lead_an_earlier_version_or_dual_write_wrote(sales_client, admin, seller):
    admin.seed_companies(["usrt", "usmf"])
    # Earlier versions keyed a lead `usrt:P-000002`, with no company, at the id derived from the prospect.
    older = sales.lead_id_of("usrt", "P-000002")
    seller.call("PATCH", f"leads({older})", json={"msdyn_prospectid": "usrt:P-000002", **lead("Older")},
                headers={"If-None-Match": "*"})  # fmt: skip
    dual_write = seller.create_dual_write_lead({"ProspectId": "p-000003", "ProspectName": "Ada Lovelace",
                                                "CompanyName": "Dual"}, company_id("usrt"))  # fmt: skip
    other_company = sales_client.create_lead("usmf", "P-000002", lead("Other company"))[0]
    writes = admin.counts()["dataverse"]["writes"]["leads"]

    adopted = {prospect_id: sales_client.create_lead("usrt", prospect_id, lead("Ours?"))
               for prospect_id in ("P-000002", "P-000003")}  # fmt: skip

    assert {prospect_id: (lead_id, row["leadid"], row["companyname"]) for prospect_id, (lead_id, row) in adopted.items()} == {
        "P-000002": (older, older, "Older"), "P-000003": (dual_write, dual_write, "Dual"),
    }  # fmt: skip
    assert [row["leadid"] for row in sales_client.get_leads("usmf", "P-000002")] == [other_company]
    assert [row["leadid"] for row in sales_client.get_leads("USRT", "p-000002")] == [older]
    assert admin.counts()["dataverse"]["writes"]["leads"] == writes  # nothing overwritten, nothing doubled


def test_get_by_ids_splits_many_ids_into_bounded_queries(sales_client, admin, monkeypatch):
    monkeypatch.setattr(sales, "IDS_PER_QUERY", 2)
    admin.seed_companies(["usrt"])
    ids = [sales_client.create_lead("usrt", f"P-{n:06d}", lead(f"Company {n}"))[0] for n in range(5)]
    before = requests_to(admin, "dataverse")

    rows = sales_client.get_by_ids("leads", "leadid", ids + [ids[0].upper()], ["leadid", "companyname"])

    assert sorted(row["leadid"] for row in rows) == sorted(ids)
    assert requests_to(admin, "dataverse") - before == 3  # 5 distinct ids, 2 per query


def test_decided_leads_are_read_in_pages_of_the_connections_page_size(sales_client, admin, seller):
    admin.seed_companies(["usrt"])
    ids = [sales_client.create_lead("usrt", f"P-{n:06d}", lead(f"Company {n}"))[0] for n in range(6)]
    for lead_id in ids[:5]:
        seller.disqualify(lead_id)  # the sixth stays open

    pages = list(sales_client.iter_decided_lead_pages())

    assert [len(page) for page in pages] == [2, 2, 1]  # page_size=2 in the connection's extra
    assert sorted(row["leadid"] for page in pages for row in page) == sorted(ids[:5])
    assert {row["statecode"] for page in pages for row in page} == {2}


# --- ODataClient retries -------------------------------------------------------------------------


def test_throttling_is_retried_after_the_services_retry_after(sales_client, admin):
    sales_client.whoami()  # a token in the cache, so only the Web API calls are timed
    admin.inject_fault("dataverse", 429, count=2, retry_after=1)
    before = requests_to(admin, "dataverse")

    started = time.monotonic()
    answer = sales_client.whoami()
    elapsed = time.monotonic() - started

    assert answer["UserId"]
    assert elapsed >= 2.0
    assert requests_to(admin, "dataverse") - before == 3


def test_a_service_that_stays_unavailable_fails_with_a_readable_error(commerce, admin):
    admin.inject_fault("commerce", 503, count=DEFAULT_MAX_ATTEMPTS, retry_after=0)
    before = requests_to(admin, "commerce")

    with pytest.raises(D365Error) as failed:
        commerce.get_prospect("usrt", "P-000001")

    assert failed.value.status == 503
    message = str(failed.value)
    assert "Commerce headquarters" in message and "read prospect" in message and "Next step" in message
    assert requests_to(admin, "commerce") - before == DEFAULT_MAX_ATTEMPTS
    assert f"after {DEFAULT_MAX_ATTEMPTS} attempts" in message and "retries are spent" in message


def test_a_bad_request_is_never_retried(commerce, admin):
    admin.inject_fault("commerce", 400, count=3)
    before = requests_to(admin, "commerce")

    with pytest.raises(D365Error) as failed:
        commerce.get_prospect("usrt", "P-000001")

    assert failed.value.status == 400
    assert requests_to(admin, "commerce") - before == 1


def test_the_legal_entities_are_read_once_however_many_threads_ask_at_once(sales_client, admin):
    # A bulk write's threads all need the company of their leads as they start: one read serves them.
    admin.seed_companies(["usrt", "usmf", "frrt"])  # two pages of two
    arrived = threading.Barrier(8)

    def ask(_: int) -> dict[str, str]:
        arrived.wait()
        return sales_client.company_codes()

    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(ask, range(8)))
    assert sales_client.odata.requests["read legal entities (cdm_companies)"] == 2  # its two pages, once
    assert set(answers[0].values()) >= {"usrt", "usmf", "frrt"} and all(answer is answers[0] for answer in answers)
