"""Hostile values in every place a value reaches a URL, against the fakes over real HTTPS and MSAL.

A value in a `$filter` literal or a key can never widen or break a request: a read returns nothing
or exactly the row whose key is that value, a write changes exactly that row (or is refused with a
clean 4xx), nothing answers 5xx or drops the connection, and a value the client cannot put in a URL
is refused before any request. Then prospects with hostile ids, names and companies go through
the whole flow, one lead each.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import pytest
from hostile_strings import HOSTILE_STRINGS, HOSTILE_VALID_PROSPECT_IDS

from b2b_onboarding.clients.commerce import CommerceClient
from b2b_onboarding.clients.odata import MAX_URL_VALUE_LENGTH, key_segment, literal
from b2b_onboarding.clients.sales import SalesClient, lead_id_of
from b2b_onboarding.domain.prospects import key_fold, prospect_hierarchy_id, prospect_key
from b2b_onboarding.errors import D365Error
from b2b_onboarding.flow import reconcile, sync
from d365_fakes.actors import Clerk
from d365_fakes.dataverse import company_id
from d365_fakes.running import FakeAdmin
from d365_fakes.scenario import CUSTOMER_GROUP

COMMERCE_PAGE_SIZE = 4
RUN = "manual__hostile"
WITHIN_BOUND = [value for value in HOSTILE_STRINGS if len(value) <= MAX_URL_VALUE_LENGTH]
BEYOND_BOUND = [value for value in HOSTILE_STRINGS if len(value) > MAX_URL_VALUE_LENGTH]
# Sales reads a prospect's leads under both forms of key, so the older one (`usrt:<id>`) must fit in a URL too.
SALES_WITHIN_BOUND = [value for value in WITHIN_BOUND if len(prospect_key("usrt", value)) <= MAX_URL_VALUE_LENGTH]
OLDER_KEY_BEYOND_BOUND = [value for value in WITHIN_BOUND if value not in SALES_WITHIN_BOUND]
# The rows every test starts with, which no hostile value may read or change.
BYSTANDERS = [("usrt", "P-1"), ("usrt", "P-2"), ("usmf", "P-1")]
# Leads keyed as dual-write keys them: the bare prospect id and the company (usmf's P-1 shares usrt's id).
BYSTANDER_LEADS = [("usrt", "P-1"), ("usrt", "P-2"), ("usmf", "P-1")]
LEAD_COLUMNS = ["leadid", "msdyn_prospectid", "_msdyn_company_value", "lastname"]


def shown(value: str) -> str:
    """A short, printable test id for a value."""
    text = ascii(value)
    return text if len(text) <= 40 else f"{text[:30]}...({len(value)} chars)"


def prospect(legal_entity: str, prospect_id: str, **fields) -> dict:
    return {"dataAreaId": legal_entity, "ProspectId": prospect_id, "ProspectName": "Ada Lovelace",
            "CompanyName": "Analytical Engines", "PrimaryEmailAddress": "ada@engines.example", **fields}  # fmt: skip


def lead(lastname: str) -> dict:
    return {"firstname": "Ada", "lastname": lastname, "companyname": "Analytical Engines",
            "msdyn_b2bcommerceprospect": True}  # fmt: skip


@pytest.fixture
def commerce(world, admin: FakeAdmin) -> Iterator[CommerceClient]:
    client = CommerceClient.connect(world.settings(world.endpoints.commerce))
    yield client
    client.odata.close()


def all_prospects(clerk: Clerk) -> dict[tuple[str, str], dict]:
    return {(row["dataAreaId"], row["ProspectId"]): row for row in clerk.all("Prospects")}


def seed_commerce(admin: FakeAdmin, value: str) -> None:
    """The bystanders, the prospect whose id is `value` and one in the company named `value`."""
    admin.seed_prospects([prospect(*key) for key in BYSTANDERS]
                         + [prospect("usrt", value), prospect(value, "P-3")])  # fmt: skip


# --- Commerce headquarters -------------------------------------------------------------------------


@pytest.mark.parametrize("value", WITHIN_BOUND, ids=shown)
def test_a_hostile_value_reads_nothing_or_exactly_its_own_prospect(commerce, admin, value):
    seed_commerce(admin, value)

    by_range = [row for page in commerce.iter_prospect_pages("usrt", None, (value, value)) for row in page]
    if "*" in value:  # a wildcard in HQ's `eq`, with no escape: refused before any request
        before = admin.counts()["commerce"]["requests"]
        with pytest.raises(ValueError, match="would match other legal entities"):
            commerce.iter_prospect_pages(value)
        assert admin.counts()["commerce"]["requests"] == before
    else:
        in_company = [row for page in commerce.iter_prospect_pages(value) for row in page]
        assert [(row["dataAreaId"], row["ProspectId"]) for row in in_company] == [(value.lower(), "P-3")]
    assert [(row["dataAreaId"], row["ProspectId"]) for row in by_range] == [("usrt", value)]
    assert commerce.get_prospect("usrt", value)["ProspectId"] == value
    assert commerce.get_prospect(value, "P-3")["dataAreaId"] == value.lower()
    assert commerce.get_prospect(value, "P-1") is None
    assert commerce.get_customer("usrt", value) is None
    assert commerce.get_hierarchy(value) is None
    assert commerce.get_hierarchy_node(value, value) is None


@pytest.mark.parametrize("value", WITHIN_BOUND, ids=shown)
def test_a_hostile_key_writes_exactly_its_own_row_in_commerce(commerce, admin, clerk, value):
    seed_commerce(admin, value)
    before = all_prospects(clerk)

    commerce.set_prospect_status("usrt", value, "Approved", before[("usrt", value)]["@odata.etag"])
    [answer] = commerce.run_changesets(
        [[commerce.status_request(value, "P-3", "Rejected", before[(value.lower(), "P-3")]["@odata.etag"])]],
        "reject",
    )
    with pytest.raises(D365Error) as missing:
        commerce.set_prospect_status("usmf", value, "Approved", "*")
    # HQ's customer accounts and hierarchy ids hold 20 characters: a longer value is refused whole.
    key = value[:20]
    if key != value:
        with pytest.raises(D365Error) as too_long:
            commerce.create_customer({"dataAreaId": "usrt", "CustomerAccount": value, "CustomerGroupId": CUSTOMER_GROUP,
                                      "PartyType": "Organization", "OrganizationName": "Engines Ltd"})  # fmt: skip
        assert too_long.value.status == 400
    organization = commerce.create_customer({"dataAreaId": "usrt", "CustomerAccount": key, "CustomerGroupId": CUSTOMER_GROUP,
                                             "PartyType": "Organization", "OrganizationName": "Engines Ltd"})  # fmt: skip
    person = commerce.create_customer({"dataAreaId": "usrt", "CustomerAccount": "C-PERSON", "PartyType": "Person",
                                       "PersonLastName": "Lovelace", "PrimaryContactEmail": "ada@engines.example",
                                       "CustomerGroupId": CUSTOMER_GROUP})  # fmt: skip
    commerce.create_hierarchy({"dataAreaId": "usrt", "CustomerHierarchyId": key, "Name": "Engines Ltd",
                               "Purpose": "B2BOrganization", "OrganizationPartyNumber": organization["PartyNumber"]})  # fmt: skip
    commerce.create_hierarchy_node({"CustomerHierarchyId": key, "NodePartyNumber": person["PartyNumber"],
                                    "Role": "Admin", "NodeType": "Customer"})  # fmt: skip

    after = all_prospects(clerk)
    assert [part.status for part in answer] == [204]
    assert missing.value.status == 404
    assert after[("usrt", value)]["B2BProspectStatus"] == "Approved"
    assert after[(value.lower(), "P-3")]["B2BProspectStatus"] == "Rejected"
    assert {key: after[key] for key in BYSTANDERS} == {key: before[key] for key in BYSTANDERS}
    assert [(mail["dataAreaId"], mail["ProspectId"]) for mail in admin.outbox()] == [
        ("usrt", value), (value.lower(), "P-3")
    ]  # fmt: skip
    assert commerce.get_customer("usrt", key)["CustomerAccount"] == key
    assert commerce.get_hierarchy(key)["CustomerHierarchyId"] == key
    assert commerce.get_hierarchy_node(key, person["PartyNumber"])["CustomerHierarchyId"] == key
    assert admin.counts()["commerce"]["writes"] == {
        "Prospects": 2, "CustomersV3": 2, "CustomerHiearchies": 1, "CustomerHierarchyNodes": 1
    }  # fmt: skip


# --- Dataverse (Sales) -----------------------------------------------------------------------------


@pytest.mark.parametrize("value", SALES_WITHIN_BOUND, ids=shown)
def test_a_hostile_prospect_key_reads_and_writes_exactly_its_own_lead(sales_client, admin, value):
    admin.seed_companies(["usrt", "usmf"])
    bystander_ids = [sales_client.create_lead(*key, lead("Lovelace"))[0] for key in BYSTANDER_LEADS]
    bystanders = sales_client.get_by_ids("leads", "leadid", bystander_ids, LEAD_COLUMNS)
    assert sales_client.get_leads("usrt", value) == []
    assert sales_client.leads_between("usrt", value, value) == {}

    lead_id, existing = sales_client.create_lead("usrt", value, lead("Hostile"))
    again_id, found = sales_client.create_lead("usrt", value, lead("Overwritten?"))

    assert existing is None
    assert again_id == lead_id == lead_id_of("usrt", value)
    assert (found["leadid"], found["msdyn_prospectid"], found["lastname"]) == (lead_id, value, "Hostile")
    assert [row["leadid"] for row in sales_client.get_leads("usrt", value)] == [lead_id]
    assert sales_client.get_leads("usmf", value) == []
    between = sales_client.leads_between("usrt", value, value)
    assert {key: [row["leadid"] for row in rows] for key, rows in between.items()} == {key_fold(value): [lead_id]}
    [row] = sales_client.get_by_ids("leads", "leadid", [lead_id], LEAD_COLUMNS)
    assert (row["msdyn_prospectid"], row["_msdyn_company_value"], row["lastname"]) == (value, company_id("usrt"), "Hostile")
    assert sales_client.get_by_ids("leads", "leadid", bystander_ids, LEAD_COLUMNS) == bystanders
    assert admin.counts()["dataverse"]["writes"]["leads"] == len(BYSTANDER_LEADS) + 1


@pytest.mark.parametrize("value", HOSTILE_STRINGS, ids=shown)
def test_reading_by_ids_refuses_anything_but_guids_before_any_request(sales_client, admin, value):
    admin.seed_companies(["usrt"])
    real_id = sales_client.create_lead("usrt", "P-1", lead("Lovelace"))[0]
    before = admin.counts()["dataverse"]["requests"]

    with pytest.raises(ValueError, match="leads: .* is not a GUID"):
        sales_client.get_by_ids("leads", "leadid", [real_id, value], ["leadid"])

    assert admin.counts()["dataverse"]["requests"] == before


# --- Values no URL may carry -----------------------------------------------------------------------


@pytest.mark.parametrize("value", BEYOND_BOUND, ids=shown)
def test_a_value_too_long_for_a_url_is_refused_before_any_request(commerce, sales_client, admin, value):
    admin.seed_prospects([prospect(*key) for key in BYSTANDERS])  # and their companies in Dataverse
    sales_client.company_codes()  # the client reads the companies once; no request of it carries a value
    before = admin.counts()
    refused = [
        lambda: commerce.iter_prospect_pages(value),
        lambda: commerce.iter_prospect_pages("usrt", None, (value, value)),
        lambda: commerce.get_prospect("usrt", value),
        lambda: commerce.get_prospect(value, "P-1"),
        lambda: commerce.get_customer("usrt", value),
        lambda: commerce.get_hierarchy(value),
        lambda: commerce.get_hierarchy_node(value, value),
        lambda: commerce.set_prospect_status("usrt", value, "Approved", "*"),
        lambda: commerce.status_request("usrt", value, "Approved", "*"),
        lambda: sales_client.get_leads("usrt", value),
        lambda: sales_client.leads_between("usrt", value, value),
        lambda: sales_client.leads_between("usrt", "P-1", value),
    ]  # create_lead and upsert_leads carry the key in their bodies only, never in a URL

    for call in refused:
        with pytest.raises(ValueError, match=f"is {len(value)} characters long; .* at most {MAX_URL_VALUE_LENGTH}"):
            call()

    after = admin.counts()
    assert (after["commerce"]["requests"], after["dataverse"]["requests"]) == (
        before["commerce"]["requests"], before["dataverse"]["requests"]
    )  # fmt: skip


@pytest.mark.parametrize("value", OLDER_KEY_BEYOND_BOUND, ids=shown)
def test_a_prospect_id_whose_older_key_is_too_long_for_a_url_is_refused_before_any_request(sales_client, admin, value):
    admin.seed_companies(["usrt"])
    sales_client.company_codes()
    before = admin.counts()["dataverse"]["requests"]
    older = len(prospect_key("usrt", value))

    for call in (lambda: sales_client.get_leads("usrt", value), lambda: sales_client.leads_between("usrt", value, value)):
        with pytest.raises(ValueError, match=f"is {older} characters long; .* at most {MAX_URL_VALUE_LENGTH}"):
            call()

    assert admin.counts()["dataverse"]["requests"] == before


@pytest.mark.parametrize("value", [None, 7, b"P-1"], ids=ascii)
def test_only_text_becomes_a_literal_or_a_key(value):
    with pytest.raises(TypeError, match="must be a string"):
        literal(value)
    with pytest.raises(TypeError, match="must be a string"):
        key_segment("Prospects", dataAreaId="usrt", ProspectId=value)


def test_text_that_is_not_valid_unicode_is_refused():
    lone_surrogate = "P-\ud800"  # what JSON's "\ud800" decodes to; no UTF-8 URL can carry it
    with pytest.raises(ValueError, match="not valid Unicode"):
        literal(lone_surrogate)
    with pytest.raises(ValueError, match="not valid Unicode"):
        key_segment("leads", msdyn_prospectid=lone_surrogate)


# --- The whole flow --------------------------------------------------------------------------------

OUTCOMES = ("won", "lost", "disqualified")
STATUS_AFTER = {"won": "Approved", "lost": "Rejected", "disqualified": "Rejected"}
# Derived customer accounts carry the hostile prospect ids into Commerce's keys (and fit HQ's 20 characters).
TEMPLATE = "{legal_entity}{prospect_id}{role}"


@pytest.mark.parametrize("template", [None, TEMPLATE], ids=["numbered by HQ", "derived accounts"])
@pytest.mark.parametrize("mode", ["bulk", "one by one"])
def test_prospects_with_hostile_ids_names_and_companies_go_through_the_flow(world, admin, clerk, store, mode, template):
    extra = {} if mode == "bulk" else {"bulk": False, "change_tracking": False}
    ids = HOSTILE_VALID_PROSPECT_IDS
    outcome_of = {prospect_id: OUTCOMES[index % len(OUTCOMES)] for index, prospect_id in enumerate(ids)}
    admin.seed_prospects([prospect("usrt", prospect_id, ProspectName=f"Seán O'Brien/../{index}#?&",
                                   CompanyName=f"Babbage & Co'; --{index} %27", PrimaryEmailAddress=f"b{index}@example.com")
                          for index, prospect_id in enumerate(ids)])  # fmt: skip
    commerce = CommerceClient.connect(world.settings(world.endpoints.commerce, **extra))
    sales = SalesClient.connect(world.settings(world.endpoints.dataverse, page_size=3, **extra))
    with commerce.odata, sales.odata:
        pulled = sync.pull_prospects(commerce, store, "usrt", RUN)
        pushed = sync.push_leads(sales, store, "usrt", RUN)
        decided = admin.decide([{"msdyn_prospectid": prospect_key("usrt", prospect_id), "outcome": outcome}
                                for prospect_id, outcome in outcome_of.items()])  # fmt: skip
        reconcile.read_outcomes(sales, store, RUN)
        reconcile.write_customers(commerce, sales, store, "usrt", RUN, CUSTOMER_GROUP, account_template=template)
        reconcile.approve_won(commerce, store, "usrt", RUN)
        reconcile.reject_lost(commerce, store, "usrt", RUN)
        leads = [row for page in sales.iter_commerce_lead_pages() for row in page]
        hierarchies = {prospect_id: commerce.get_hierarchy(prospect_hierarchy_id("usrt", prospect_id))
                       for prospect_id in ids}  # fmt: skip

    assert (pulled["pulled"], pulled["invalid"], pushed["created"]) == (len(ids), 0, len(ids))
    assert decided == {"applied": len(ids), "errors": []}
    # One lead per prospect, keyed as dual-write keys it: the prospect id exactly as sent, and the company.
    assert Counter((row["msdyn_prospectid"], row["_msdyn_company_value"]) for row in leads) == Counter(
        (pid, company_id("usrt")) for pid in ids
    )
    statuses = {prospect_id: row["B2BProspectStatus"] for (_, prospect_id), row in all_prospects(clerk).items()}
    assert statuses == {prospect_id: STATUS_AFTER[outcome] for prospect_id, outcome in outcome_of.items()}
    tracked = store.frame().set_index("prospect_id")
    assert tracked["last_error"].isna().all(), tracked["last_error"].dropna().to_dict()
    assert tracked["decision"].to_dict() == {pid: STATUS_AFTER[outcome].lower() for pid, outcome in outcome_of.items()}
    assert {pid: hierarchy["dataAreaId"] for pid, hierarchy in hierarchies.items() if hierarchy} == {
        pid: "usrt" for pid, outcome in outcome_of.items() if outcome == "won"
    }  # fmt: skip
    # Two customers per qualified lead (won or lost), the ones the store names; derived from the id as sent.
    qualified = [pid for pid, outcome in outcome_of.items() if outcome != "disqualified"]
    customers = Counter((row["PartyType"], row["CustomerAccount"]) for row in clerk.all("CustomersV3"))
    assert customers == Counter([("Organization", tracked.at[pid, "org_customer_account"]) for pid in qualified]
                                + [("Person", tracked.at[pid, "person_customer_account"]) for pid in qualified])  # fmt: skip
    if template:
        assert {pid: (tracked.at[pid, "org_customer_account"], tracked.at[pid, "person_customer_account"])
                for pid in qualified} == {pid: (f"USRT{pid}ORG", f"USRT{pid}ADM") for pid in qualified}  # fmt: skip
    assert Counter((mail["ProspectId"], mail["template"]) for mail in admin.outbox()) == Counter(
        (pid, f"B2B prospect {STATUS_AFTER[outcome].lower()}") for pid, outcome in outcome_of.items()
    )
