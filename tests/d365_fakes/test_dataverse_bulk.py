"""The bulk actions CreateMultiple, UpdateMultiple and UpsertMultiple: every target is written as the
single-row request writes it, all or nothing, and the request counts once."""

import httpx
from starlette.testclient import TestClient
from test_dataverse import (  # noqa: F401 (api, issuer and state are fixtures)
    API_ROOT,
    HOSTILE_KEYS,
    INTEGRATION,
    MISSING_ID,
    ORG_URL,
    UNUSABLE_IN_URL_KEYS,
    api,
    by_prospect_id,
    create,
    error_of,
    issuer,
    state,
    upserted_id,
)

from d365_fakes.dataverse import LEADS, DataverseState, company_id

CREATE = "leads/Microsoft.Dynamics.CRM.CreateMultiple"
UPDATE = "leads/Microsoft.Dynamics.CRM.UpdateMultiple"
UPSERT = "leads/Microsoft.Dynamics.CRM.UpsertMultiple"


def lead(prospect_id: str | None = None, **columns: object) -> dict:
    """A bulk target; `prospect_id` names the row by its alternate key in `@odata.id`."""
    target: dict = {"@odata.type": "Microsoft.Dynamics.CRM.lead", **columns}
    if prospect_id is not None:
        target["@odata.id"] = by_prospect_id(prospect_id)
    return target


def bulk(api: TestClient, action: str, *targets: dict) -> httpx.Response:
    return api.post(action, json={"Targets": list(targets)})


def leads_by_key(api: TestClient) -> dict[str, dict]:
    return {row["msdyn_prospectid"]: row for row in api.get("leads").json()["value"]}


def test_upsert_multiple_creates_and_updates_in_one_request_that_counts_once(
    api: TestClient, state: DataverseState
) -> None:
    existing = create(api, "leads", {"msdyn_prospectid": "P-2", "lastname": "Before"})
    before = state.counts()
    response = bulk(
        api,
        UPSERT,
        lead("P-1", lastname="New"),
        lead("p-2", lastname="Updated"),  # key values compare case-insensitively
        {**lead(lastname="By id"), "@odata.id": f"leads({MISSING_ID})"},
    )
    assert response.status_code == 204 and response.content == b""  # as the Web API: no body
    after = state.counts()
    assert after["requests"] == before["requests"] + 1
    assert after["writes"]["leads"] == before["writes"]["leads"] + 3
    rows = leads_by_key(api)
    assert rows["P-1"]["lastname"] == "New"
    assert (rows["P-2"]["leadid"], rows["P-2"]["lastname"]) == (existing, "Updated")
    assert api.get(f"leads({MISSING_ID})").json()["lastname"] == "By id"


def test_create_multiple_answers_the_new_ids_in_target_order(api: TestClient) -> None:
    chosen = "3f2504e0-4f89-11d3-9a0c-0305e82c3301"
    response = bulk(
        api,
        CREATE,
        lead(lastname="First", msdyn_prospectid="P-1"),
        lead(lastname="Second", leadid=chosen.upper()),  # a client-chosen id, as in a POST
        lead(lastname="Third"),
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["@odata.context"] == (
        f"{ORG_URL}{API_ROOT}/$metadata#Microsoft.Dynamics.CRM.CreateMultipleResponse"
    )
    assert body["Ids"][1] == chosen
    names = [api.get(f"leads({lead_id})").json()["lastname"] for lead_id in body["Ids"]]
    assert names == ["First", "Second", "Third"]


def test_create_multiple_refuses_a_row_that_exists_and_writes_nothing(
    api: TestClient, state: DataverseState
) -> None:
    existing = create(api, "leads", {"msdyn_prospectid": "P-1", "lastname": "Kept"})
    writes = state.counts()["writes"]["leads"]
    by_id = bulk(api, CREATE, lead(lastname="New"), lead(leadid=existing, lastname="Clash"))
    assert error_of(by_id, 412) == {
        "code": "0x80040237",
        "message": "A record with matching key values already exists.",
    }
    by_key = bulk(api, CREATE, lead(lastname="New"), lead(msdyn_prospectid="p-1"))
    assert error_of(by_key, 412) == error_of(api.post("leads", json={"msdyn_prospectid": "p-1"}), 412)
    assert [row["lastname"] for row in api.get("leads").json()["value"]] == ["Kept"]
    assert state.counts()["writes"]["leads"] == writes


def test_update_multiple_updates_rows_named_by_key_or_id(api: TestClient) -> None:
    first = create(api, "leads", {"msdyn_prospectid": "P-1", "lastname": "A"})
    second = create(api, "leads", {"lastname": "B"})
    response = bulk(api, UPDATE, lead("P-1", lastname="A2"), lead(leadid=second, lastname="B2"))
    assert response.status_code == 204 and response.content == b""
    assert api.get(f"leads({first})").json()["lastname"] == "A2"
    assert api.get(f"leads({second})").json()["lastname"] == "B2"


def test_update_multiple_fails_whole_on_a_missing_row_as_a_patch_with_if_match_does(
    api: TestClient,
) -> None:
    first = create(api, "leads", {"msdyn_prospectid": "P-1", "lastname": "A"})
    response = bulk(api, UPDATE, lead("P-1", lastname="Changed"), lead("P-404", lastname="X"))
    single = api.patch(by_prospect_id("P-404"), json={"lastname": "X"}, headers={"If-Match": "*"})
    assert error_of(response, 404) == error_of(single, 404)
    assert error_of(response, 404)["code"] == "0x80040217"
    by_missing_id = bulk(api, UPDATE, lead(leadid=MISSING_ID, lastname="X"))
    assert error_of(by_missing_id, 404)["message"] == f"lead With Id = {MISSING_ID} Does Not Exist"
    assert api.get(f"leads({first})").json()["lastname"] == "A"
    unnamed = error_of(bulk(api, UPDATE, lead(lastname="X")), 400)
    assert unnamed["code"] == "0x80040203" and "must name its record" in unnamed["message"]
    assert "must name its record" in error_of(bulk(api, UPSERT, lead(lastname="X")), 400)["message"]


def test_a_failing_target_fails_the_request_with_its_own_error_and_nothing_changes(
    api: TestClient, state: DataverseState
) -> None:
    create(api, "leads", {"msdyn_prospectid": "P-2", "lastname": "Before"})
    snapshot = leads_by_key(api)
    counts = state.counts()["writes"]
    response = bulk(
        api,
        UPSERT,
        lead("P-1", lastname="New"),
        lead("P-2", lastname="Updated"),
        lead("P-3", leadsourcecode="Web"),  # the first failure: a wrong type
        lead("P-4", **{"parentaccountid@odata.bind": f"/accounts({MISSING_ID})"}),  # another
    )
    single = api.patch(by_prospect_id("P-3"), json={"leadsourcecode": "Web"})
    assert error_of(response, 400) == error_of(single, 400)
    assert leads_by_key(api) == snapshot
    assert state.counts()["writes"] == counts


def test_a_record_level_rejection_rolls_back_the_whole_request(
    api: TestClient, state: DataverseState
) -> None:
    create(api, "leads", {"msdyn_prospectid": "P-2", "lastname": "Before"})
    snapshot = leads_by_key(api)
    state.add_rejection("leads", "msdyn_prospectid", "P-3", "P-3 is on hold")
    response = bulk(api, UPSERT, lead("P-1", lastname="A"), lead("P-2", lastname="B"), lead("P-3"))
    assert error_of(response, 400) == {
        "code": "0x80040265",
        "message": "ISV code aborted the operation: P-3 is on hold",
    }
    assert leads_by_key(api) == snapshot  # P-1 not created, P-2 not updated, versions as they were
    assert upserted_id(api, by_prospect_id("P-1"), {"lastname": "A"})  # the key is free


def test_two_targets_for_the_same_row_are_refused(api: TestClient) -> None:
    existing = create(api, "leads", {"msdyn_prospectid": "P-1", "lastname": "A"})
    for targets in (
        [lead("P-9"), lead("p-9")],
        [lead("P-1"), lead(leadid=existing)],
        [lead(leadid=MISSING_ID), lead(leadid=MISSING_ID.upper())],
    ):
        refused = error_of(bulk(api, UPSERT, *targets), 400)
        assert refused["code"] == "0x80040203" and "same lead record" in refused["message"]
    duplicate_creates = bulk(api, CREATE, lead(msdyn_prospectid="P-8"), lead(msdyn_prospectid="P-8"))
    assert "same lead record" in error_of(duplicate_creates, 400)["message"]
    assert len(api.get("leads").json()["value"]) == 1


def test_every_target_must_be_typed_as_a_record_of_the_set(api: TestClient) -> None:
    for wrong in ({"@odata.type": "Microsoft.Dynamics.CRM.account"}, {}, {"@odata.type": "lead"}):
        response = bulk(api, UPSERT, lead("P-1"), {**wrong, "@odata.id": by_prospect_id("P-2")})
        refused = error_of(response, 400)
        assert refused["code"] == "0x80040203"
        assert "Targets[1]" in refused["message"] and "Microsoft.Dynamics.CRM.lead" in refused["message"]
    hash_typed = {"@odata.type": "#Microsoft.Dynamics.CRM.lead", "@odata.id": by_prospect_id("P-3")}
    assert bulk(api, UPSERT, hash_typed).status_code == 204
    assert list(leads_by_key(api)) == ["P-3"]


def test_targets_must_be_a_non_empty_list_of_objects(api: TestClient) -> None:
    for body in ({}, {"Targets": []}, {"Targets": None}, {"Targets": {"lastname": "A"}}):
        assert error_of(api.post(UPSERT, json=body), 400)["code"] == "0x80040203", body
    assert error_of(bulk(api, CREATE, "not a record"), 400)["code"] == "0x80040203"
    assert error_of(api.post(CREATE, content=b"[1, 2]"), 400)["code"] == "0x80040203"


def test_odata_id_forms_and_hostile_key_values(api: TestClient) -> None:
    absolute = {**lead(lastname="Absolute"), "@odata.id": f"{ORG_URL}{API_ROOT}/{by_prospect_id('P-1')}"}
    hostile = [lead(value, subject=value) for value in HOSTILE_KEYS]  # lastname holds 50 characters
    assert bulk(api, UPSERT, absolute, *hostile).status_code == 204
    rows = leads_by_key(api)
    assert rows["P-1"]["lastname"] == "Absolute"
    for value in HOSTILE_KEYS:
        assert rows[value]["subject"] == value
        assert api.get(by_prospect_id(value)).json()["leadid"] == rows[value]["leadid"]
    for value, character in UNUSABLE_IN_URL_KEYS.items():  # as in the request URL
        refused = error_of(bulk(api, UPSERT, lead("P-1", lastname="Fine"), lead(value)), 400)
        assert refused["code"] == "0x80040203"
        assert refused["message"].startswith(f"Targets[1]: The key value '{value}' of 'msdyn_prospectid' holds the character '{character}'")
    assert leads_by_key(api)["P-1"]["lastname"] == "Absolute"  # nothing was written
    for reference in (
        "accounts(00000000-0000-0000-0000-0000000000aa)",
        "leads",
        "leads(not-a-guid)",
        "leads(lastname='A')",
        "leads(msdyn_prospectid='P-1')/Microsoft.Dynamics.CRM.QualifyLead",
        42,
    ):
        target = {**lead(), "@odata.id": reference}
        assert error_of(bulk(api, UPSERT, target), 400)["code"] == "0x80040203", reference
    named_twice = {**lead("P-1"), "leadid": rows["P-1"]["leadid"]}
    assert "names its record twice" in error_of(bulk(api, UPSERT, named_twice), 400)["message"]
    key_repeated = lead("P-1", msdyn_prospectid="P-1")  # refused as in a single PATCH
    assert error_of(bulk(api, UPSERT, key_repeated), 400) == error_of(
        api.patch(by_prospect_id("P-1"), json={"msdyn_prospectid": "P-1"}), 400
    )


def test_binds_work_as_in_single_writes(api: TestClient) -> None:
    account_id = create(api, "accounts", {"name": "Contoso"})
    bind = {"parentaccountid@odata.bind": f"/accounts({account_id})"}
    assert bulk(api, UPSERT, lead("P-1", **bind)).status_code == 204
    assert leads_by_key(api)["P-1"]["_parentaccountid_value"] == account_id
    missing_bind = {"parentaccountid@odata.bind": f"/accounts({MISSING_ID})"}
    missing = bulk(api, UPSERT, lead("P-2"), lead("P-3", **missing_bind))
    assert error_of(missing, 404)["message"] == f"account With Id = {MISSING_ID} Does Not Exist"
    assert list(leads_by_key(api)) == ["P-1"]


def test_bulk_actions_are_bound_to_writable_collections(api: TestClient) -> None:
    accounts = api.post(
        "accounts/Microsoft.Dynamics.CRM.CreateMultiple",
        json={"Targets": [{"@odata.type": "Microsoft.Dynamics.CRM.account", "name": "A"}]},
    )
    assert accounts.status_code == 200 and len(accounts.json()["Ids"]) == 1
    read_only = api.post(
        "opportunitycloses/Microsoft.Dynamics.CRM.CreateMultiple",
        json={"Targets": [{"@odata.type": "Microsoft.Dynamics.CRM.opportunityclose"}]},
    )
    assert error_of(read_only, 405)["code"] == "0x80040203"
    row_bound = f"leads({MISSING_ID})/Microsoft.Dynamics.CRM.UpsertMultiple"
    bound_to_a_row = api.post(row_bound, json={"Targets": [lead()]})
    assert error_of(bound_to_a_row, 404)["code"] == "0x8006088a"  # "Resource not found for the segment"


def test_upsert_multiple_into_a_large_table_uses_the_key_index(
    api: TestClient, state: DataverseState
) -> None:
    """50,000 leads, then 1,000 targets (half of them new): each target costs a lookup, not a scan
    (in process this takes about 20 ms; a scan per target would take many seconds)."""

    def prospect_id(number: int) -> str:
        return f"P-{number:06d}"

    state.seed_companies(["usrt"])
    usrt = {"msdyn_company@odata.bind": f"cdm_companies({company_id('usrt')})"}
    for first in range(0, 50_000, 5_000):
        seed = [lead(msdyn_prospectid=prospect_id(n), **usrt, lastname="Seeded") for n in range(first, first + 5_000)]
        state.write_multiple(LEADS, "create", seed, INTEGRATION.app_user_id)
    targets = [
        {**lead(lastname=f"L{n}"), "@odata.id": by_prospect_id(prospect_id(n), "usrt")} for n in range(49_500, 50_500)
    ]
    assert api.post(UPSERT, json={"Targets": targets}).status_code == 204
    assert api.get(by_prospect_id(prospect_id(49_999), "usrt")).json()["lastname"] == "L49999"
    assert api.get(by_prospect_id(prospect_id(50_499), "usrt")).json()["lastname"] == "L50499"
    assert api.get(by_prospect_id(prospect_id(7), "usrt")).json()["lastname"] == "Seeded"
    count = api.get("leads?$count=true&$select=leadid", headers={"Prefer": "odata.maxpagesize=1"})
    assert count.json()["@odata.count"] == 50_500
