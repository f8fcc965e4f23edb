"""Bad prospects from Commerce, refused before any write: each keeps an error naming the prospect
and the field, stays tracked in the state store, and is validated again on every later pull, so
that a record fixed in Commerce becomes valid. Good prospects with unusual names go through whole.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from b2b_onboarding.clients.commerce import CommerceClient
from b2b_onboarding.clients.sales import SalesClient
from b2b_onboarding.domain import prospects
from b2b_onboarding.domain.prospects import Prospect
from b2b_onboarding.flow import sync
from b2b_onboarding.store.state import PROSPECT_COLUMNS, StateStore
from d365_fakes.dataverse import company_id

RUN = "manual__bad_input"
UNUSUAL_NAMES = ["李 小龙", "Zoë Żółć", "Amara 😀 Okafor"]

# Every field with a length limit in the standard tenant, and the limit: the smaller of HQ's field
# and the lead column it becomes (a one-word name is all last name, lastname holds 50).
FIELD_LIMITS = {
    "dataAreaId": 4, "ProspectId": 20, "ProspectName": 50, "CompanyName": 100, "PrimaryEmailAddress": 100,
    "PrimaryPhoneNumber": 50, "AddressStreet": 250, "AddressCity": 60, "AddressStateId": 10, "AddressZipCode": 10,
    "AddressCountryRegionISOCode": 3, "CurrencyCode": 3, "LanguageId": 7, "Note": 1000,
    "RetailChannelOperatingUnitPartyNumber": 40,
}  # fmt: skip


def request(prospect_id: str = "P-000001", legal_entity: str = "usrt", **fields) -> dict:
    """A Commerce `Prospects` row as the pull reads it."""
    return {"dataAreaId": legal_entity, "ProspectId": prospect_id, "ProspectName": "Ada Lovelace",
            "CompanyName": "Analytical Engines", "PrimaryEmailAddress": f"{prospect_id.lower()}@engines.example",
            "IsB2BProspect": "Yes", "B2BProspectStatus": "Pending", **fields}  # fmt: skip


def without(row: dict, field: str) -> dict:
    return {name: value for name, value in row.items() if name != field}


class CommerceShowing:
    """Commerce as a pull sees it: the given rows, in pages, whatever the legal entity asked for."""

    def __init__(self, *rows: dict, page_size: int = 10) -> None:
        self.pages = [list(rows[start : start + page_size]) for start in range(0, len(rows), page_size)]

    def iter_prospect_pages(self, legal_entity: str) -> Iterator[list[dict]]:
        return iter(self.pages)


def pull(store: StateStore, *rows: dict, legal_entity: str = "usrt", page_size: int = 10) -> dict:
    return sync.pull_prospects(CommerceShowing(*rows, page_size=page_size), store, legal_entity, RUN)


def tracked(store: StateStore, legal_entity: str, prospect_id: str) -> dict:
    frame = store.frame(keys=[(legal_entity, prospect_id)], columns=[*PROSPECT_COLUMNS, "email"])
    assert len(frame) == 1, f"{legal_entity}/{prospect_id} is not tracked"
    return frame.iloc[0].to_dict()


# --- Each kind of bad record -----------------------------------------------------------------------

MISSING_OR_MALFORMED_EMAILS = {
    "missing": without(request(), "PrimaryEmailAddress"),
    "null": request(PrimaryEmailAddress=None),
    "empty": request(PrimaryEmailAddress=""),
    "no @": request(PrimaryEmailAddress="ada.engines.example"),
    "nothing after @": request(PrimaryEmailAddress="ada@"),
    "nothing before @": request(PrimaryEmailAddress="@engines.example"),
    "two @": request(PrimaryEmailAddress="ada@@engines.example"),
    "a space": request(PrimaryEmailAddress="ada lovelace@engines.example"),
    "no dot in the domain": request(PrimaryEmailAddress="ada@engines"),
}
EMPTY_COMPANIES = {
    "missing": without(request(), "CompanyName"),
    "null": request(CompanyName=None),
    "empty": request(CompanyName=""),
    "spaces": request(CompanyName="   "),
    "whitespace of all kinds": request(CompanyName=" \t\n\u3000"),
}


@pytest.mark.parametrize("row", MISSING_OR_MALFORMED_EMAILS.values(), ids=MISSING_OR_MALFORMED_EMAILS.keys())
def test_a_missing_or_malformed_email_is_refused_naming_the_prospect_and_the_field(row):
    [error] = prospects.validate_page([row], "usrt")["error"]
    assert error.startswith("prospect usrt/P-000001: PrimaryEmailAddress: ")


@pytest.mark.parametrize("row", EMPTY_COMPANIES.values(), ids=EMPTY_COMPANIES.keys())
def test_an_empty_or_blank_company_is_refused_naming_the_prospect_and_the_field(row):
    [error] = prospects.validate_page([row], "usrt")["error"]
    assert error.startswith("prospect usrt/P-000001: CompanyName: ")


def of_length(field: str, length: int) -> str:
    if field == "PrimaryEmailAddress":
        domain = ".example"
        return "a" * 60 + "@" + "d" * (length - 61 - len(domain)) + domain
    return "x" * length


@pytest.mark.parametrize(("field", "limit"), FIELD_LIMITS.items())
def test_each_limited_field_is_refused_one_character_over_its_limit(field, limit):
    at_limit, over_limit = of_length(field, limit), of_length(field, limit + 1)
    assert len(at_limit) == limit

    valid, no_error = prospects.validate(request(**{field: at_limit}))
    invalid, error = prospects.validate(request(**{field: over_limit}))

    assert no_error is None and getattr(valid, field) == at_limit
    assert invalid is None
    assert error.startswith("prospect ") and f": {field}: " in error and f"at most {limit} " in error


def test_a_row_of_another_legal_entity_is_refused_naming_dataareaid_and_the_legal_entity_pulled():
    page = prospects.validate_page([request(legal_entity="usmf"), request("P-000002", legal_entity="USRT")], "usrt")

    assert list(page["error"]) == [
        "prospect usmf/P-000001: dataAreaId: 'usmf' is not the legal entity being pulled (usrt)", None
    ]  # fmt: skip
    assert page.loc[1, "prospect"]["dataAreaId"] == "usrt"


@pytest.mark.parametrize("given", [" usrt", "usrt\n", "{pulled}"], ids=ascii)
def test_a_legal_entity_not_exactly_the_one_pulled_is_refused_and_named_as_given(given):
    [error] = prospects.validate_page([request(legal_entity=given)], "usrt")["error"]
    assert error == f"prospect {given}/P-000001: dataAreaId: '{given}' is not the legal entity being pulled (usrt)"


# --- Tracked, validated again, and fixed -----------------------------------------------------------

BAD_RECORDS = {
    "missing email": (without(request(), "PrimaryEmailAddress"), "PrimaryEmailAddress"),
    "malformed email": (request(PrimaryEmailAddress="ada@"), "PrimaryEmailAddress"),
    "blank company": (request(CompanyName="  "), "CompanyName"),
    "over-long name": (request(ProspectName="x" * 101), "ProspectName"),
    "control character": (request(ProspectName="Ada\x00Lovelace"), "ProspectName"),
    "another legal entity": (request(legal_entity="usmf"), "dataAreaId"),
}


@pytest.mark.parametrize(("bad", "field"), BAD_RECORDS.values(), ids=BAD_RECORDS.keys())
def test_a_bad_record_stays_tracked_is_validated_on_every_pull_and_becomes_valid_once_fixed(store, bad, field):
    legal_entity = bad["dataAreaId"]
    fixed = request(legal_entity=legal_entity)

    first = pull(store, bad)
    second = pull(store, bad)
    refused = tracked(store, legal_entity, "P-000001")
    third = pull(store, fixed, legal_entity=legal_entity)
    accepted = tracked(store, legal_entity, "P-000001")

    assert (first["invalid"], second["invalid"], third["invalid"]) == (1, 1, 0)
    assert (first["new"], second["unchanged"], third["refreshed"]) == (1, 1, 1)
    assert refused["stage"] == "invalid" and refused["email"] is None
    # kept as received, so the bad value can be shown beside the error (the plugin's prospect page)
    assert refused["prospect"] == {name: value for name, value in bad.items() if name in Prospect.model_fields}
    assert refused["last_error"].startswith(f"prospect {legal_entity}/P-000001: {field}: ")
    assert accepted["stage"] == "pulled" and accepted["last_error"] is None
    assert accepted["prospect"]["PrimaryEmailAddress"] == "p-000001@engines.example"
    assert accepted["email"] == "p-000001@engines.example"
    assert list(store.history(legal_entity, "P-000001")["to_stage"]) == ["invalid", "pulled"]


def test_an_invalid_correction_of_a_prospect_with_a_lead_keeps_the_last_valid_record_and_names_the_fields(store):
    pull(store, request())
    store.update("usrt", "P-000001", RUN, lead_id="00000000-0000-0000-0000-000000000001", lead_state="open")

    counts = pull(store, request(CompanyName="", PrimaryEmailAddress="broken"))

    row = tracked(store, "usrt", "P-000001")
    assert counts["corrected"] == 1
    assert row["stage"] == "lead_open" and row["lead_outdated"] is None  # nothing to carry to the lead
    assert row["prospect"]["CompanyName"] == "Analytical Engines"
    assert "prospect usrt/P-000001" in row["last_error"]
    assert "CompanyName" in row["last_error"] and "PrimaryEmailAddress" in row["last_error"]
    assert pull(store, request(CompanyName="", PrimaryEmailAddress="broken"))["unchanged"] == 1  # said once
    assert pull(store, request())["corrected"] == 1
    assert tracked(store, "usrt", "P-000001")["last_error"] is None


# --- The same email on two prospects ---------------------------------------------------------------

SHARED = "ada@engines.example"


def test_the_same_email_on_a_second_prospect_is_refused_naming_the_first(store):
    counts = pull(store, request("P-000007", PrimaryEmailAddress=" Ada@Engines.example "),
                  request("P-000002", PrimaryEmailAddress=SHARED))  # fmt: skip

    assert counts["invalid"] == 1
    assert tracked(store, "usrt", "P-000002")["stage"] == "pulled"
    assert tracked(store, "usrt", "P-000007")["last_error"] == (
        "prospect usrt/P-000007: PrimaryEmailAddress: the same email as prospect usrt/P-000002 "
        "(emails must be unique per legal entity)"
    )


def test_a_tracked_prospect_keeps_its_email_against_a_later_one_with_a_lower_id(store):
    pull(store, request("P-000007", PrimaryEmailAddress=SHARED))

    pull(store, request("P-000001", PrimaryEmailAddress=SHARED), request("P-000007", PrimaryEmailAddress=SHARED))

    assert tracked(store, "usrt", "P-000007")["stage"] == "pulled"
    assert "the same email as prospect usrt/P-000007" in tracked(store, "usrt", "P-000001")["last_error"]


def test_the_holder_is_found_on_an_earlier_page_of_the_same_pull(store):
    pull(store, request("P-000001", PrimaryEmailAddress=SHARED), request("P-000002"),
         request("P-000003", PrimaryEmailAddress=SHARED), page_size=2)  # fmt: skip

    assert "the same email as prospect usrt/P-000001" in tracked(store, "usrt", "P-000003")["last_error"]


def test_the_same_email_in_two_legal_entities_is_fine(store):
    pull(store, request("P-000001", PrimaryEmailAddress=SHARED))
    pull(store, request("P-000001", legal_entity="usmf", PrimaryEmailAddress=SHARED), legal_entity="usmf")

    assert tracked(store, "usrt", "P-000001")["stage"] == tracked(store, "usmf", "P-000001")["stage"] == "pulled"


def test_the_duplicate_becomes_valid_on_the_next_pull_once_the_holder_is_decided(store):
    both = (request("P-000002", PrimaryEmailAddress=SHARED), request("P-000007", PrimaryEmailAddress=SHARED))
    pull(store, *both)
    refused = tracked(store, "usrt", "P-000007")["stage"]
    store.update("usrt", "P-000002", RUN, lead_id="00000000-0000-0000-0000-000000000002", lead_state="disqualified",
                 decision="rejected")  # fmt: skip

    pull(store, both[1])  # a decided prospect is no longer Pending, so Commerce no longer lists it

    assert refused == "invalid"
    assert tracked(store, "usrt", "P-000007")["stage"] == "pulled"
    assert tracked(store, "usrt", "P-000007")["email"] == SHARED


def test_the_duplicate_stays_refused_once_the_holder_is_a_person_customer(store):
    both = (request("P-000002", PrimaryEmailAddress=SHARED), request("P-000007", PrimaryEmailAddress=SHARED))
    pull(store, *both)
    store.update("usrt", "P-000002", RUN, lead_id="00000000-0000-0000-0000-000000000002", lead_state="qualified",
                 person_customer_account="P-000002-ADM", person_party_number="PTY-1", opportunity_state="won",
                 decision="approved")  # fmt: skip

    pull(store, both[1])

    assert tracked(store, "usrt", "P-000007")["stage"] == "invalid"
    assert "the same email as prospect usrt/P-000002" in tracked(store, "usrt", "P-000007")["last_error"]


def test_the_duplicate_becomes_valid_on_the_next_pull_once_the_holders_email_changes(store):
    pull(store, request("P-000002", PrimaryEmailAddress=SHARED), request("P-000007", PrimaryEmailAddress=SHARED))
    moved = (request("P-000002", PrimaryEmailAddress="ada@babbage.example"),
             request("P-000007", PrimaryEmailAddress=SHARED))  # fmt: skip

    pull(store, *moved)  # the holder's new email is recorded in this pull
    still_refused = tracked(store, "usrt", "P-000007")["stage"]
    pull(store, *moved)

    assert still_refused == "invalid"
    assert tracked(store, "usrt", "P-000007")["stage"] == "pulled"
    assert store.emails_in_use("usrt", [SHARED, "ada@babbage.example"]) == {
        SHARED: "P-000007", "ada@babbage.example": "P-000002"
    }  # fmt: skip


def test_emails_in_use_are_those_of_valid_undecided_prospects_or_person_customers_of_the_legal_entity(store):
    pull(store, request("P-000001", PrimaryEmailAddress="open@example.com"),
         request("P-000002", PrimaryEmailAddress="decided@example.com"),
         request("P-000003", PrimaryEmailAddress="invalid@example.com", CompanyName=""))  # fmt: skip
    pull(store, request("P-000009", legal_entity="usmf", PrimaryEmailAddress="other.company@example.com"),
         legal_entity="usmf")  # fmt: skip
    pull(store, request("P-000004", PrimaryEmailAddress="customer@example.com"))
    store.update("usrt", "P-000002", RUN, lead_id="00000000-0000-0000-0000-000000000002", lead_state="disqualified",
                 decision="rejected")  # fmt: skip
    store.update("usrt", "P-000004", RUN, lead_id="00000000-0000-0000-0000-000000000004", lead_state="qualified",
                 person_customer_account="P-000004-ADM", opportunity_state="lost", decision="rejected")  # fmt: skip

    in_use = store.emails_in_use("usrt", ["open@example.com", "decided@example.com", "invalid@example.com",
                                          "other.company@example.com", "unknown@example.com", "customer@example.com"])  # fmt: skip

    assert in_use == {"open@example.com": "P-000001", "customer@example.com": "P-000004"}


# --- Unusual but valid names -----------------------------------------------------------------------


def test_non_latin_and_emoji_names_are_valid_and_tracked_unchanged(store):
    rows = [request(f"P-00000{n}", ProspectName=name, CompanyName=f"{name} 株式会社") for n, name in
            enumerate(UNUSUAL_NAMES, start=1)]  # fmt: skip

    counts = pull(store, *rows)

    assert counts["invalid"] == 0
    for row in rows:
        kept = tracked(store, "usrt", row["ProspectId"])["prospect"]
        assert (kept["ProspectName"], kept["CompanyName"]) == (row["ProspectName"], row["CompanyName"])
        lead = prospects.lead_of(kept)
        assert " ".join(part for part in (lead["firstname"], lead["lastname"]) if part) == row["ProspectName"]


def test_only_valid_prospects_become_leads_and_unusual_names_reach_sales_unchanged(world, admin, store):
    valid = [request(f"P-00000{n}", ProspectName=name, CompanyName=f"{name} 株式会社") for n, name in
             enumerate(UNUSUAL_NAMES, start=1)]  # fmt: skip
    bad = [request("P-000101", PrimaryEmailAddress="not-an-email"), request("P-000102", CompanyName=" "),
           request("P-000103", PrimaryEmailAddress=valid[0]["PrimaryEmailAddress"].upper())]  # fmt: skip
    admin.seed_prospects(valid + bad)
    commerce = CommerceClient.connect(world.settings(world.endpoints.commerce))
    sales = SalesClient.connect(world.settings(world.endpoints.dataverse))
    with commerce.odata, sales.odata:
        pulled = sync.pull_prospects(commerce, store, "usrt", RUN)
        pushed = sync.push_leads(sales, store, "usrt", RUN)
        leads = {row["msdyn_prospectid"]: row for page in sales.iter_commerce_lead_pages() for row in page}
        names = sales.get_by_ids("leads", "leadid", [row["leadid"] for row in leads.values()],
                                 ["msdyn_prospectid", "_msdyn_company_value", "fullname", "companyname"])  # fmt: skip

    assert (pulled["pulled"], pulled["invalid"], pushed["created"]) == (6, 3, 3)
    assert admin.counts()["dataverse"]["writes"]["leads"] == 3
    assert {(row["msdyn_prospectid"], row["_msdyn_company_value"]): (row["fullname"], row["companyname"])
            for row in names} == {
        (row["ProspectId"], company_id("usrt")): (row["ProspectName"], row["CompanyName"]) for row in valid
    }  # fmt: skip
