"""Dual-write's companies in the fake Dataverse: the `cdm_companies` table, the leads' `msdyn_company`
lookup, the composite alternate key (`msdyn_prospectid`, company) and how URLs, bulk targets and
the sellers' decisions address leads by it."""

from pathlib import Path

import httpx
import msal
import pytest
from starlette.testclient import TestClient
from test_dataverse import MISSING_ID, by_prospect_id, create, error_of, upserted_id
from test_dataverse_admin import (  # noqa: F401 (api, issuer and state are fixtures)
    ADMIN,
    api,
    decide,
    issuer,
    opportunity_of,
    state,
)

from d365_fakes.dataverse import DataverseState, company_id
from d365_fakes.running import FakeAdmin, running_fakes

USRT, USMF = company_id("usrt"), company_id("usmf")
DUPLICATE = {"code": "0x80040237", "message": "A record with matching key values already exists."}
UPSERT = "leads/Microsoft.Dynamics.CRM.UpsertMultiple"
CREATE = "leads/Microsoft.Dynamics.CRM.CreateMultiple"
UPDATE = "leads/Microsoft.Dynamics.CRM.UpdateMultiple"
PROSPECT = {
    "ProspectId": "P-000001",
    "ProspectName": "Ada Lovelace",
    "CompanyName": "Analytical Engines Ltd",
    "PrimaryEmailAddress": "ada@engines.example",
}


@pytest.fixture
def companies(api: TestClient) -> None:
    """usrt and usmf, as dual-write's legal-entity map made them."""
    assert api.post(f"{ADMIN}/dataverse/companies", json={"codes": ["usrt", "usmf"]}).json() == {"created": 2}


def of(company: str) -> dict:
    """The body part that puts a lead in `company`."""
    return {"msdyn_company@odata.bind": f"/cdm_companies({company_id(company)})"}


def lead_target(reference: str | None = None, **columns: object) -> dict:
    target: dict = {"@odata.type": "Microsoft.Dynamics.CRM.lead", **columns}
    return target | ({"@odata.id": reference} if reference else {})


def bulk(api: TestClient, action: str, *targets: dict) -> httpx.Response:
    return api.post(action, json={"Targets": list(targets)})


def lead_keys(api: TestClient) -> set[tuple[str | None, str | None, str | None]]:
    """Each lead's (msdyn_prospectid, _msdyn_company_value, lastname)."""
    rows = api.get("leads?$select=msdyn_prospectid,_msdyn_company_value,lastname").json()["value"]
    return {(row["msdyn_prospectid"], row["_msdyn_company_value"], row["lastname"]) for row in rows}


# --- cdm_companies ---------------------------------------------------------------------------------


def test_company_ids_are_fixed_and_any_case_names_the_same_company() -> None:
    assert company_id("usrt") == company_id("USRT") == USRT != USMF
    assert USRT == USRT.lower() and len(USRT) == 36


def test_the_admin_surface_creates_companies_once_and_the_web_api_reads_them(api: TestClient) -> None:
    assert api.post(f"{ADMIN}/dataverse/companies", json={"codes": ["usrt", "USMF"]}).json() == {"created": 2}
    again = api.post(f"{ADMIN}/dataverse/companies", json={"codes": ["USRT", "usmf", "gbsi", "GBSI"]})
    assert (again.status_code, again.json()) == (200, {"created": 1})  # codes compare case-insensitively
    rows = api.get("cdm_companies?$select=cdm_companycode,cdm_name").json()["value"]
    assert sorted((row["cdm_companycode"], row["cdm_companyid"]) for row in rows) == sorted(
        [("USRT", USRT), ("USMF", USMF), ("GBSI", company_id("gbsi"))]
    )
    [usrt] = api.get("cdm_companies?$filter=cdm_companycode eq 'usrt'").json()["value"]
    assert (usrt["cdm_companyid"], usrt["cdm_companycode"], usrt["cdm_name"]) == (USRT, "USRT", "USRT")
    assert usrt["@odata.etag"].startswith('W/"')
    assert api.get(f"cdm_companies({USRT.upper()})").json()["cdm_companycode"] == "USRT"
    assert api.get("cdm_companies(cdm_companycode='usmf')").json()["cdm_companyid"] == USMF


def test_dual_write_owns_cdm_companies_the_web_api_does_not_write_them(api: TestClient, companies: None) -> None:
    assert error_of(api.post("cdm_companies", json={"cdm_companycode": "X"}), 405)["code"] == "0x80040203"
    assert error_of(api.patch(f"cdm_companies({USRT})", json={"cdm_name": "X"}), 405)["code"] == "0x80040203"
    assert error_of(api.delete(f"cdm_companies({USRT})"), 405)["code"] == "0x80040203"
    bulk_create = bulk(api, "cdm_companies/Microsoft.Dynamics.CRM.CreateMultiple", {"@odata.type": "Microsoft.Dynamics.CRM.cdm_company"})
    assert error_of(bulk_create, 405)["code"] == "0x80040203"
    assert api.get(f"cdm_companies({USRT})").json()["cdm_name"] == "USRT"


@pytest.mark.parametrize("body", [{}, {"codes": "usrt"}, {"codes": [""]}, {"codes": ["usrt", 7]}, {"codes": ["usrt"], "names": []}, []])
def test_malformed_company_seeds_are_refused_and_nothing_is_created(api: TestClient, body: object) -> None:
    response = api.post(f"{ADMIN}/dataverse/companies", json=body)
    assert response.status_code == 400 and isinstance(response.json()["error"], str)
    assert api.get("cdm_companies").json()["value"] == []


def test_seeding_prospects_creates_their_companies_and_reset_empties_them(api: TestClient, state: DataverseState) -> None:
    assert api.post(f"{ADMIN}/dataverse/companies", json={"codes": ["usrt"]}).json() == {"created": 1}
    prospects = [PROSPECT | {"dataAreaId": "USRT"}, PROSPECT | {"dataAreaId": "usmf"}, PROSPECT | {"dataAreaId": "usmf", "ProspectId": "P-2"}]
    assert api.post(f"{ADMIN}/commerce/prospects", json={"prospects": prospects}).json() == {"created": 3}
    codes = sorted(row["cdm_companycode"] for row in api.get("cdm_companies").json()["value"])
    assert codes == ["USMF", "USRT"]
    refused = api.post(f"{ADMIN}/commerce/prospects", json={"prospects": [{"dataAreaId": "gbsi"}]})
    assert refused.status_code == 400  # a refused seed creates no company either
    assert len(api.get("cdm_companies").json()["value"]) == 2

    assert api.post(f"{ADMIN}/reset").status_code == 204
    assert api.get("cdm_companies").json()["value"] == []
    assert state.counts()["writes"] == {"leads": 0, "opportunities": 0, "accounts": 0, "contacts": 0}


# --- msdyn_company on leads ------------------------------------------------------------------------


def test_leads_bind_their_company_and_read_it_as_a_value_property(api: TestClient, companies: None) -> None:
    absolute = create(api, "leads", {"lastname": "A", "msdyn_prospectid": "P-1", **of("usrt")})
    relative = create(api, "leads", {"lastname": "B", "msdyn_prospectid": "P-1", "msdyn_company@odata.bind": f"cdm_companies({USMF})"})
    without = create(api, "leads", {"lastname": "C", "msdyn_prospectid": "P-1"})
    assert api.get(f"leads({absolute})").json()["_msdyn_company_value"] == USRT
    assert api.get(f"leads({relative})").json()["_msdyn_company_value"] == USMF
    assert api.get(f"leads({without})").json()["_msdyn_company_value"] is None
    in_usrt = api.get(f"leads?$filter=_msdyn_company_value eq {USRT}&$select=lastname").json()["value"]
    assert [row["leadid"] for row in in_usrt] == [absolute]


def test_a_bind_to_a_company_that_does_not_exist_is_not_found(api: TestClient, companies: None) -> None:
    missing = api.post("leads", json={"lastname": "A", "msdyn_company@odata.bind": f"/cdm_companies({MISSING_ID})"})
    assert error_of(missing, 404) == {"code": "0x80040217", "message": f"cdm_company With Id = {MISSING_ID} Does Not Exist"}
    at_key = api.patch(f"leads(msdyn_prospectid='P-1',_msdyn_company_value={MISSING_ID})", json={"lastname": "A"})
    assert error_of(at_key, 404) == error_of(missing, 404)
    wrong_set = api.post("leads", json={"msdyn_company@odata.bind": f"/accounts({create(api, 'accounts', {'name': 'X'})})"})
    assert error_of(wrong_set, 400)["code"] == "0x80040203"
    assert api.get("leads").json()["value"] == []


# --- the composite key -----------------------------------------------------------------------------


def test_the_key_is_the_prospect_id_any_case_and_the_company(api: TestClient, companies: None) -> None:
    create(api, "leads", {"msdyn_prospectid": "P-000001", **of("usrt"), "lastname": "usrt"})
    assert error_of(api.post("leads", json={"msdyn_prospectid": "p-000001", **of("usrt")}), 412) == DUPLICATE
    create(api, "leads", {"msdyn_prospectid": "P-000001", **of("usmf"), "lastname": "usmf"})
    create(api, "leads", {"msdyn_prospectid": "P-000001", "lastname": "none"})  # no company is a key too
    create(api, "leads", {"msdyn_prospectid": "usrt:P-000001", "lastname": "older"})
    assert error_of(api.post("leads", json={"msdyn_prospectid": "USRT:P-000001"}), 412) == DUPLICATE
    assert error_of(api.post("leads", json={"msdyn_prospectid": "p-000001"}), 412) == DUPLICATE
    assert lead_keys(api) == {
        ("P-000001", USRT, "usrt"),
        ("P-000001", USMF, "usmf"),
        ("P-000001", None, "none"),
        ("usrt:P-000001", None, "older"),
    }
    create(api, "leads", {"lastname": "no key"})
    create(api, "leads", {"lastname": "no key either", **of("usrt")})  # no msdyn_prospectid: not keyed


def test_writes_that_would_duplicate_a_key_fail_and_change_nothing(api: TestClient, companies: None, state: DataverseState) -> None:
    usrt = create(api, "leads", {"msdyn_prospectid": "P-1", **of("usrt"), "lastname": "usrt"})
    usmf = create(api, "leads", {"msdyn_prospectid": "P-1", **of("usmf"), "lastname": "usmf"})
    writes = state.counts()["writes"]["leads"]
    by_new_id = api.patch("leads(3f2504e0-4f89-11d3-9a0c-0305e82c3301)", json={"msdyn_prospectid": "p-1", **of("usrt")})
    assert error_of(by_new_id, 412) == DUPLICATE
    with_chosen_id = api.post("leads", json={"leadid": "3f2504e0-4f89-11d3-9a0c-0305e82c3301", "msdyn_prospectid": "P-1", **of("usmf")})
    assert error_of(with_chosen_id, 412) == DUPLICATE
    assert error_of(api.patch(f"leads({usmf})", json=of("usrt")), 412) == DUPLICATE  # moving to a taken key
    assert error_of(api.patch(f"leads({usmf})", json={"msdyn_prospectid": "p-1", **of("usrt")}), 412) == DUPLICATE
    create_only = api.patch(by_prospect_id("p-1", "usrt"), json={"lastname": "x"}, headers={"If-None-Match": "*"})
    assert error_of(create_only, 412) == DUPLICATE
    assert state.counts()["writes"]["leads"] == writes
    assert lead_keys(api) == {("P-1", USRT, "usrt"), ("P-1", USMF, "usmf")}
    assert api.patch(f"leads({usmf})", json={"msdyn_company@odata.bind": None}).status_code == 204  # a free key
    assert api.patch(f"leads({usrt})", json={"msdyn_prospectid": "P-1"}).status_code == 204  # its own key
    assert lead_keys(api) == {("P-1", USRT, "usrt"), ("P-1", None, "usmf")}


def test_urls_address_a_lead_by_both_key_parts_in_any_order_or_an_older_lead_by_its_prospect_id(
    api: TestClient, companies: None
) -> None:
    created = upserted_id(api, by_prospect_id("P-000001", "usrt"), {"lastname": "New"})
    lead = api.get(f"leads({created})").json()
    assert (lead["msdyn_prospectid"], lead["_msdyn_company_value"]) == ("P-000001", USRT)  # the key's values
    swapped = f"leads(_msdyn_company_value={USRT.upper()},msdyn_prospectid='p-000001')"
    assert api.get(swapped).json()["leadid"] == created
    assert api.patch(swapped, json={"lastname": "Again"}, headers={"If-Match": "*"}).status_code == 204
    assert api.get(by_prospect_id("P-000001", "usrt")).json()["lastname"] == "Again"
    assert error_of(api.get(by_prospect_id("P-000001", "usmf")), 404)["code"] == "0x80040217"
    assert error_of(api.get(by_prospect_id("P-000001")), 404)["code"] == "0x80040217"  # it has a company

    older = create(api, "leads", {"msdyn_prospectid": "USRT-P-000001", "lastname": "Older"})
    assert api.get(by_prospect_id("usrt-p-000001")).json()["leadid"] == older  # no company: the older form
    assert error_of(api.get(by_prospect_id("USRT-P-000001", "usrt")), 404)["code"] == "0x80040217"
    qualify = {"CreateAccount": False, "CreateContact": False, "CreateOpportunity": False, "Status": 3}
    assert api.post(f"{swapped}/Microsoft.Dynamics.CRM.QualifyLead", json=qualify).status_code == 200
    assert api.delete(by_prospect_id("USRT-P-000001")).status_code == 204
    assert api.delete(swapped).status_code == 204
    assert api.get("leads").json()["value"] == []


@pytest.mark.parametrize(
    "segment",
    [
        f"leads(_msdyn_company_value={USRT})",  # the prospect id is not optional
        f"leads(msdyn_prospectid='P-1',_msdyn_company_value={USRT},msdyn_prospectid='P-1')",
        "leads(msdyn_prospectid='P-1',lastname='A')",
        "leads(msdyn_prospectid='P-1',_msdyn_company_value='usrt')",
        "leads(msdyn_prospectid='P-1',_msdyn_company_value=usrt)",
        "leads(msdyn_prospectid=P-1)",
        f"accounts(msdyn_prospectid='P-1',_msdyn_company_value={USRT})",
    ],
)
def test_malformed_keys_are_bad_requests(api: TestClient, companies: None, segment: str) -> None:
    assert error_of(api.get(segment), 400)["code"] == "0x8006088a"
    assert error_of(api.patch(segment, json={"lastname": "A"}), 400)["code"] == "0x8006088a"
    assert api.get("leads").json()["value"] == []


def test_a_write_by_key_must_not_repeat_a_key_part_in_its_body(api: TestClient, companies: None) -> None:
    for segment in (by_prospect_id("P-1", "usrt"), by_prospect_id("P-1")):
        for body in ({"msdyn_prospectid": "P-1"}, of("usrt"), {"msdyn_company@odata.bind": None}):
            refused = error_of(api.patch(segment, json={**body, "lastname": "A"}), 400)
            assert refused["code"] == "0x80040203" and "do not repeat it in the body" in refused["message"]
    assert api.get("leads").json()["value"] == []


def test_company_keys_with_url_unusable_characters_are_refused_in_urls(api: TestClient, companies: None) -> None:
    refused = error_of(api.get(by_prospect_id("P:1", "usrt")), 400)
    assert refused["code"] == "0x80040203" and "holds the character ':'" in refused["message"]
    assert error_of(api.patch(by_prospect_id("P+1", "usrt"), json={"lastname": "A"}), 400)["code"] == "0x80040203"
    assert api.get("leads").json()["value"] == []


# --- bulk ------------------------------------------------------------------------------------------


def test_bulk_targets_name_leads_by_the_composite_key(api: TestClient, companies: None) -> None:
    older = create(api, "leads", {"msdyn_prospectid": "P-1", "lastname": "Older"})
    response = bulk(
        api,
        UPSERT,
        lead_target(by_prospect_id("P-1", "usrt"), lastname="usrt"),
        lead_target(f"leads(_msdyn_company_value={USMF},msdyn_prospectid='P-1')", lastname="usmf"),
        lead_target(f"https://contoso.crm.example/api/data/v9.2/{by_prospect_id('p-1')}", lastname="Older again"),
    )
    assert response.status_code == 204, response.text
    assert lead_keys(api) == {("P-1", USRT, "usrt"), ("P-1", USMF, "usmf"), ("P-1", None, "Older again")}
    assert api.get(f"leads({older})").json()["lastname"] == "Older again"
    same_record = bulk(api, UPSERT, lead_target(by_prospect_id("P-2", "usrt")), lead_target(by_prospect_id("p-2", "usrt")))
    assert "same lead record" in error_of(same_record, 400)["message"]
    repeated = bulk(api, UPSERT, lead_target(by_prospect_id("P-2", "usrt"), **of("usrt")))
    assert "do not repeat it in the body" in error_of(repeated, 400)["message"]


def test_bulk_writes_that_would_duplicate_a_key_fail_whole(api: TestClient, companies: None, state: DataverseState) -> None:
    usrt = create(api, "leads", {"msdyn_prospectid": "P-1", **of("usrt"), "lastname": "usrt"})
    usmf = create(api, "leads", {"msdyn_prospectid": "P-2", **of("usmf"), "lastname": "usmf"})
    before, writes = lead_keys(api), state.counts()["writes"]["leads"]
    for action, targets in (
        (CREATE, [lead_target(msdyn_prospectid="P-3", lastname="new"), lead_target(msdyn_prospectid="p-1", **of("usrt"))]),
        (CREATE, [lead_target(by_prospect_id("P-3", "usrt")), lead_target(by_prospect_id("p-1", "usrt"))]),
        (UPSERT, [lead_target(by_prospect_id("P-3", "usrt")), lead_target(f"leads({MISSING_ID})", msdyn_prospectid="P-1", **of("usrt"))]),
        (UPDATE, [lead_target(f"leads({usmf})", msdyn_prospectid="p-1", **of("usrt"))]),
        (UPDATE, [lead_target(f"leads({usrt})", lastname="changed"), lead_target(f"leads({usmf})", msdyn_prospectid="P-1", **of("usrt"))]),
    ):
        assert error_of(bulk(api, action, *targets), 412) == DUPLICATE, targets
    assert (lead_keys(api), state.counts()["writes"]["leads"]) == (before, writes)
    distinct = bulk(api, CREATE, lead_target(msdyn_prospectid="P-1", **of("usmf")), lead_target(msdyn_prospectid="P-1"))
    assert distinct.status_code == 200 and len(distinct.json()["Ids"]) == 2
    same_in_bodies = bulk(api, CREATE, lead_target(msdyn_prospectid="P-9", **of("usrt")), lead_target(msdyn_prospectid="p-9", **of("usrt")))
    assert "same lead record" in error_of(same_in_bodies, 400)["message"]


# --- the sellers' decisions ------------------------------------------------------------------------


def test_decisions_find_older_leads_then_company_keyed_ones(api: TestClient, companies: None) -> None:
    older = create(api, "leads", {"msdyn_prospectid": "usrt:P-000001", "lastname": "Older", "companyname": "Older Ltd"})
    newer = create(api, "leads", {"msdyn_prospectid": "P-000001", **of("usrt"), "lastname": "Newer", "companyname": "Newer Ltd"})
    keyed = create(api, "leads", {"msdyn_prospectid": "P-000002", **of("usmf"), "lastname": "Keyed", "companyname": "Keyed Ltd"})
    bare = create(api, "leads", {"msdyn_prospectid": "P-000003", **of("usrt"), "lastname": "Bare", "companyname": "Bare Ltd"})
    response = decide(api, ("usrt:P-000001", "disqualified"), ("USMF:p-000002", "won"))
    assert response.json() == {"applied": 2, "errors": []}
    assert api.get(f"leads({older})").json()["statecode"] == 2  # the literal prospect id first
    assert api.get(f"leads({newer})").json()["statecode"] == 0
    assert opportunity_of(api, keyed)["statecode"] == 1  # else the part before ':' is the company

    items = [
        {"msdyn_prospectid": "p-000003", "company": "USRT", "outcome": "lost"},
        {"msdyn_prospectid": "P-000001", "company": "usrt", "outcome": "disqualified"},
        {"msdyn_prospectid": "P-000003", "company": "usmf", "outcome": "won"},
        {"msdyn_prospectid": "gbsi:P-000001", "outcome": "won"},
    ]
    answer = api.post(f"{ADMIN}/dataverse/decisions", json={"decisions": items}).json()
    not_found = {"code": "0x80040217", "error": "A record with the specified key values does not exist in lead entity"}
    assert answer == {
        "applied": 2,
        "errors": [
            {"index": 2, "msdyn_prospectid": "P-000003", "company": "usmf", **not_found},
            {"index": 3, "msdyn_prospectid": "gbsi:P-000001", **not_found},
        ],
    }
    assert opportunity_of(api, bare)["statecode"] == 2
    assert api.get(f"leads({newer})").json()["statecode"] == 2


@pytest.mark.parametrize("company", ["", 7, None, ["usrt"]])
def test_a_decision_s_company_must_be_a_code(api: TestClient, companies: None, company: object) -> None:
    lead_id = create(api, "leads", {"msdyn_prospectid": "P-1", **of("usrt"), "lastname": "A"})
    item = {"msdyn_prospectid": "P-1", "company": company, "outcome": "disqualified"}
    response = api.post(f"{ADMIN}/dataverse/decisions", json={"decisions": [item]})
    assert response.status_code == 400 and "company" in response.json()["error"]
    assert api.get(f"leads({lead_id})").json()["statecode"] == 0


# --- over HTTPS, through FakeAdmin -----------------------------------------------------------------


def test_fake_admin_seeds_companies_that_the_web_api_serves_over_https(tmp_path: Path, msal_honours_verify: None) -> None:
    client = {"client_id": "onboarding-pipeline", "client_secret": "test-only-secret"}
    with running_fakes(tmp_path, [client]) as fakes, FakeAdmin(fakes) as admin:
        assert admin.seed_companies(["usrt", "USMF"]) == 2
        assert admin.seed_companies(["USRT"]) == 0
        assert admin.seed_prospects([PROSPECT | {"dataAreaId": "gbsi"}]) == 1  # and gbsi's company
        app = msal.ConfidentialClientApplication(
            client["client_id"], client_credential=client["client_secret"], authority=fakes.authority,
            instance_discovery=False, verify=fakes.ca_bundle,
        )  # fmt: skip
        token = app.acquire_token_for_client(scopes=[f"{fakes.dataverse}/.default"])["access_token"]
        root = f"{fakes.dataverse}/api/data/v9.2"
        with httpx.Client(verify=fakes.ca_bundle, headers={"Authorization": f"Bearer {token}"}, timeout=30) as http:
            rows = http.get(f"{root}/cdm_companies?$select=cdm_companycode").json()["value"]
            assert sorted((row["cdm_companycode"], row["cdm_companyid"]) for row in rows) == sorted(
                [("USRT", USRT), ("USMF", USMF), ("GBSI", company_id("gbsi"))]
            )
            lead = {"msdyn_prospectid": "P-000001", "msdyn_company@odata.bind": f"/cdm_companies({USRT})"}
            assert http.post(f"{root}/leads", json=lead).status_code == 204
            by_key = http.get(f"{root}/leads(msdyn_prospectid='P-000001',_msdyn_company_value={USRT})")
            assert by_key.json()["_msdyn_company_value"] == USRT
            colon = http.get(f"{root}/leads(msdyn_prospectid='usrt%3AP-000001')")
            assert colon.status_code == 400 and colon.json()["error"]["code"] == "0x80040203"
            admin.reset()
            assert http.get(f"{root}/cdm_companies").json()["value"] == []
