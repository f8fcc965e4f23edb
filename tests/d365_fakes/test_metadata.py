"""The table model served as metadata: Dataverse EntityDefinitions and `$metadata`, HQ's `$metadata`,
HQ's read-only LegalEntities and CustomerGroups, and the admin changes to the model."""

from collections.abc import Iterator
from urllib.parse import quote
from xml.etree import ElementTree

import pytest
from starlette.testclient import TestClient
from test_dataverse import API_ROOT, INTEGRATION, ORG_URL, bearer, by_prospect_id, error_of

from d365_fakes import admin, metadata, model
from d365_fakes.clients import ClientRegistration
from d365_fakes.commerce import CommerceState
from d365_fakes.commerce import create_app as create_commerce_app
from d365_fakes.dataverse import DataverseState, company_id, saved_view_id
from d365_fakes.dataverse import create_app as create_dataverse_app
from d365_fakes.faults import FaultPlan
from d365_fakes.tokens import TokenIssuer

COMMERCE_URL = "https://commerce.test"
SYNC = ClientRegistration("b2b-sync", "sync-secret", default_company="usrt")
EDM = "{http://docs.oasis-open.org/odata/ns/edm}"
LEAD = "EntityDefinitions(LogicalName='lead')"
ALL_LEADS_VIEW = "All Commerce B2B leads"


@pytest.fixture
def issuer() -> TokenIssuer:
    return TokenIssuer("https://login.example", "6f1f4a36-2b41-4c55-9d8e-0a3b5c7d9e11")


@pytest.fixture
def states() -> tuple[CommerceState, DataverseState]:
    return CommerceState(), DataverseState()


def _with_admin(app, states, issuer):
    commerce_state, dataverse_state = states
    app.include_router(admin.create_admin_router(commerce_state, dataverse_state, issuer, FaultPlan()), prefix="/_admin")
    app.include_router(metadata.create_admin_router(commerce_state.model, dataverse_state), prefix="/_admin")
    return app


@pytest.fixture
def api(states, issuer) -> Iterator[TestClient]:
    """The Web API root, signed in as the integration, with `/_admin` alongside."""
    app = _with_admin(create_dataverse_app(states[1], issuer, ORG_URL, {INTEGRATION.client_id: INTEGRATION}), states, issuer)
    with TestClient(app, base_url=f"{ORG_URL}{API_ROOT}/") as client:
        client.headers["Authorization"] = bearer(issuer, INTEGRATION)
        yield client


@pytest.fixture
def hq(states, issuer) -> Iterator[TestClient]:
    app = _with_admin(create_commerce_app(states[0], issuer, COMMERCE_URL, {SYNC.client_id: SYNC}), states, issuer)
    with TestClient(app, base_url=COMMERCE_URL) as client:
        client.headers["Authorization"] = "Bearer " + issuer.issue(SYNC, COMMERCE_URL)["access_token"]
        yield client


def admin_url(client: TestClient, path: str) -> str:
    """`/_admin/<path>` on the client's server (the Web API client's base URL has a path)."""
    return str(client.base_url.copy_with(path=f"/_admin/{path}"))


def change_model(client: TestClient, **body: object):
    return client.post(admin_url(client, "model"), json=body)


def ok(response) -> dict:
    assert response.status_code == 200, response.text
    return response.json()


def labels(option: dict) -> tuple[str, str]:
    label = option["Label"]
    return label["UserLocalizedLabel"]["Label"], label["LocalizedLabels"][0]["Label"]


# --- EntityDefinitions ---------------------------------------------------------------------------


def test_the_lead_definition_as_the_product_reads_it(api: TestClient) -> None:
    select = "$select=LogicalName,EntitySetName,PrimaryIdAttribute,MetadataId"
    expand = ("$expand=Attributes($select=LogicalName,AttributeType,RequiredLevel),"
              "Keys($select=LogicalName,KeyAttributes,EntityKeyIndexStatus)")
    lead = ok(api.get(f"{LEAD}?{select}&{expand}"))
    assert lead["@odata.context"].endswith(
        "/$metadata#EntityDefinitions(LogicalName,EntitySetName,PrimaryIdAttribute,MetadataId)/$entity")
    assert (lead["LogicalName"], lead["EntitySetName"], lead["PrimaryIdAttribute"]) == ("lead", "leads", "leadid")
    columns = {row["LogicalName"]: row for row in lead["Attributes"]}
    assert set(columns) == set(model.LEAD.by_name)
    assert columns["msdyn_prospectid"]["AttributeType"] == "String"
    assert columns["msdyn_b2bprospectstatus"]["@odata.type"] == "#Microsoft.Dynamics.CRM.PicklistAttributeMetadata"
    assert columns["msdyn_company"]["AttributeType"] == "Lookup"
    assert columns["ownerid"]["RequiredLevel"]["Value"] == "SystemRequired"
    assert set(columns["lastname"]) == {"@odata.type", "MetadataId", "LogicalName", "AttributeType", "RequiredLevel"}
    assert lead["Keys"] == [{
        "MetadataId": model.LEAD.keys[0].metadata_id("lead"), "LogicalName": "msdyn_prospectid_company",
        "KeyAttributes": ["msdyn_prospectid", "msdyn_company"], "EntityKeyIndexStatus": "Active",
    }]
    by_id = ok(api.get(f"EntityDefinitions({lead['MetadataId']})?{select}"))
    assert {name: by_id[name] for name in ("LogicalName", "EntitySetName", "MetadataId")} == {
        "LogicalName": "lead", "EntitySetName": "leads", "MetadataId": lead["MetadataId"]}


def test_string_lengths_are_dataverse_s(api: TestClient) -> None:
    strings = ok(api.get(f"{LEAD}/Attributes/Microsoft.Dynamics.CRM.StringAttributeMetadata?$select=LogicalName,MaxLength"))
    assert strings["@odata.context"].endswith("/Attributes/Microsoft.Dynamics.CRM.StringAttributeMetadata(LogicalName,MaxLength)")
    lengths = {row["LogicalName"]: row["MaxLength"] for row in strings["value"]}
    assert lengths == {
        "firstname": 50, "lastname": 50, "fullname": 160, "companyname": 100, "emailaddress1": 100,
        "telephone1": 50, "address1_line1": 250, "address1_city": 80, "address1_stateorprovince": 50,
        "address1_postalcode": 20, "address1_country": 80, "subject": 300, "msdyn_prospectid": 100,
    }
    assert all(row["@odata.type"] == "#Microsoft.Dynamics.CRM.StringAttributeMetadata" for row in strings["value"])


def test_choices_carry_their_options_and_labels(api: TestClient) -> None:
    url = f"{LEAD}/Attributes/Microsoft.Dynamics.CRM.PicklistAttributeMetadata?$select=LogicalName&$expand=OptionSet($select=Options)"
    choices = {row["LogicalName"]: row["OptionSet"] for row in ok(api.get(url))["value"]}
    assert set(choices) == {"leadsourcecode", "msdyn_b2bprospectstatus"}
    sources = {option["Value"]: labels(option)[0] for option in choices["leadsourcecode"]["Options"]}
    assert sources[1] == "Advertisement" and sources[8] == "Web" and sources[9] == "Word of Mouth" and sources[10] == "Other"
    assert list(sources) == list(range(1, 11))
    statuses = {labels(option)[1]: option["Value"] for option in choices["msdyn_b2bprospectstatus"]["Options"]}
    # the values the product wrote before it read them from the tenant
    assert statuses == {"Pending": 0, "Approved": 1, "Rejected": 2, "Unknown": 3}
    assert set(choices["leadsourcecode"]) == {"MetadataId", "Options"}
    single = ok(api.get(f"{LEAD}/Attributes(LogicalName='statuscode')/Microsoft.Dynamics.CRM.StatusAttributeMetadata"
                        "?$select=LogicalName&$expand=OptionSet,GlobalOptionSet"))
    assert single["GlobalOptionSet"] is None  # a local option set
    assert {option["Value"]: option["State"] for option in single["OptionSet"]["Options"]} == {
        1: 0, 2: 0, 3: 1, 4: 2, 5: 2, 6: 2, 7: 2}
    states = ok(api.get(f"{LEAD}/Attributes(LogicalName='statecode')/Microsoft.Dynamics.CRM.StateAttributeMetadata"
                        "?$select=LogicalName&$expand=OptionSet($select=Options)"))["OptionSet"]["Options"]
    assert {labels(option)[0]: (option["Value"], option["DefaultStatus"]) for option in states} == {
        "Open": (0, 1), "Qualified": (1, 3), "Disqualified": (2, 4)}


def test_the_collection_filters_selects_and_always_keeps_the_key(api: TestClient) -> None:
    answer = ok(api.get("EntityDefinitions", params={
        "$filter": "LogicalName eq 'lead' or LogicalName eq 'cdm_company'", "$select": "LogicalName,EntitySetName"}))
    assert answer["@odata.context"].endswith("/$metadata#EntityDefinitions(LogicalName,EntitySetName)")
    assert [(row["LogicalName"], row["EntitySetName"], set(row)) for row in answer["value"]] == [
        ("lead", "leads", {"MetadataId", "LogicalName", "EntitySetName"}),
        ("cdm_company", "cdm_companies", {"MetadataId", "LogicalName", "EntitySetName"}),
    ]
    everything = ok(api.get("EntityDefinitions", params={"$select": "LogicalName,ObjectTypeCode"}))["value"]
    assert {row["LogicalName"]: row["ObjectTypeCode"] for row in everything if row["LogicalName"] != "cdm_company"} == {
        "lead": 4, "opportunity": 3, "account": 1, "contact": 2, "opportunityclose": 4208, "systemuser": 8, "savedquery": 1039}


def test_attributes_by_name_and_their_own_types(api: TestClient) -> None:
    lastname = ok(api.get(f"{LEAD}/Attributes(LogicalName='lastname')"))
    assert lastname["@odata.context"].endswith(f"/Attributes({lastname['MetadataId']})/$entity")
    assert (lastname["@odata.type"], lastname["MaxLength"], lastname["IsValidForCreate"]) == (
        "#Microsoft.Dynamics.CRM.StringAttributeMetadata", 50, True)
    lead_id = model.LEAD.metadata_id
    by_ids = ok(api.get(f"EntityDefinitions({lead_id})/Attributes({lastname['MetadataId']})?$select=LogicalName"))
    assert by_ids["LogicalName"] == "lastname"
    contact_lastname = ok(api.get("EntityDefinitions(LogicalName='contact')/Attributes(LogicalName='lastname')"))
    assert contact_lastname["MetadataId"] != lastname["MetadataId"]  # a column of each table
    fullname = ok(api.get(f"{LEAD}/Attributes(LogicalName='fullname')"))
    assert (fullname["IsValidForCreate"], fullname["IsValidForUpdate"]) == (False, False)
    company = ok(api.get(f"{LEAD}/Attributes(LogicalName='msdyn_company')/Microsoft.Dynamics.CRM.LookupAttributeMetadata?$select=Targets"))
    assert company["Targets"] == ["cdm_company"]
    filtered = ok(api.get(f"{LEAD}/Attributes", params={"$filter": "LogicalName eq 'subject'", "$select": "LogicalName,SchemaName"}))
    assert [(row["LogicalName"], row["SchemaName"]) for row in filtered["value"]] == [("subject", "Subject")]


def test_unknown_tables_columns_and_properties_answer_as_dataverse(api: TestClient) -> None:
    assert error_of(api.get("EntityDefinitions(LogicalName='prospect')"), 404)["code"] == "0x80041102"
    assert error_of(api.get(f"{LEAD}/Attributes(LogicalName='nope')"), 404) == {
        "code": "0x80041103", "message": "'lead' entity doesn't contain attribute with Name = 'nope' and NameMapping = 'Logical'."}
    # MaxLength belongs to StringAttributeMetadata, not to the base type of the Attributes collection.
    assert error_of(api.get(f"{LEAD}/Attributes?$select=MaxLength"), 400) == {
        "code": "0x80060888", "message": "Could not find a property named 'MaxLength' on type 'Microsoft.Dynamics.CRM.AttributeMetadata'."}
    assert ok(api.get("EntityDefinitions", params={"$filter": "LogicalName eq 'prospect'"}))["value"] == []


def test_metadata_needs_a_token(api: TestClient) -> None:
    for path in (LEAD, "$metadata"):
        assert api.get(path, headers={"Authorization": ""}).status_code == 401


def test_dataverse_csdl_lists_every_table_and_column(api: TestClient) -> None:
    response = api.get("$metadata")
    assert response.status_code == 200 and response.headers["content-type"].startswith("application/xml")
    root = ElementTree.fromstring(response.content)
    types = {element.get("Name"): element for element in root.iter(f"{EDM}EntityType")}
    lead = types["lead"]
    assert [ref.get("Name") for ref in lead.iterfind(f"{EDM}Key/{EDM}PropertyRef")] == ["leadid"]
    properties = {prop.get("Name"): prop.get("Type") for prop in lead.iter(f"{EDM}Property")}
    expected = {f"_{a.logical_name}_value" if a.is_lookup else a.logical_name for a in model.LEAD.attributes}
    assert set(properties) == expected
    assert properties["msdyn_b2bprospectstatus"] == "Edm.Int32" and properties["_msdyn_company_value"] == "Edm.Guid"
    navigations = {nav.get("Name"): nav.get("Type") for nav in lead.iter(f"{EDM}NavigationProperty")}
    assert navigations["msdyn_company"] == "mscrm.cdm_company"
    sets = {element.get("Name"): element.get("EntityType") for element in root.iter(f"{EDM}EntitySet")}
    assert sets["leads"] == "Microsoft.Dynamics.CRM.lead" and len(sets) == len(model.DATAVERSE_ENTITIES)


# --- HQ --------------------------------------------------------------------------------------------


def test_hq_csdl_has_lengths_nullability_and_enums(hq: TestClient) -> None:
    response = hq.get("/data/$metadata")
    assert response.status_code == 200 and response.headers["content-type"].startswith("application/xml")
    root = ElementTree.fromstring(response.content)
    types = {element.get("Name"): element for element in root.iter(f"{EDM}EntityType")}
    prospect = {prop.get("Name"): prop.attrib for prop in types["Prospect"].iter(f"{EDM}Property")}
    assert {name: int(attrs["MaxLength"]) for name, attrs in prospect.items() if "MaxLength" in attrs} == {
        prop.name: prop.max_length for prop in model.PROSPECTS.properties if prop.max_length}
    assert prospect["ProspectId"]["Nullable"] == "false" and "Nullable" not in prospect["ProspectName"]
    assert prospect["B2BProspectStatus"]["Type"] == "Microsoft.Dynamics.DataEntities.RetailB2BProspectStatus"
    customer = {prop.get("Name"): prop.attrib for prop in types["CustomerV3"].iter(f"{EDM}Property")}
    assert (customer["CustomerAccount"]["MaxLength"], customer["PartyType"]["Nullable"]) == ("20", "false")
    assert (customer["CustomerGroupId"]["MaxLength"], customer["CustomerGroupId"]["Nullable"]) == ("10", "false")
    enums = {element.get("Name"): {m.get("Name"): int(m.get("Value")) for m in element.iter(f"{EDM}Member")}
             for element in root.iter(f"{EDM}EnumType")}
    assert enums["RetailB2BProspectStatus"] == {"Pending": 0, "Approved": 1, "Rejected": 2, "Unknown": 3}
    sets = {element.get("Name") for element in root.iter(f"{EDM}EntitySet")}
    assert sets == {"Prospects", "CustomersV3", "CustomerHiearchies", "CustomerHierarchyNodes", "LegalEntities", "CustomerGroups"}
    assert hq.get("/data/$metadata", headers={"Authorization": ""}).status_code == 401


def test_legal_entities_and_customer_groups_are_read_only_and_cover_every_company(hq: TestClient, states) -> None:
    commerce_state, _ = states
    rows = ok(hq.get("/data/LegalEntities"))["value"]
    assert [(row["LegalEntityId"], row["Name"]) for row in rows] == [
        ("usmf", "Contoso Entertainment System USA"), ("usrt", "Contoso Retail USA")]
    commerce_state.seed_prospects([{"dataAreaId": "DEMF", "ProspectId": "P-1"}])
    assert [row["LegalEntityId"] for row in ok(hq.get("/data/LegalEntities"))["value"]] == ["demf", "usmf", "usrt"]
    groups = ok(hq.get("/data/CustomerGroups"))["value"]  # the caller's company, usrt
    assert {row["dataAreaId"] for row in groups} == {"usrt"}
    assert [row["CustomerGroupId"] for row in groups] == [group for group, _ in model.DEMO_CUSTOMER_GROUPS]
    everywhere = ok(hq.get("/data/CustomerGroups?cross-company=true&$filter=CustomerGroupId eq '30'"))["value"]
    assert [(row["dataAreaId"], row["Description"]) for row in everywhere] == [
        (company, "Retail customers") for company in ("demf", "usmf", "usrt")]
    assert hq.post("/data/LegalEntities", json={"LegalEntityId": "gbsi"}).status_code == 405
    assert hq.patch("/data/CustomerGroups(dataAreaId='usrt',CustomerGroupId='10')", json={"Description": "x"}).status_code == 405
    assert hq.delete("/data/LegalEntities('usrt')").status_code == 405
    assert commerce_state.counts()["writes"] == {"Prospects": 0, "CustomersV3": 0, "CustomerHiearchies": 0, "CustomerHierarchyNodes": 0}


# --- admin changes to the model --------------------------------------------------------------------


def test_a_removed_dataverse_column_is_gone_from_metadata_and_table_until_reset(api: TestClient) -> None:
    assert change_model(api, system="dataverse", table="lead", remove_columns=["msdyn_prospectid"]).status_code == 204
    with_attributes = ok(api.get(f"{LEAD}?$select=LogicalName&$expand=Attributes($select=LogicalName)"))
    assert "msdyn_prospectid" not in {row["LogicalName"] for row in with_attributes["Attributes"]}
    assert error_of(api.get(f"{LEAD}/Attributes(LogicalName='msdyn_prospectid')"), 404)["code"] == "0x80041103"
    refused = error_of(api.post("leads", json={"lastname": "A", "msdyn_prospectid": "P-1"}), 400)
    assert refused == {"code": "0x80060888", "message": "Could not find a property named 'msdyn_prospectid' on type 'Microsoft.Dynamics.CRM.lead'."}
    assert api.post("leads", json={"lastname": "A"}).status_code == 204
    assert error_of(api.get("leads?$select=msdyn_prospectid"), 400)
    assert all("msdyn_prospectid" not in row for row in ok(api.get("leads"))["value"])
    assert change_model(api, system="dataverse", table="lead", remove_columns=["msdyn_company"]).status_code == 204
    bind = {"msdyn_company@odata.bind": f"/cdm_companies({company_id('usrt')})"}
    assert error_of(api.post("leads", json=bind), 400)["code"] == "0x80060888"

    assert api.post(admin_url(api, "reset")).status_code == 204
    assert api.post("leads", json={"lastname": "A", "msdyn_prospectid": "P-1"}).status_code == 204
    assert ok(api.get(f"{LEAD}/Attributes(LogicalName='msdyn_prospectid')"))["MaxLength"] == 100


def test_a_key_not_active_or_removed_cannot_address_rows(api: TestClient) -> None:
    assert api.patch(by_prospect_id("P-1"), json={"lastname": "A"}).status_code == 204
    for status in ("Pending", "InProgress", "Failed"):
        assert change_model(api, system="dataverse", table="lead", key_status=status).status_code == 204
        assert ok(api.get(f"{LEAD}/Keys"))["value"][0]["EntityKeyIndexStatus"] == status
        refused = error_of(api.patch(by_prospect_id("P-1"), json={"lastname": "B"}), 400)
        assert refused["message"] == "The specified key attributes are not a defined key for the lead entity"
        assert error_of(api.get(by_prospect_id("P-1")), 400) == refused
    assert change_model(api, system="dataverse", table="lead", key_status="Active").status_code == 204
    assert api.get(by_prospect_id("P-1")).status_code == 200
    assert change_model(api, system="dataverse", table="lead", remove_keys=True).status_code == 204
    assert ok(api.get(f"{LEAD}/Keys"))["value"] == []
    assert error_of(api.get(by_prospect_id("P-1")), 400)["code"] == "0x80060888"
    assert api.post(admin_url(api, "reset")).status_code == 204
    assert ok(api.get(f"{LEAD}/Keys"))["value"][0]["EntityKeyIndexStatus"] == "Active"


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ([1], "the body must be a JSON object"),
        ({"system": "sales", "table": "lead", "remove_keys": True}, "system"),
        ({"system": "dataverse", "table": "prospect", "remove_keys": True}, "table must be one of"),
        ({"system": "dataverse", "table": "lead"}, "names no change"),
        ({"system": "dataverse", "table": "lead", "remove_columns": ["nope"]}, "remove_columns: nope"),
        ({"system": "dataverse", "table": "lead", "remove_columns": ["leadid"]}, "remove_columns: leadid"),
        ({"system": "dataverse", "table": "lead", "remove_columns": "msdyn_prospectid"}, "remove_columns must be"),
        ({"system": "dataverse", "table": "lead", "key_status": "Broken"}, "key_status must be one of"),
        ({"system": "dataverse", "table": "account", "key_status": "Failed"}, "key_status: the table account"),
        ({"system": "dataverse", "table": "lead", "remove_keys": "yes"}, "remove_keys must be"),
        ({"system": "commerce", "table": "Prospects", "key_status": "Failed"}, "unknown field(s) for commerce: key_status"),
        ({"system": "commerce", "table": "Prospects", "remove_columns": ["ProspectId"]}, "ProspectId is a key"),
        ({"system": "dataverse", "table": "lead", "max_lengths": {"nope": 80}}, "max_lengths: nope is not a column"),
        ({"system": "dataverse", "table": "lead", "max_lengths": {"leadsourcecode": 80}}, "leadsourcecode is not a string"),
        ({"system": "dataverse", "table": "lead", "max_lengths": {"lastname": 0}}, "lastname must be a whole number"),
        ({"system": "dataverse", "table": "lead", "max_lengths": {"lastname": 4001}}, "from 1 to 4000"),
        ({"system": "dataverse", "table": "lead", "max_lengths": {"lastname": "80"}}, "lastname must be a whole number"),
        ({"system": "dataverse", "table": "lead", "max_lengths": {}}, "max_lengths must be"),
        ({"system": "dataverse", "table": "lead", "options": {"nope": {"A": 1}}}, "options: nope is not a column"),
        ({"system": "dataverse", "table": "lead", "options": {"lastname": {"A": 1}}}, "lastname is a String column"),
        ({"system": "dataverse", "table": "lead", "options": {"statuscode": {"A": 1}}}, "statuscode is a Status column"),
        ({"system": "dataverse", "table": "lead", "options": {"leadsourcecode": {}}}, "leadsourcecode must be"),
        ({"system": "dataverse", "table": "lead", "options": {"leadsourcecode": {"Web": "8"}}}, "'Web' must be a 32-bit"),
        ({"system": "dataverse", "table": "lead", "options": {"leadsourcecode": {"Web": 2**31}}}, "'Web' must be a 32-bit"),
        ({"system": "dataverse", "table": "lead", "options": {"leadsourcecode": {"A": 1, "B": 1}}}, "the same value"),
        ({"system": "commerce", "table": "Prospects", "max_lengths": {"B2BProspectStatus": 10}}, "B2BProspectStatus is not a string"),
        ({"system": "commerce", "table": "Prospects", "options": {"B2BProspectStatus": {"A": 1}}}, "unknown field(s) for commerce: options"),
    ],
)
def test_a_wrong_model_change_is_refused_naming_the_field(api: TestClient, body: object, named: str) -> None:
    response = api.post(admin_url(api, "model"), json=body)
    assert response.status_code == 400 and named in response.json()["error"], response.text
    assert ok(api.get(f"{LEAD}/Keys"))["value"][0]["EntityKeyIndexStatus"] == "Active"  # nothing changed
    assert ok(api.get(f"{LEAD}/Attributes(LogicalName='lastname')"))["MaxLength"] == 50


def picklist(api: TestClient, column: str) -> dict:
    url = (f"{LEAD}/Attributes(LogicalName='{column}')/Microsoft.Dynamics.CRM.PicklistAttributeMetadata"
           "?$select=LogicalName&$expand=OptionSet($select=Options)")
    return {labels(option)[0]: option["Value"] for option in ok(api.get(url))["OptionSet"]["Options"]}


def test_a_dataverse_column_of_another_length_is_served_and_enforced_until_reset(api: TestClient) -> None:
    assert change_model(api, system="dataverse", table="lead", max_lengths={"lastname": 80, "companyname": 40}).status_code == 204
    lastname = ok(api.get(f"{LEAD}/Attributes(LogicalName='lastname')/Microsoft.Dynamics.CRM.StringAttributeMetadata"
                          "?$select=MaxLength,DatabaseLength"))
    assert (lastname["MaxLength"], lastname["DatabaseLength"]) == (80, 160)
    expanded = ok(api.get(f"{LEAD}/Attributes/Microsoft.Dynamics.CRM.StringAttributeMetadata?$select=LogicalName,MaxLength"))
    assert {row["LogicalName"]: row["MaxLength"] for row in expanded["value"]}["companyname"] == 40
    assert api.post("leads", json={"lastname": "L" * 80, "companyname": "C" * 40}).status_code == 204
    assert error_of(api.post("leads", json={"lastname": "L" * 81}), 400)["message"].endswith("maximum allowed length of '80'.")
    assert error_of(api.post("leads", json={"companyname": "C" * 41}), 400)["message"].endswith("length of '40'.")
    assert ok(api.get(f"{LEAD}/Attributes(LogicalName='firstname')"))["MaxLength"] == 50  # the others as they were

    assert api.post(admin_url(api, "reset")).status_code == 204
    assert ok(api.get(f"{LEAD}/Attributes(LogicalName='lastname')"))["MaxLength"] == 50
    assert error_of(api.post("leads", json={"lastname": "L" * 51}), 400)["code"] == "0x80044331"


def test_a_choice_with_the_tenants_option_values_is_served_and_enforced_until_reset(api: TestClient) -> None:
    tenant_values = {"Pending": 100000000, "Approved": 100000001, "Rejected": 100000002, "Unknown": 100000003}
    assert picklist(api, "msdyn_b2bprospectstatus") == {"Pending": 0, "Approved": 1, "Rejected": 2, "Unknown": 3}
    assert change_model(api, system="dataverse", table="lead", options={"msdyn_b2bprospectstatus": tenant_values}).status_code == 204

    assert picklist(api, "msdyn_b2bprospectstatus") == tenant_values
    assert api.post("leads", json={"msdyn_b2bprospectstatus": 100000001}).status_code == 204
    refused = error_of(api.post("leads", json={"msdyn_b2bprospectstatus": 0}), 400)
    assert refused["message"].endswith("Accepted Values: 100000000,100000001,100000002,100000003")
    formatted = ok(api.get("leads?$select=msdyn_b2bprospectstatus",
                           headers={"Prefer": 'odata.include-annotations="OData.Community.Display.V1.FormattedValue"'}))
    assert formatted["value"][0]["msdyn_b2bprospectstatus@OData.Community.Display.V1.FormattedValue"] == "Approved"
    assert picklist(api, "leadsourcecode")["Web"] == 8  # the other choices as they were

    assert api.post(admin_url(api, "reset")).status_code == 204
    assert picklist(api, "msdyn_b2bprospectstatus")["Pending"] == 0
    assert api.post("leads", json={"msdyn_b2bprospectstatus": 0}).status_code == 204


def test_an_hq_field_of_another_length_is_served_and_enforced_until_reset(hq: TestClient) -> None:
    def max_length(field: str) -> str | None:
        root = ElementTree.fromstring(hq.get("/data/$metadata").content)
        prospect = next(element for element in root.iter(f"{EDM}EntityType") if element.get("Name") == "Prospect")
        return next(prop.get("MaxLength") for prop in prospect.iter(f"{EDM}Property") if prop.get("Name") == field)

    assert change_model(hq, system="commerce", table="Prospects", max_lengths={"ProspectName": 30}).status_code == 204
    assert max_length("ProspectName") == "30"
    refused = hq.post("/data/Prospects", json={"ProspectName": "n" * 31})
    assert refused.status_code == 400
    assert "'ProspectName' is 31 characters long; the field holds at most 30" in refused.json()["error"]["innererror"]["message"]
    assert hq.post("/data/Prospects", json={"ProspectName": "n" * 30}).status_code == 201
    assert hq.post(admin_url(hq, "reset")).status_code == 204
    assert max_length("ProspectName") == "100"
    assert hq.post("/data/Prospects", json={"ProspectName": "n" * 31}).status_code == 201


def test_a_removed_hq_field_is_gone_from_metadata_and_entity_set_until_reset(hq: TestClient, states) -> None:
    commerce_state, _ = states
    commerce_state.seed_prospects([{"dataAreaId": "usrt", "ProspectId": "P-1", "Note": "kept in the row"}])
    assert change_model(hq, system="commerce", table="Prospects", remove_columns=["Note"]).status_code == 204
    root = ElementTree.fromstring(hq.get("/data/$metadata").content)
    prospect = next(element for element in root.iter(f"{EDM}EntityType") if element.get("Name") == "Prospect")
    assert "Note" not in {prop.get("Name") for prop in prospect.iter(f"{EDM}Property")}
    assert "Note" not in ok(hq.get("/data/Prospects"))["value"][0]
    refused = hq.post("/data/Prospects", json={"ProspectName": "A", "Note": "x"})
    assert refused.status_code == 400 and "The property 'Note' does not exist" in refused.json()["error"]["innererror"]["message"]
    assert hq.get("/data/Prospects?$select=Note").status_code == 400
    assert hq.post(admin_url(hq, "reset")).status_code == 204
    assert hq.post("/data/Prospects", json={"ProspectName": "A", "Note": "x"}).status_code == 201


def test_a_removed_saved_view_is_gone_until_reset(api: TestClient) -> None:
    view_id = saved_view_id(ALL_LEADS_VIEW)
    assert ok(api.get(f"leads?savedQuery={view_id}"))["value"] == []
    assert api.delete(admin_url(api, f"dataverse/savedqueries/{quote(ALL_LEADS_VIEW)}")).status_code == 204
    assert error_of(api.get(f"leads?savedQuery={view_id}"), 404)["message"] == f"savedquery With Id = {view_id} Does Not Exist"
    names = [row["name"] for row in ok(api.get("savedqueries"))["value"]]
    assert ALL_LEADS_VIEW not in names and "My open leads" in names
    assert api.delete(admin_url(api, f"dataverse/savedqueries/{quote(ALL_LEADS_VIEW)}")).status_code == 404
    assert api.post(admin_url(api, "reset")).status_code == 204
    assert ok(api.get(f"leads?savedQuery={view_id}"))["value"] == []
