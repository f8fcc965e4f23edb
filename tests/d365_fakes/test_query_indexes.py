"""`$filter` lookups through value indexes: a filter every match of which must satisfy a string `eq`
(alone, `or`-ed on one field, `and`-ed with more) reads only the rows the index names, and answers
exactly what a scan of the whole table answers, in the same order, after any write, rollback or
reset."""

from __future__ import annotations

import pytest
from starlette.testclient import TestClient
from test_commerce_batch import batch_body, changeset, request
from test_dataverse import API_ROOT, INTEGRATION, ORG_URL, bearer, create, error_of

from d365_fakes.clients import ClientRegistration
from d365_fakes.commerce import PROSPECTS, CommerceState
from d365_fakes.commerce import create_app as create_commerce_app
from d365_fakes.dataverse import LEADS, DataverseState
from d365_fakes.dataverse import create_app as create_dataverse_app
from d365_fakes.odata_query import Dialect, ValueIndex, apply_query
from d365_fakes.tokens import TokenIssuer

COMMERCE = "https://commerce.test"
SYNC = ClientRegistration("b2b-sync", "sync-secret", default_company="usrt")

HQ_FILTERS = [
    "ProspectId eq 'P-3'",
    "ProspectId eq 'p-3'",  # strings compare case-insensitively
    "(ProspectId eq 'P-9' or ProspectId eq 'P-2' or ProspectId eq 'P-4' or ProspectId eq 'P-404')",
    "dataAreaId eq 'usmf' and (CompanyName eq 'Contoso' or CompanyName eq 'FABRIKAM')",
    "CompanyName eq 'Fabrikam' and ProspectId ne 'P-5'",
    "CompanyName eq 'Contoso' or ProspectId eq 'P-5'",
    "CompanyName eq 'Contoso' or ProspectId ge 'P-5'",  # one side has no lookup: a scan
    "not (CompanyName eq 'Contoso')",
    "CompanyName eq '*abri*'",  # HQ's wildcard: a scan
    "CompanyName eq 'Contoso' and B2BProspectStatus eq "
    "Microsoft.Dynamics.DataEntities.RetailB2BProspectStatus'Pending'",
    "CompanyName eq null or CompanyName eq 'Fabrikam'",
    # Ranges of the key (dataAreaId, ProspectId), found by bisecting the sorted keys
    "dataAreaId eq 'usrt' and ProspectId ge 'p-2' and ProspectId le 'P-6'",
    "dataAreaId eq 'USMF' and ProspectId gt 'P-3' and ProspectId lt 'P-9' and CompanyName ne 'Contoso'",
    "dataAreaId ge 'usmf' and ProspectId le 'P-3'",
    "(dataAreaId eq 'usrt' and ProspectId ge 'P-6') or (dataAreaId eq 'usrt' and ProspectId le 'P-2')",
    "dataAreaId eq 'usrt' and ProspectId ge 'P-8' and ProspectId le 'P-3'",
    "ProspectId eq 'P-3' or ProspectId ge 'P-8'",
]


@pytest.fixture(scope="module")
def token_issuer() -> TokenIssuer:
    return TokenIssuer("https://login.test", "11111111-2222-3333-4444-555555555555")


@pytest.fixture
def hq_state() -> CommerceState:
    hq_state = CommerceState()
    hq_state.seed_prospects([prospect(n) for n in range(1, 11)])
    return hq_state


@pytest.fixture
def hq(hq_state: CommerceState, token_issuer: TokenIssuer) -> TestClient:
    app = create_commerce_app(hq_state, token_issuer, COMMERCE, {SYNC.client_id: SYNC})
    client = TestClient(app, base_url=COMMERCE)
    client.headers["Authorization"] = "Bearer " + token_issuer.issue(SYNC, COMMERCE)["access_token"]
    return client


@pytest.fixture
def dv_state() -> DataverseState:
    return DataverseState()


@pytest.fixture
def dv(dv_state: DataverseState, token_issuer: TokenIssuer) -> TestClient:
    app = create_dataverse_app(dv_state, token_issuer, ORG_URL, {INTEGRATION.client_id: INTEGRATION})
    client = TestClient(app, base_url=f"{ORG_URL}{API_ROOT}/")
    client.headers["Authorization"] = bearer(token_issuer, INTEGRATION)
    return client


def prospect(number: int) -> dict:
    return {"dataAreaId": ("usrt", "usmf")[number % 2], "ProspectId": f"P-{number}", "ProspectName": "Ann Lee",
            "CompanyName": ("Contoso", "Fabrikam", "fabrikam")[number % 3], "PrimaryEmailAddress": "ann@contoso.test"}


def hq_read(hq: TestClient, text: str, cross_company: bool = True) -> list[dict]:
    params = {"$filter": text, "$select": "dataAreaId,ProspectId,CompanyName"}
    if cross_company:
        params["cross-company"] = "true"
    response = hq.get("/data/Prospects", params=params)
    assert response.status_code == 200, response.text
    return response.json()["value"]


def hq_scan(hq_state: CommerceState, text: str, cross_company: bool = True) -> list[dict]:
    """What a scan of every visible row answers."""
    tenant = hq_state.tenant_entity(PROSPECTS)
    rows = hq_state.visible_rows(PROSPECTS, "usrt", cross_company)
    params = {"$filter": text, "$select": "dataAreaId,ProspectId,CompanyName"}
    return apply_query(rows, params, Dialect.FINANCE_OPERATIONS, tenant.types, tenant.enum_map).rows


def assert_hq_reads_as_a_scan(hq: TestClient, hq_state: CommerceState) -> None:
    for text in HQ_FILTERS:
        for cross_company in (True, False):
            assert hq_read(hq, text, cross_company) == hq_scan(hq_state, text, cross_company), text


def test_an_or_of_eq_reads_the_indexed_rows_in_key_order(hq: TestClient, hq_state: CommerceState) -> None:
    text = "ProspectId eq 'p-9' or ProspectId eq 'P-10' or ProspectId eq 'P-2' or ProspectId eq 'P-404'"
    # In key order, (dataAreaId, ProspectId), whatever the filter's order
    assert [row["ProspectId"] for row in hq_read(hq, text)] == ["P-9", "P-10", "P-2"]
    assert [row["ProspectId"] for row in hq_read(hq, text, cross_company=False)] == ["P-10", "P-2"]  # usrt only
    assert hq_state.filter_candidates(PROSPECTS, "usrt", True, text) is not None  # served by the index
    assert hq_state.filter_candidates(PROSPECTS, "usrt", True, "CompanyName eq '*abri*'") is None
    ranged = "dataAreaId eq 'usrt' and ProspectId ge 'P-2' and ProspectId lt 'P-6'"
    candidates = hq_state.filter_candidates(PROSPECTS, "usrt", True, ranged)
    assert [row["ProspectId"] for row in candidates] == ["P-2", "P-4", "P-6"]  # the filter then drops P-6
    assert [row["ProspectId"] for row in hq_read(hq, ranged)] == ["P-2", "P-4"]
    assert_hq_reads_as_a_scan(hq, hq_state)


def test_hq_reads_follow_updates_deletes_rollbacks_and_resets(hq: TestClient, hq_state: CommerceState) -> None:
    assert_hq_reads_as_a_scan(hq, hq_state)  # builds the indexes
    url = "/data/Prospects(dataAreaId='usmf',ProspectId='P-3')?cross-company=true"
    assert hq.patch(url, json={"CompanyName": "Northwind"}).status_code == 204
    assert hq.delete("/data/Prospects(dataAreaId='usrt',ProspectId='P-4')?cross-company=true").status_code == 204
    assert hq.post("/data/Prospects", json=prospect(11) | {"CompanyName": "FABRIKAM"}).status_code == 201
    assert [row["ProspectId"] for row in hq_read(hq, "CompanyName eq 'northwind'")] == ["P-3"]
    assert [row["ProspectId"] for row in hq_read(hq, "ProspectId eq 'P-4' or ProspectId eq 'P-11'")] == ["P-11"]
    assert_hq_reads_as_a_scan(hq, hq_state)

    # A changeset that renames a prospect, then fails, is undone, index entries too.
    renamed = request("PATCH", "Prospects(dataAreaId='usrt',ProspectId='P-2')?cross-company=true",
                      {"CompanyName": "Renamed"})
    failing = request("PATCH", "Prospects(dataAreaId='usrt',ProspectId='P-404')?cross-company=true", {"Note": "x"})
    response = hq.post("/data/$batch", content=batch_body(changeset(renamed, failing)),
                       headers={"Content-Type": "multipart/mixed; boundary=batch_8a2c"})
    assert response.status_code == 200 and b"HTTP/1.1 404" in response.content
    assert hq_read(hq, "CompanyName eq 'Renamed'") == []
    assert_hq_reads_as_a_scan(hq, hq_state)

    hq_state.reset()
    assert hq_read(hq, "ProspectId eq 'P-3'") == []
    hq_state.seed_prospects([prospect(3) | {"CompanyName": "After"}])
    assert [row["CompanyName"] for row in hq_read(hq, "ProspectId eq 'P-3'")] == ["After"]
    assert_hq_reads_as_a_scan(hq, hq_state)


def test_hq_paging_count_and_order_by_are_those_of_a_scan(hq: TestClient, hq_state: CommerceState) -> None:
    text = "CompanyName eq 'Fabrikam' or CompanyName eq 'Contoso'"
    params = {"cross-company": "true", "$filter": text, "$count": "true", "$orderby": "CompanyName desc",
              "$select": "ProspectId,CompanyName"}
    first = hq.get("/data/Prospects", params=params, headers={"Prefer": "odata.maxpagesize=4"}).json()
    second = hq.get(first["@odata.nextLink"], headers={"Prefer": "odata.maxpagesize=4"}).json()
    tenant = hq_state.tenant_entity(PROSPECTS)
    options = {name: value for name, value in params.items() if name.startswith("$")}
    rows = hq_state.visible_rows(PROSPECTS, "usrt", True)
    scanned = apply_query(rows, options, Dialect.FINANCE_OPERATIONS, tenant.types, tenant.enum_map)
    assert first["@odata.count"] == scanned.count == 10
    assert first["value"] + second["value"] == scanned.rows[:8]


def lead_ids(dv: TestClient, text: str) -> list[str]:
    response = dv.get("leads", params={"$filter": text, "$select": "lastname"})
    assert response.status_code == 200, response.text
    return [row["leadid"] for row in response.json()["value"]]


def lead_scan(dv_state: DataverseState, text: str) -> list[str]:
    rows = dv_state._ordered(LEADS)
    scanned = apply_query(rows, {"$filter": text}, Dialect.DATAVERSE, dv_state.read_columns(LEADS))
    return [row["leadid"] for row in scanned.rows]


DATAVERSE_FILTERS = [
    "lastname eq 'Lee'",
    "lastname eq 'LEE' or lastname eq 'Ng' or lastname eq 'Nobody'",
    "lastname eq 'Lee' and firstname eq 'Ann'",
    "lastname eq 'Lee' and contains(firstname, 'o')",
    "(lastname eq 'Lee' or lastname eq 'Ng') and not (firstname eq 'Bo')",
]


def test_dataverse_reads_follow_writes_rollbacks_and_resets(dv: TestClient, dv_state: DataverseState) -> None:
    names = [("Ann", "Lee"), ("Bo", "Ng"), ("Cy", "lee"), ("Di", "Ode"), ("Bo", "Lee")]
    ids = [create(dv, "leads", {"firstname": first, "lastname": last}) for first, last in names]

    def assert_as_a_scan() -> None:
        for text in DATAVERSE_FILTERS + [" or ".join(f"leadid eq {row_id}" for row_id in reversed(ids))]:
            assert lead_ids(dv, text) == lead_scan(dv_state, text), text

    assert sorted(lead_ids(dv, "lastname eq 'lee'")) == sorted([ids[0], ids[2], ids[4]])
    assert_as_a_scan()
    assert dv.patch(f"leads({ids[3]})", json={"lastname": "Lee"}).status_code == 204
    assert dv.delete(f"leads({ids[0]})").status_code == 204
    assert sorted(lead_ids(dv, "lastname eq 'Lee'")) == sorted([ids[2], ids[3], ids[4]])
    assert_as_a_scan()

    # UpsertMultiple is all or nothing: the second target is refused, so the first one's new name is undone.
    targets = [{"@odata.type": "Microsoft.Dynamics.CRM.lead", "leadid": ids[1], "lastname": "Renamed"},
               {"@odata.type": "Microsoft.Dynamics.CRM.lead", "leadid": ids[2], "statecode": 7}]
    assert dv.post("leads/Microsoft.Dynamics.CRM.UpsertMultiple", json={"Targets": targets}).status_code == 400
    assert lead_ids(dv, "lastname eq 'Renamed'") == []
    assert lead_ids(dv, "lastname eq 'Ng'") == [ids[1]]
    assert_as_a_scan()

    dv_state.reset()
    assert lead_ids(dv, "lastname eq 'Lee'") == []
    again = create(dv, "leads", {"lastname": "Lee"})
    assert lead_ids(dv, "lastname eq 'Lee'") == [again]


def test_a_filter_that_raises_on_a_row_still_raises(dv: TestClient) -> None:
    """`statecode` holds numbers: comparing it with a string is a 400 on the first row the scan
    reaches it on, so a lookup on the other side of the `and` must not skip that row."""
    create(dv, "leads", {"lastname": "Lee"})
    response = dv.get("leads", params={"$filter": "lastname eq 'Lee' and statecode eq 'x'"})
    assert error_of(response, 400)
    assert dv.get("leads", params={"$filter": "lastname eq 'Nobody' and statecode eq 'x'"}).json()["value"] == []


def test_a_value_index_tracks_shared_values_and_values_of_other_types() -> None:
    index = ValueIndex()
    for key, value in enumerate(["A", "a", "B", None, 7]):
        index.add(value, key)
    assert (sorted(index.keys("a")), index.count("a"), list(index.keys("b")), index.non_strings) == ([0, 1], 2, [2], 1)
    index.remove("A", 0)
    index.remove(7, 4)
    assert (list(index.keys("a")), index.count("a"), index.non_strings, list(index.keys("c"))) == ([1], 1, 0, [])
    index.remove("a", 1)
    assert index.count("a") == 0


def test_a_guid_eq_compares_case_insensitively(dv: TestClient) -> None:
    created = create(dv, "leads", {"lastname": "Lee"})
    assert lead_ids(dv, f"leadid eq {created.upper()}") == [created]
