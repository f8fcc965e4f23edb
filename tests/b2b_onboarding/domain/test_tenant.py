"""The tenant's model in the product: read from the fakes' metadata (Dataverse EntityDefinitions,
HQ's `$metadata`), the limits and option values it gives the flow, a tenant whose lead table lacks
what the flow needs failing at once, and the model read once per run.

Microsoft's shapes: "Query table definitions using the Web API" and "Retrieve table definitions by
name or MetadataId" (https://learn.microsoft.com/power-apps/developer/data-platform/webapi/query-metadata-web-api,
.../retrieve-metadata-name-metadataid)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import pytest
from airflow.sdk.exceptions import AirflowFailException

from b2b_onboarding import errors
from b2b_onboarding.airflow import tasks
from b2b_onboarding.clients import sales as sales_module
from b2b_onboarding.clients.commerce import CommerceClient
from b2b_onboarding.clients.sales import SalesClient
from b2b_onboarding.clients.settings import ServiceSettings
from b2b_onboarding.domain import customers, prospects
from b2b_onboarding.domain.tenant import (
    DEFAULT_TENANT,
    LEAD_COLUMNS,
    AlternateKey,
    Column,
    TableModel,
    Tenant,
    lead_model_problems,  # fmt: skip
    parse_commerce_model,
    parse_lead_model,
)
from b2b_onboarding.errors import ConfigurationError, DecisionConflict
from b2b_onboarding.store.state import StateStore, tenant_models
from d365_fakes.scenario import airflow_connections

RUN = "manual__tenant"
PROSPECT = {"dataAreaId": "usrt", "ProspectId": "P-1", "ProspectName": "Ada Lovelace", "CompanyName": "Engines",
            "PrimaryEmailAddress": "ada@engines.example"}  # fmt: skip


def connection(world, resource: str, conn_id: str) -> ServiceSettings:
    """The integration's app registration, as the Airflow connection `conn_id`."""
    app = world.cast.integration
    return ServiceSettings.from_connection(
        conn_id, host=resource, login=app["client_id"], password=app["client_secret"],
        extra={"authority": world.endpoints.authority, "ca_bundle": world.endpoints.ca_bundle},
    )  # fmt: skip


@pytest.fixture
def clients(world, admin):
    sales = SalesClient.connect(connection(world, world.endpoints.dataverse, "d365_sales"))
    commerce = CommerceClient.connect(connection(world, world.endpoints.commerce, "d365_commerce"))
    with sales.odata, commerce.odata:
        yield sales, commerce


def with_lead_columns(tenant: Tenant, *columns: Column) -> Tenant:
    return replace(tenant, lead=replace(tenant.lead, columns={**tenant.lead.columns, **{c.name: c for c in columns}}))


def with_commerce_column(tenant: Tenant, entity_set: str, column: Column) -> Tenant:
    table = tenant.commerce[entity_set]
    return replace(tenant, commerce={**tenant.commerce,
                                     entity_set: replace(table, columns={**table.columns, column.name: column})})  # fmt: skip


# --- Parsing ---------------------------------------------------------------------------------------


def test_the_lead_model_is_parsed_from_microsofts_documented_shapes():
    entity = {
        "@odata.context": "https://org.crm.dynamics.com/api/data/v9.2/$metadata#EntityDefinitions(...)/$entity",
        "LogicalName": "lead", "EntitySetName": "leads", "PrimaryIdAttribute": "leadid", "MetadataId": "x",
        "Attributes": [
            {"@odata.type": "#Microsoft.Dynamics.CRM.StringAttributeMetadata", "LogicalName": "companyname",
             "AttributeType": "String", "MetadataId": "a",
             "RequiredLevel": {"Value": "ApplicationRequired", "CanBeChanged": True,
                               "ManagedPropertyLogicalName": "canmodifyrequirementlevelsettings"}},
            {"@odata.type": "#Microsoft.Dynamics.CRM.PicklistAttributeMetadata", "LogicalName": "leadsourcecode",
             "AttributeType": "Picklist", "MetadataId": "b", "RequiredLevel": {"Value": "None", "CanBeChanged": True}},
        ],
        "Keys": [{"LogicalName": "msdyn_prospectid_company", "KeyAttributes": ["msdyn_prospectid", "msdyn_company"],
                  "EntityKeyIndexStatus": "Pending", "MetadataId": "k"}],
    }  # fmt: skip
    strings = {"value": [{"LogicalName": "companyname", "MaxLength": 160, "MetadataId": "a"}]}
    picklists = {"value": [{"LogicalName": "leadsourcecode", "MetadataId": "b", "OptionSet": {"Options": [
        {"Value": 8, "Label": {"UserLocalizedLabel": {"Label": "Web", "LanguageCode": 1033},
                               "LocalizedLabels": [{"Label": "Web", "LanguageCode": 1033},
                                                   {"Label": "Site web", "LanguageCode": 1036}]}},
        {"Value": 100000000, "Label": {"UserLocalizedLabel": {"Label": "Fair", "LanguageCode": 1033},
                                       "LocalizedLabels": [{"Label": "Fair", "LanguageCode": 1033}]}},
    ]}}]}  # fmt: skip

    model = parse_lead_model("Dataverse (Sales)", entity, strings, picklists)

    assert model.columns["companyname"] == Column("companyname", "String", 160, "ApplicationRequired", {})
    assert model.columns["leadsourcecode"].options == {"Web": 8, "Site web": 8, "Fair": 100000000}
    assert model.keys == (AlternateKey("msdyn_prospectid_company", ("msdyn_prospectid", "msdyn_company"), "Pending"),)


def test_hqs_model_is_parsed_from_csdl_with_aliases_enums_and_keys():
    csdl = """<?xml version="1.0" encoding="utf-8"?>
    <edmx:Edmx Version="4.0" xmlns:edmx="http://docs.oasis-open.org/odata/ns/edmx">
      <edmx:DataServices>
        <Schema Namespace="Microsoft.Dynamics.DataEntities" Alias="mde" xmlns="http://docs.oasis-open.org/odata/ns/edm">
          <EntityType Name="Prospect">
            <Key><PropertyRef Name="dataAreaId"/><PropertyRef Name="ProspectId"/></Key>
            <Property Name="dataAreaId" Type="Edm.String" Nullable="false" MaxLength="4"/>
            <Property Name="ProspectId" Type="Edm.String" Nullable="false" MaxLength="30"/>
            <Property Name="Note" Type="Edm.String" MaxLength="max"/>
            <Property Name="B2BProspectStatus" Type="mde.RetailB2BProspectStatus"/>
          </EntityType>
          <EnumType Name="RetailB2BProspectStatus">
            <Member Name="Pending" Value="0"/><Member Name="Approved" Value="1"/>
          </EnumType>
          <EnumType Name="NoYes"><Member Name="No"/><Member Name="Yes"/></EnumType>
          <EntityContainer Name="Resources">
            <EntitySet Name="Prospects" EntityType="Microsoft.Dynamics.DataEntities.Prospect"/>
          </EntityContainer>
        </Schema>
      </edmx:DataServices>
    </edmx:Edmx>"""

    models = parse_commerce_model("Commerce headquarters", csdl)

    assert set(models) == {"Prospects"}  # HQ has no CustomersV3 here: none is made up
    prospects_model = models["Prospects"]
    assert prospects_model.columns["ProspectId"] == Column("ProspectId", "Edm.String", 30, "NotNullable", {})
    assert prospects_model.columns["Note"].max_length is None
    assert prospects_model.columns["B2BProspectStatus"].options == {"Pending": 0, "Approved": 1}
    assert prospects_model.keys[0].columns == ("dataAreaId", "ProspectId")


def test_the_fakes_default_tenant_is_the_products_default_model(clients):
    sales, commerce = clients

    lead, hq = sales.lead_model(), commerce.table_models()

    assert {name: lead.columns[name] for name in LEAD_COLUMNS} == dict(DEFAULT_TENANT.lead.columns)
    assert lead.keys == DEFAULT_TENANT.lead.keys and lead_model_problems(lead) == []
    assert (lead.system, lead.name) == (DEFAULT_TENANT.lead.system, DEFAULT_TENANT.lead.name)
    for name, table in DEFAULT_TENANT.commerce.items():
        assert hq[name].system == table.system and hq[name].keys == table.keys
        assert list(hq[name].columns.values()) == list(table.columns.values())


def test_a_model_survives_the_state_stores_json():
    for model in (DEFAULT_TENANT.lead, *DEFAULT_TENANT.commerce.values()):
        assert TableModel.from_json(model.to_json()) == model


def test_the_store_keeps_a_runs_model_per_connection_and_drops_those_of_runs_long_over(store):
    store.record_tenant_model("old_run", "d365_sales", DEFAULT_TENANT.lead.to_json())
    with store.engine.begin() as connection:
        connection.execute(tenant_models.update().values(read_at=datetime.now(UTC) - timedelta(days=8)))
    store.record_tenant_model(RUN, "d365_sales", DEFAULT_TENANT.lead.to_json())
    store.record_tenant_model(RUN, "d365_sales", {"replaced": True})  # a task racing another writes it again

    assert store.tenant_model(RUN, "d365_sales") == {"replaced": True}
    assert store.tenant_model(RUN, "d365_commerce") is None
    assert store.tenant_model("old_run", "d365_sales") is None


def test_every_lead_column_the_flow_writes_or_reads_is_checked():
    written = set(prospects.lead_of(PROSPECT)) | {"msdyn_prospectid", "msdyn_company"}
    read = {column.removeprefix("_").removesuffix("_value") for column in
            (*sales_module.EXISTING_LEAD_COLUMNS, *sales_module.DRIFT_LEAD_COLUMNS)}  # fmt: skip
    assert written | read | set(prospects.MAPPED_LEAD_COLUMNS) <= set(LEAD_COLUMNS)


# --- Limits from the model -------------------------------------------------------------------------


def test_a_tenant_with_a_longer_column_accepts_what_the_standard_one_refuses():
    longer = with_lead_columns(DEFAULT_TENANT, Column("lastname", "String", 80, "None"))
    name = "Ada " + "L" * 60

    _, standard = prospects.validate({**PROSPECT, "ProspectName": name})
    prospect, error = prospects.validate({**PROSPECT, "ProspectName": name}, tenant=longer)

    assert standard == ("prospect usrt/P-1: ProspectName: its last word has 60 characters; the lead column 'lastname' "
                        "holds at most 50 in this tenant")  # fmt: skip
    assert error is None and prospects.lead_of(prospect.model_dump(), longer)["lastname"] == "L" * 60


def test_a_tenant_with_a_shorter_column_refuses_naming_its_limit():
    shorter = with_lead_columns(DEFAULT_TENANT, Column("companyname", "String", 40, "None"))
    page = prospects.validate_page([{**PROSPECT, "CompanyName": "C" * 41}, {**PROSPECT, "ProspectId": "P-2",
                                    "CompanyName": "C" * 40}], "usrt", shorter)  # fmt: skip
    assert list(page["error"]) == [
        "prospect usrt/P-1: CompanyName: 41 characters; the lead column 'companyname' holds at most 40 in this tenant",
        None,
    ]


def test_hqs_field_limits_where_it_is_smaller_than_the_lead_column():
    narrow = with_commerce_column(DEFAULT_TENANT, "Prospects", Column("PrimaryEmailAddress", "Edm.String", 30))
    _, error = prospects.validate({**PROSPECT, "PrimaryEmailAddress": "a" * 20 + "@engines.example"}, tenant=narrow)
    assert error == ("prospect usrt/P-1: PrimaryEmailAddress: 36 characters; Commerce's field "
                     "Prospects.PrimaryEmailAddress holds at most 30 in this tenant")  # fmt: skip


def test_the_subject_built_from_the_company_must_fit_in_its_column():
    short_subject = with_lead_columns(DEFAULT_TENANT, Column("subject", "String", 50, "None"))
    room = 50 - len(prospects.SUBJECT_PREFIX)

    fits, no_error = prospects.validate({**PROSPECT, "CompanyName": "C" * room}, tenant=short_subject)
    _, error = prospects.validate({**PROSPECT, "CompanyName": "C" * (room + 1)}, tenant=short_subject)

    assert no_error is None and len(prospects.lead_of(fits.model_dump(), short_subject)["subject"]) == 50
    assert error == (f"prospect usrt/P-1: CompanyName: {room + 1} characters; the lead column 'subject' holds "
                     f"'B2B onboarding request: ' and at most {room} in this tenant")  # fmt: skip


def test_the_prospect_id_is_limited_by_msdyn_prospectid_where_it_is_smaller():
    short_key = with_lead_columns(DEFAULT_TENANT, Column("msdyn_prospectid", "String", 8, "None"))
    _, error = prospects.validate({**PROSPECT, "ProspectId": "P-000000123"}, tenant=short_key)
    assert error == ("prospect usrt/P-000000123: ProspectId: 11 characters; the lead column 'msdyn_prospectid' holds "
                     "at most 8 in this tenant")  # fmt: skip


def test_a_customer_account_template_is_checked_against_the_tenants_customer_account():
    template = "{legal_entity}-CUSTOMER-{prospect_id}-{role}"  # USRT-CUSTOMER-P-7-ORG: 21 characters
    wide = with_commerce_column(DEFAULT_TENANT, "CustomersV3", Column("CustomerAccount", "Edm.String", 30, "NotNullable"))
    arguments = {"legal_entity": "usrt", "prospect_id": "P-7", "account": {"name": "Contoso"}, "contact": {},
                 "email": "ann@contoso.example", "known": customers.Known.of([], "usrt"), "template": template}  # fmt: skip

    chosen = customers.choose(**arguments, tenant=wide)
    with pytest.raises(DecisionConflict) as refused:
        customers.choose(**arguments)

    assert chosen.organization["CustomerAccount"] == "USRT-CUSTOMER-P-7-ORG"
    assert "21 characters, and this tenant's CustomersV3.CustomerAccount holds 20" in str(refused.value)


# --- Option values by label ------------------------------------------------------------------------


def test_option_values_come_from_the_tenants_option_sets_by_label():
    other = with_lead_columns(
        DEFAULT_TENANT,
        Column("leadsourcecode", "Picklist", None, "None", {"Advertisement": 1, "Web": 100000003}),
        Column("msdyn_b2bprospectstatus", "Picklist", None, "None",
               {"Pending": 192350000, "Approved": 192350001, "Rejected": 192350002, "Unknown": 192350003}),
    )  # fmt: skip

    standard, theirs = prospects.lead_of(PROSPECT), prospects.lead_of(PROSPECT, other)

    assert (standard["leadsourcecode"], standard["msdyn_b2bprospectstatus"]) == (8, 0)
    assert (theirs["leadsourcecode"], theirs["msdyn_b2bprospectstatus"]) == (100000003, 192350000)


def test_a_missing_option_a_wrong_type_and_a_key_not_active_are_each_named():
    model = with_lead_columns(
        DEFAULT_TENANT, Column("leadsourcecode", "Picklist", None, "None", {"Advertisement": 1}),
        Column("msdyn_prospectid", "Memo", 100, "None"),
    ).lead  # fmt: skip
    model = replace(model, keys=(replace(model.keys[0], status="Failed"),))

    assert lead_model_problems(model) == [
        "the lead column 'msdyn_prospectid' is of type Memo, not String",
        "the lead column 'leadsourcecode' has no option labelled 'Web'",
        "the lead's alternate key 'msdyn_prospectid_company' (msdyn_prospectid, msdyn_company) is Failed, not Active",
    ]
    assert lead_model_problems(replace(model, keys=()))[-1] == (
        "the lead table has no alternate key of (msdyn_prospectid, msdyn_company)")


# --- A lead table the flow cannot work with, and the model once per run ----------------------------


def test_a_missing_lead_column_is_named_and_fails_the_task_at_once(world, admin, store):
    admin.change_model(system="dataverse", table="lead", remove_columns=["msdyn_prospectid"])
    tasks._MODELS.clear()

    with pytest.raises(ConfigurationError) as raised:
        tasks.tenant_of_run(store, RUN, connection(world, world.endpoints.commerce, "d365_commerce"),
                            connection(world, world.endpoints.dataverse, "d365_sales"))  # fmt: skip

    assert not errors.cures_itself(raised.value)
    first_line = str(raised.value).splitlines()[0]
    assert first_line.startswith("Dataverse (Sales) via Airflow connection 'd365_sales': the lead column "
                                 "'msdyn_prospectid' does not exist. Next step: ")  # fmt: skip


def test_the_model_is_read_once_per_run_and_reused_by_its_other_tasks(world, admin, tmp_path):
    commerce = connection(world, world.endpoints.commerce, "d365_commerce")
    sales = connection(world, world.endpoints.dataverse, "d365_sales")
    url = f"sqlite:///{tmp_path / 'state.db'}"
    tasks._MODELS.clear()

    def requests() -> tuple[int, int]:
        counts = admin.counts()
        return counts["commerce"]["requests"], counts["dataverse"]["requests"]

    before = requests()
    first = tasks.tenant_of_run(StateStore(url), RUN, commerce, sales)
    read = requests()
    again_in_process = tasks.tenant_of_run(StateStore(url), RUN, commerce, sales)
    tasks._MODELS.clear()  # another task of the run, in a process of its own
    other_task = tasks.tenant_of_run(StateStore(url), RUN, commerce, sales)
    after_two_more = requests()
    tasks._MODELS.clear()
    next_run = tasks.tenant_of_run(StateStore(url), "manual__next", commerce, sales)

    assert read[0] - before[0] == 1 and read[1] - before[1] == 3  # $metadata; three EntityDefinitions requests
    assert after_two_more == read
    assert requests()[1] - after_two_more[1] == 3  # a new run reads the tenant anew
    assert first == again_in_process == other_task == next_run
    assert first.lead_option("leadsourcecode", "Web") == 8


def in_a_run(monkeypatch, world, tmp_path, run_id: str, task_id: str) -> None:
    """A task of a run in Airflow: its connections (to the fakes) and its task instance, in a
    process of its own."""
    for name, value in airflow_connections(world.endpoints, world.cast, ["usrt"], tmp_path / "state.db").items():
        monkeypatch.setenv(name, value)
    ti = SimpleNamespace(dag_id="b2b_prospect_sync", run_id=run_id, task_id=task_id, map_index=0)
    monkeypatch.setattr(tasks, "_context", lambda: {"ti": ti, "run_id": run_id, "params": {}})
    tasks._MODELS.clear()


def test_the_tasks_of_a_run_read_the_model_once_and_fail_at_once_on_a_missing_column(world, admin, monkeypatch,
                                                                                   tmp_path):  # fmt: skip
    admin.seed_companies(["usrt"])
    admin.seed_prospects([{**PROSPECT, "ProspectId": "P-000001"}])

    in_a_run(monkeypatch, world, tmp_path, RUN, "pull_prospects")
    pulled = tasks.pull_prospects("usrt")
    in_a_run(monkeypatch, world, tmp_path, RUN, "push_leads")
    before = admin.counts()["dataverse"]["requests"]
    pushed = tasks.push_leads("usrt", "P-000001", "P-000001")

    assert (pulled["pulled"], pushed["created"]) == (1, 1)
    # Every Dataverse request of the push is the step's own: the model came from the pull's read.
    assert admin.counts()["dataverse"]["requests"] - before == pushed["dataverse_requests"]

    admin.change_model(system="dataverse", table="lead", remove_columns=["leadsourcecode"])
    in_a_run(monkeypatch, world, tmp_path, "scheduled__next", "push_leads")
    with pytest.raises(AirflowFailException) as failed:
        tasks.push_leads("usrt", "P-000001", "P-000001")
    assert str(failed.value).startswith("Dataverse (Sales) via Airflow connection 'd365_sales': the lead column "
                                        "'leadsourcecode' does not exist. Next step: ")  # fmt: skip
