"""The product's connection types as Airflow sees them: provider info that Airflow's own schema
accepts, three types with their form fields in the Connections form, a Test button that reaches the
fakes (a token and one cheap read) and, when it fails, says what to fix without the secret or the
random conn_id the form is tested under; and a connection of the new type reading exactly as one of
conn_type `generic` with the same extra did."""

from __future__ import annotations

import json
import socket
from importlib.resources import files

import jsonschema
import pytest
from airflow.models.connection import Connection
from airflow.providers_manager import ProvidersManager
from airflow.sdk.providers_manager_runtime import ProvidersManagerTaskRuntime
from airflow.utils.strings import get_random_string

from b2b_onboarding.airflow.hooks import CommerceHook, SalesHook, StateStoreHook
from b2b_onboarding.airflow.provider_info import get_provider_info
from b2b_onboarding.clients.settings import ServiceSettings
from d365_fakes.scenario import CUSTOMER_GROUP

HOOKS = {"d365_commerce": CommerceHook, "d365_sales": SalesHook, "d365_state": StateStoreHook}
TYPES = {kind["connection-type"]: kind for kind in get_provider_info()["connection-types"]}
# What a connection gives ServiceSettings other than through an option of the extra.
STANDARD_SETTINGS = {"conn_id", "resource", "client_id", "client_secret"}


def schema(name: str) -> dict:
    return json.loads(files("airflow").joinpath(name).read_text())


def test_the_provider_info_is_valid_by_airflows_schemas():
    info = get_provider_info()
    jsonschema.validate(info, schema("provider_info.schema.json"))
    for kind in info["connection-types"]:
        behaviour = kind["ui-field-behaviour"]
        jsonschema.validate({"hidden_fields": behaviour["hidden-fields"], "relabeling": behaviour["relabeling"],
                             "placeholders": behaviour["placeholders"]},
                            schema("customized_form_field_behaviours.schema.json"))  # fmt: skip
    assert set(TYPES) == set(HOOKS)


@pytest.mark.parametrize("conn_type", sorted(HOOKS))
def test_airflow_knows_each_type_by_its_hook_and_can_test_it(conn_type):
    hook = Connection(conn_id="any", conn_type=conn_type).get_hook()  # as the Test button makes it
    assert type(hook) is HOOKS[conn_type] and hook.conn_id == "any"
    assert hook.conn_type == conn_type and hook.hook_name == TYPES[conn_type]["hook-name"]
    assert ProvidersManagerTaskRuntime().hooks[conn_type].connection_testable


def test_airflow_knows_the_notifier():
    assert "b2b_onboarding.airflow.notifier.TaskFailureNotifier" in ProvidersManager().notification  # it imports


def hook_meta(conn_type: str) -> dict:
    """What the Connections form gets from the api-server (`GET /ui/connections/hook_meta`)."""
    from airflow.api_fastapi.core_api.services.ui.connections import HookMetaService

    return next(meta.model_dump() for meta in HookMetaService.hook_meta_data() if meta.connection_type == conn_type)


@pytest.mark.parametrize("conn_type", ["d365_commerce", "d365_sales"])
def test_the_form_relabels_the_standard_fields_and_shows_every_option(conn_type):
    meta = hook_meta(conn_type)
    fields = meta["standard_fields"]
    assert meta["hook_name"] == TYPES[conn_type]["hook-name"]
    assert [fields[name]["title"] for name in ("host", "login", "password")] == ["Environment URL", "Client ID",
                                                                                   "Client secret"]  # fmt: skip
    assert fields["host"]["placeholder"].startswith("https://contoso.")
    assert fields["url_schema"]["hidden"] and fields["port"]["hidden"] and not fields["host"]["hidden"]
    options = meta["extra_fields"]
    assert {"tenant_id", "authority", "ca_bundle", "timeout_s", "bulk", "batch_size", "max_concurrency",
            "max_attempts", "retry_budget"} <= set(options)  # fmt: skip
    assert options["tenant_id"]["schema"]["title"] == "Tenant ID" and options["tenant_id"]["description"]
    assert options["bulk"]["value"] is True and options["bulk"]["schema"]["type"] == ["boolean", "null"]
    commerce_only = {"legal_entities", "customer_group", "customer_account_template"}
    assert (commerce_only <= set(options)) == (conn_type == "d365_commerce")
    assert ("page_size" in options) == ("change_tracking" in options) == (conn_type == "d365_sales")


def test_the_state_store_form_names_its_fields_as_a_database_does():
    meta = hook_meta("d365_state")
    assert meta["standard_fields"]["url_schema"]["title"] == "Database"
    assert meta["standard_fields"]["login"]["title"] == "User"
    assert meta["extra_fields"]["driver"]["schema"]["examples"] == ["postgresql+psycopg2", "sqlite"]


def _bounds(prop: dict) -> dict:
    """The numeric bounds of a property of a JSON schema, also when it may be null (pydantic's anyOf)."""
    keys = ("minimum", "maximum", "exclusiveMinimum")
    found = {key: prop[key] for key in keys if key in prop}
    for option in prop.get("anyOf", ()):
        found |= {key: option[key] for key in keys if key in option}
    return found


def test_the_form_fields_are_exactly_the_options_the_settings_accept_with_their_bounds():
    """A new option in ServiceSettings without a field (or a field the settings refuse) fails here."""
    fields = {**TYPES["d365_commerce"]["conn-fields"], **TYPES["d365_sales"]["conn-fields"]}
    settings = ServiceSettings.model_json_schema()["properties"]
    assert set(fields) - {"tenant_id"} == set(settings) - STANDARD_SETTINGS  # tenant_id makes the authority
    for name, field in fields.items():
        if name in settings:
            assert _bounds(field["schema"]) == _bounds(settings[name]), name


def form_test(monkeypatch, conn_type: str, **fields) -> tuple[bool, str]:
    """`Connection.test_connection()` as Airflow's api-server calls it for the form's Test button:
    the form's values as a connection under a random conn_id, which the hook reads from the
    environment (`airflow.api_fastapi.core_api.routes.public.connections.test_connection`)."""
    conn = Connection(conn_id=get_random_string(), conn_type=conn_type, **fields)
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn.conn_id.upper()}", conn.get_uri())
    status, message = conn.test_connection()
    assert conn.conn_id not in message  # a name nobody knows
    return status, message


def service(world, conn_type: str, password: str | None = None, host: str | None = None, **extra) -> dict:
    """A service connection to the fakes as the Connections form saves it (options left empty are null)."""
    resource = {"d365_commerce": world.endpoints.commerce, "d365_sales": world.endpoints.dataverse}[conn_type]
    saved = {name: None for name in TYPES[conn_type]["conn-fields"]} | {"bulk": True}
    saved |= {"authority": world.endpoints.authority, "ca_bundle": world.endpoints.ca_bundle}
    if conn_type == "d365_commerce":
        saved |= {"legal_entities": "usrt, usmf", "customer_group": CUSTOMER_GROUP}
    return {"host": host or resource, "login": world.cast.integration["client_id"],
            "password": password or world.cast.integration["client_secret"], "extra": json.dumps(saved | extra)}  # fmt: skip


def test_the_test_button_gets_a_token_and_reads_whoami_in_sales(world, admin, monkeypatch):
    status, message = form_test(monkeypatch, "d365_sales", **service(world, "d365_sales"))
    assert status, message
    assert message.startswith(f"Dynamics 365 Sales (Dataverse) at {world.endpoints.dataverse}: a token for client "
                              f"{world.cast.integration['client_id']}; WhoAmI: application user ")  # fmt: skip


def test_the_test_button_reads_a_prospect_of_the_first_legal_entity_in_commerce(world, admin, monkeypatch):
    status, message = form_test(monkeypatch, "d365_commerce", **service(world, "d365_commerce"))
    assert status, message
    assert message.endswith("Prospects of legal entity usrt are readable.")
    assert admin.counts()["commerce"]["requests"]  # it did read


@pytest.mark.parametrize("conn_type", ["d365_commerce", "d365_sales"])
def test_a_wrong_secret_fails_the_test_saying_what_to_fix_never_the_secret(world, admin, monkeypatch, conn_type):
    wrong = "pasted-wrong-secret-0123456789"
    status, message = form_test(monkeypatch, conn_type, **service(world, conn_type, password=wrong))
    assert not status
    system = {"d365_commerce": "Commerce headquarters", "d365_sales": "Dataverse (Sales)"}[conn_type]
    assert message.startswith(f"{system}: Entra ID ")
    assert ("HTTP 401 invalid_client. Next step: check the connection's client id (login), secret (password) and "
            "tenant") in message and "AADSTS7000215" in message  # fmt: skip
    assert wrong not in message and world.cast.integration["client_secret"] not in message


def test_an_unknown_environment_url_fails_the_test_naming_it(world, admin, monkeypatch):
    unknown = "https://nowhere.invalid"
    status, message = form_test(monkeypatch, "d365_sales", **service(world, "d365_sales", host=unknown))
    assert not status
    assert f"Next step: the Environment URL (host) {unknown} of this connection is not a resource" in message


def test_an_application_user_without_privileges_fails_the_test_naming_what_to_grant(world, admin, monkeypatch):
    client_id = world.cast.integration["client_id"]
    admin.security(client_id=client_id, system="commerce", revoke=["ProspectsEntityRead"])
    status, message = form_test(monkeypatch, "d365_commerce", **service(world, "d365_commerce"))
    assert not status
    assert message.startswith("Commerce headquarters: read Prospects for legal entity usrt failed with HTTP 403")
    assert "Next step: give the HQ user that this connection's client id maps to" in message
    assert "a role with Read access to data entity Prospects" in message

    admin.security(client_id=client_id, system="dataverse", application_user=False)
    status, message = form_test(monkeypatch, "d365_sales", **service(world, "d365_sales"))
    assert not status
    assert message.startswith("Dataverse (Sales): WhoAmI failed with HTTP 403 0x80072560")
    assert "has no application user in this Dataverse environment: add one" in message


def test_a_commerce_connection_without_legal_entities_fails_the_test_naming_the_field(world, admin, monkeypatch):
    status, message = form_test(monkeypatch, "d365_commerce", **service(world, "d365_commerce", legal_entities=None))
    assert (status, message) == (False, 'Commerce headquarters: the connection names no legal entities. Next step: '
                                        'set its Legal entities (extra "legal_entities"), e.g. "usrt, usmf".')  # fmt: skip


def test_a_field_out_of_range_fails_the_test_naming_the_field(world, monkeypatch):
    status, message = form_test(monkeypatch, "d365_sales", **service(world, "d365_sales", page_size=0))
    assert not status
    assert message.startswith("The connection is not usable: extra.page_size: Input should be greater than or equal "
                              "to 1.")  # fmt: skip


def test_the_state_store_test_connects_and_says_whether_the_store_is_there(monkeypatch, tmp_path):
    from b2b_onboarding.store.state import StateStore

    path = tmp_path / "state.db"
    fields = {"schema": str(path), "extra": json.dumps({"driver": "sqlite"})}
    assert form_test(monkeypatch, "d365_state", **fields) == (
        True, f"B2B onboarding state store at sqlite:///{path}: connected; no store yet: the first task creates its "
              "tables.")  # fmt: skip
    StateStore(f"sqlite:///{path}").close()
    assert form_test(monkeypatch, "d365_state", **fields)[1].endswith("connected; the store's tables are there.")


def test_the_state_store_test_names_what_failed_never_the_password(monkeypatch, tmp_path):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    secret = "state-store-password-0123"
    status, message = form_test(monkeypatch, "d365_state", host="127.0.0.1", port=closed, login="b2b",
                             password=secret, schema="b2b_state", extra=json.dumps({"driver": "postgresql+psycopg2"}))  # fmt: skip
    assert not status and secret not in message
    assert message.startswith("B2B onboarding state store at postgresql+psycopg2://b2b:***@127.0.0.1:")
    assert message.endswith("Next step: check the connection's Driver, Host, Port, User, Password and Database.")
    status, message = form_test(monkeypatch, "d365_state", schema=str(tmp_path / "state.db"))
    assert (status, message) == (False, 'The connection (B2B onboarding state store) names no driver. Next step: set '
                                        'its Driver (extra "driver"), e.g. postgresql+psycopg2, or sqlite with '
                                        "Database (schema) the file's path.")  # fmt: skip


@pytest.mark.parametrize(("hook", "conn_id"), [(CommerceHook, "d365_commerce"), (SalesHook, "d365_sales")])
def test_a_connection_of_the_new_type_reads_as_the_generic_one_with_the_same_extra(monkeypatch, hook, conn_id):
    """The JSON and environment variables written before the connection types (conn_type `generic`,
    lists and numbers in the extra) and a connection the form saved (its type, text, nulls) make the
    same settings."""
    before = {"tenant_id": "t-1", "ca_bundle": None, "page_size": 100, "bulk": False, "max_concurrency": 3,
              "legal_entities": ["usrt", "usmf"], "customer_group": "10"}  # fmt: skip
    before = {name: value for name, value in before.items()
              if name in TYPES[conn_id]["conn-fields"] and value is not None}  # fmt: skip
    form = {name: None for name in TYPES[conn_id]["conn-fields"]} | before
    if "legal_entities" in form:
        form["legal_entities"] = "usrt, usmf"
    common = {"host": "https://contoso.example.com", "login": "app", "password": "s3cret-of-the-app"}
    monkeypatch.setenv("AIRFLOW_CONN_BEFORE", json.dumps({"conn_type": "generic", **common, "extra": before}))
    monkeypatch.setenv("AIRFLOW_CONN_FORM", json.dumps({"conn_type": conn_id, **common, "extra": form}))
    generic, typed = hook("before").settings(), hook("form").settings()
    assert generic.model_copy(update={"conn_id": "form"}) == typed
    assert typed.max_concurrency == 3 and typed.bulk is False


def test_a_state_store_connection_of_the_new_type_reads_as_the_generic_one(monkeypatch):
    common = {"host": "db.internal", "port": 5432, "login": "b2b", "password": "p@ss/word", "schema": "b2b_state",
              "extra": {"driver": "postgresql+psycopg2"}}  # fmt: skip
    monkeypatch.setenv("AIRFLOW_CONN_BEFORE", json.dumps({"conn_type": "generic", **common}))
    monkeypatch.setenv("AIRFLOW_CONN_FORM", json.dumps({"conn_type": "d365_state", **common}))
    assert StateStoreHook("before").url() == StateStoreHook("form").url() == (
        "postgresql+psycopg2://b2b:p%40ss%2Fword@db.internal:5432/b2b_state")  # fmt: skip
