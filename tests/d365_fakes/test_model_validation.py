"""Writes are validated against the table model, with each service's own answers: string lengths,
choice and enum values, required columns, in single writes, bulk writes (all or nothing) and HQ
`$batch` changesets. The limits are read from the metadata the fakes serve, so behaviour and
metadata are checked against each other."""

import pytest
from starlette.testclient import TestClient
from test_dataverse import by_prospect_id, error_of
from test_metadata import LEAD, api, hq, issuer, ok, states  # noqa: F401 (fixtures)

LENGTH_CODE, RANGE_CODE = "0x80044331", "0x8004431a"
UPSERT, CREATE = "leads/Microsoft.Dynamics.CRM.UpsertMultiple", "leads/Microsoft.Dynamics.CRM.CreateMultiple"


def lead_lengths(api: TestClient) -> dict[str, int]:
    """The writable string columns of lead and their MaxLength, as EntityDefinitions says."""
    url = (f"{LEAD}/Attributes/Microsoft.Dynamics.CRM.StringAttributeMetadata"
           "?$select=LogicalName,MaxLength,IsValidForCreate")
    return {row["LogicalName"]: row["MaxLength"] for row in ok(api.get(url))["value"] if row["IsValidForCreate"]}


def lead_options(api: TestClient) -> dict[str, set[int]]:
    url = f"{LEAD}/Attributes/Microsoft.Dynamics.CRM.PicklistAttributeMetadata?$select=LogicalName&$expand=OptionSet($select=Options)"
    return {row["LogicalName"]: {option["Value"] for option in row["OptionSet"]["Options"]} for row in ok(api.get(url))["value"]}


# --- Dataverse -------------------------------------------------------------------------------------


def test_every_string_column_holds_exactly_its_max_length(api: TestClient) -> None:
    lengths = lead_lengths(api)
    assert len(lengths) == 12 and lengths["lastname"] == 50
    fitting = {column: "x" * length for column, length in lengths.items()}
    assert api.post("leads", json=fitting).status_code == 204
    for column, length in lengths.items():
        refused = error_of(api.post("leads", json={column: "y" * (length + 1)}), 400)
        assert refused == {
            "code": LENGTH_CODE,
            "message": f"A validation error occurred. The length of the '{column}' attribute of the 'lead' "
                       f"entity exceeded the maximum allowed length of '{length}'.",
        }
    assert len(ok(api.get("leads"))["value"]) == 1


def test_an_update_and_an_upsert_key_are_held_to_the_same_lengths(api: TestClient) -> None:
    lengths = lead_lengths(api)
    assert api.patch(by_prospect_id("P-1"), json={"lastname": "A"}).status_code == 204
    too_long = {"companyname": "c" * (lengths["companyname"] + 1)}
    assert error_of(api.patch(by_prospect_id("P-1"), json=too_long), 400)["code"] == LENGTH_CODE
    long_key = "P" * (lengths["msdyn_prospectid"] + 1)
    assert error_of(api.patch(by_prospect_id(long_key), json={"lastname": "A"}), 400)["code"] == LENGTH_CODE
    assert [row["companyname"] for row in ok(api.get("leads"))["value"]] == [None]


def test_choice_values_must_be_options_of_the_column(api: TestClient) -> None:
    options = lead_options(api)
    for column, values in options.items():
        for value in values:
            assert api.post("leads", json={column: value}).status_code == 204, (column, value)
        outside = max(values) + 1
        refused = error_of(api.post("leads", json={column: outside}), 400)
        accepted = ",".join(str(value) for value in sorted(values))
        assert refused == {
            "code": RANGE_CODE,
            "message": f"A validation error occurred. The value {outside} of '{column}' on record of type 'lead' "
                       f"is outside the valid range. Accepted Values: {accepted}",
        }


def test_a_system_required_column_cannot_be_emptied(api: TestClient) -> None:
    assert error_of(api.post("leads", json={"ownerid@odata.bind": None}), 400) == {
        "code": "0x80040203", "message": "Attribute: ownerid cannot be set to NULL"}
    lead = api.post("leads", json={"lastname": "A"}).headers["OData-EntityId"].rsplit("(", 1)[1].rstrip(")")
    assert error_of(api.patch(f"leads({lead})", json={"statecode": None}), 400)["message"] == (
        "Attribute: statecode cannot be set to NULL")
    # Business-required (ApplicationRequired) columns are enforced by forms, not by the Web API.
    assert api.post("leads", json={}).status_code == 204


def targets(action: str, *rows: tuple[str, dict]) -> dict:
    """A bulk body: UpsertMultiple names each lead by its key, CreateMultiple gives it in the body."""
    typed = {"@odata.type": "Microsoft.Dynamics.CRM.lead"}
    if action == UPSERT:
        return {"Targets": [{**typed, "@odata.id": by_prospect_id(key), **columns} for key, columns in rows]}
    return {"Targets": [{**typed, "msdyn_prospectid": key, **columns} for key, columns in rows]}


@pytest.mark.parametrize("action", [UPSERT, CREATE])
def test_one_invalid_target_fails_the_whole_bulk_request(api: TestClient, action: str) -> None:
    good = [(f"P-{number}", {"lastname": "Fine"}) for number in range(3)]
    too_long = ("P-9", {"lastname": "x" * 51})
    assert error_of(api.post(action, json=targets(action, *good, too_long)), 400)["code"] == LENGTH_CODE
    out_of_range = ("P-8", {"leadsourcecode": 42})
    assert error_of(api.post(action, json=targets(action, *good, out_of_range)), 400)["code"] == RANGE_CODE
    assert ok(api.get("leads"))["value"] == []  # nothing of either request was written
    assert api.post(action, json=targets(action, *good)).status_code in (200, 204)
    assert len(ok(api.get("leads"))["value"]) == 3


@pytest.mark.parametrize("action", [UPSERT, CREATE])
def test_a_tenants_own_lengths_and_options_are_what_its_writes_are_held_to(api: TestClient, action: str) -> None:
    tenant_values = {"Pending": 100000000, "Approved": 100000001, "Rejected": 100000002, "Unknown": 100000003}
    changed = api.post(str(api.base_url.copy_with(path="/_admin/model")), json={
        "system": "dataverse", "table": "lead", "max_lengths": {"lastname": 30}})
    assert changed.status_code == 204
    changed = api.post(str(api.base_url.copy_with(path="/_admin/model")), json={
        "system": "dataverse", "table": "lead", "options": {"msdyn_b2bprospectstatus": tenant_values}})
    assert changed.status_code == 204
    assert lead_lengths(api)["lastname"] == 30 and lead_options(api)["msdyn_b2bprospectstatus"] == set(tenant_values.values())

    fits = ("P-1", {"lastname": "x" * 30, "msdyn_b2bprospectstatus": 100000000})
    too_long = ("P-2", {"lastname": "x" * 31})
    standard_value = ("P-3", {"msdyn_b2bprospectstatus": 0})
    assert error_of(api.post(action, json=targets(action, fits, too_long)), 400)["message"].endswith("length of '30'.")
    assert error_of(api.post(action, json=targets(action, fits, standard_value)), 400)["code"] == RANGE_CODE
    assert ok(api.get("leads"))["value"] == []
    assert api.post(action, json=targets(action, fits)).status_code in (200, 204)
    assert [row["msdyn_b2bprospectstatus"] for row in ok(api.get("leads"))["value"]] == [100000000]


# --- HQ --------------------------------------------------------------------------------------------


def inner(response, status: int = 400) -> str:
    assert response.status_code == status, response.text
    return response.json()["error"]["innererror"]["message"]


def test_hq_refuses_a_too_long_string_on_create_and_update(hq: TestClient) -> None:
    too_long = inner(hq.post("/data/Prospects", json={"ProspectName": "n" * 101}))
    assert too_long == ("Write failed for table row of type 'Prospect'. Infolog: Error: The value of field 'ProspectName' "
                        "is 101 characters long; the field holds at most 100 characters.")
    created = hq.post("/data/Prospects", json={"ProspectName": "n" * 100})
    assert created.status_code == 201
    location = created.headers["Location"]
    assert "CompanyName" in inner(hq.patch(location, json={"CompanyName": "c" * 101}))
    assert hq.patch(location, json={"CompanyName": "c" * 100}).status_code == 204
    assert "'CustomerAccount' is 21 characters" in inner(hq.post("/data/CustomersV3", json={
        "CustomerAccount": "A" * 21, "PartyType": "Organization", "OrganizationName": "Contoso"}))


def test_hq_refuses_an_unknown_enum_member_and_a_missing_mandatory_field(hq: TestClient) -> None:
    assert inner(hq.post("/data/Prospects", json={"B2BProspectStatus": "Maybe"})) == (
        "The value 'Maybe' of property 'B2BProspectStatus' is not a member of enum type "
        "'Microsoft.Dynamics.DataEntities.RetailB2BProspectStatus' (members: Pending, Approved, Rejected, Unknown).")
    assert inner(hq.post("/data/CustomersV3", json={"OrganizationName": "Contoso"})) == "Field 'PartyType' must be filled in."
    assert inner(hq.post("/data/CustomersV3", json={"PartyType": "Organization", "OrganizationName": "Contoso"})) == (
        "Field 'CustomerGroupId' must be filled in.")
    customer = hq.post("/data/CustomersV3", json={"PartyType": "Organization", "OrganizationName": "Contoso",
                                                  "CustomerGroupId": "10"})  # fmt: skip
    assert customer.status_code == 201
    assert inner(hq.patch(customer.headers["Location"], json={"PartyType": ""})) == "Field 'PartyType' must be filled in."
    assert inner(hq.patch(customer.headers["Location"], json={"CustomerGroupId": ""})) == (
        "Field 'CustomerGroupId' must be filled in.")


def test_an_invalid_request_in_a_changeset_rolls_the_changeset_back(hq: TestClient, states) -> None:
    boundary, changeset = "batch_1", "changeset_1"
    parts = []
    for number, name in enumerate(("Fine", "n" * 101), start=1):
        parts.append(
            f"--{changeset}\r\nContent-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n"
            f"Content-ID: {number}\r\n\r\nPOST Prospects HTTP/1.1\r\nContent-Type: application/json\r\n\r\n"
            f'{{"ProspectName": "{name}"}}\r\n'
        )
    body = (f"--{boundary}\r\nContent-Type: multipart/mixed; boundary={changeset}\r\n\r\n"
            + "".join(parts) + f"--{changeset}--\r\n--{boundary}--\r\n")
    response = hq.post("/data/$batch", content=body.encode(), headers={"Content-Type": f"multipart/mixed; boundary={boundary}"})
    assert response.status_code == 200
    assert "HTTP/1.1 400" in response.text and "is 101 characters long" in response.text
    assert ok(hq.get("/data/Prospects"))["value"] == []
    assert states[0].counts()["writes"]["Prospects"] == 0
