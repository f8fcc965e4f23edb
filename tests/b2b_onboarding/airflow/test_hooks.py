import json

import pytest
from airflow.sdk.exceptions import AirflowFailException

from b2b_onboarding.airflow.hooks import CommerceHook, SalesHook, StateStoreHook
from b2b_onboarding.errors import ConfigurationError


def test_state_store_url_is_built_from_the_connection_fields(monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_D365_STATE", json.dumps({
        "conn_type": "generic", "host": "db.internal", "port": 5432, "login": "b2b", "password": "p@ss/word",
        "schema": "b2b_state", "extra": {"driver": "postgresql+psycopg2"}}))  # fmt: skip
    assert StateStoreHook().url() == "postgresql+psycopg2://b2b:p%40ss%2Fword@db.internal:5432/b2b_state"


def test_without_a_state_connection_the_store_is_a_sqlite_file_in_airflow_home(monkeypatch, tmp_path):
    monkeypatch.delenv("AIRFLOW_CONN_D365_STATE", raising=False)
    monkeypatch.setenv("AIRFLOW_HOME", str(tmp_path))
    assert StateStoreHook().url() == f"sqlite:///{tmp_path / 'b2b_onboarding_state.db'}"


def test_service_hooks_read_their_own_connection(monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_D365_SALES", json.dumps({
        "conn_type": "generic", "host": "contoso.crm.dynamics.com", "login": "app", "password": "s",
        "extra": {"tenant_id": "t-1", "page_size": 100}}))  # fmt: skip
    settings = SalesHook().settings()
    assert settings.conn_id == "d365_sales" and settings.resource == "https://contoso.crm.dynamics.com"
    assert settings.page_size == 100


def test_a_connection_with_a_bad_field_fails_before_any_call(monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_D365_COMMERCE", json.dumps({
        "conn_type": "generic", "host": "https://contoso.operations.dynamics.com", "login": "app",
        "password": "s", "extra": {"tenant_id": "t-1", "page_size": 0}}))  # fmt: skip
    with pytest.raises(ConfigurationError, match="extra.page_size"):
        CommerceHook().settings()


def test_a_commerce_connection_without_legal_entities_says_how_to_fix_it(monkeypatch):
    from b2b_onboarding.airflow import tasks

    monkeypatch.setenv("AIRFLOW_CONN_D365_COMMERCE", json.dumps({
        "conn_type": "generic", "host": "https://contoso.operations.dynamics.com", "login": "app",
        "password": "s", "extra": {"tenant_id": "t-1"}}))  # fmt: skip
    # a task fails at once, without retries, on what no retry can fix
    with pytest.raises(AirflowFailException, match='names no legal entities.*"legal_entities"') as failed:
        tasks.legal_entities()
    assert isinstance(failed.value.__cause__, ConfigurationError)


def test_a_missing_connection_is_named_with_what_to_do(monkeypatch):
    monkeypatch.delenv("AIRFLOW_CONN_D365_SALES", raising=False)
    with pytest.raises(ConfigurationError, match=r"^Airflow connection 'd365_sales' \(Dynamics 365 Sales \(Dataverse\)\) "
                                                 r"is not defined\. Next step: add it"):  # fmt: skip
        SalesHook().settings()


@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry run"])
@pytest.mark.parametrize("group", [None, "", "  "], ids=["unset", "empty", "blank"])
def test_writing_customers_without_a_customer_group_fails_at_once_naming_the_connection(monkeypatch, dry_run, group):
    """HQ refuses every customer without a customer group: the task fails before any call, without
    retries, in a dry run alike; the Sales connection needs none."""
    from b2b_onboarding.airflow import tasks

    extra = {"tenant_id": "t-1", "legal_entities": ["usrt"]} | ({} if group is None else {"customer_group": group})
    monkeypatch.setenv("AIRFLOW_CONN_D365_COMMERCE", json.dumps({
        "conn_type": "generic", "host": "https://contoso.operations.dynamics.com", "login": "app", "password": "s",
        "extra": extra}))  # fmt: skip
    monkeypatch.setenv("AIRFLOW_CONN_D365_SALES", json.dumps({
        "conn_type": "generic", "host": "https://contoso.crm.dynamics.com", "login": "app", "password": "s",
        "extra": {"tenant_id": "t-1"}}))  # fmt: skip
    monkeypatch.setattr(tasks, "_context", lambda: {"params": {"dry_run": dry_run}, "run_id": "manual__test"})
    assert SalesHook().settings().customer_group is None
    with pytest.raises(AirflowFailException) as failed:
        tasks.write_customers("usrt", "P-000001", "P-000009")
    assert str(failed.value) == (
        "Commerce headquarters via Airflow connection 'd365_commerce': no customer group configured: HQ requires one "
        'for every new customer. Next step: set the connection\'s extra "customer_group" to a customer group of each '
        'legal entity (e.g. "10"), then clear the task.'
    )
    assert isinstance(failed.value.__cause__, ConfigurationError)


def test_a_customer_group_is_read_trimmed(monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_D365_COMMERCE", json.dumps({
        "conn_type": "generic", "host": "https://contoso.operations.dynamics.com", "login": "app", "password": "s",
        "extra": {"tenant_id": "t-1", "customer_group": " 10 "}}))  # fmt: skip
    assert CommerceHook().settings().customer_group == "10"


def test_a_state_store_connection_without_a_driver_is_named_with_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setenv("AIRFLOW_CONN_D365_STATE", json.dumps({"conn_type": "d365_state", "schema": str(tmp_path)}))
    with pytest.raises(ConfigurationError, match=r"^Airflow connection 'd365_state' \(B2B onboarding state store\) "
                                                 r'names no driver\. Next step: set its Driver \(extra "driver"\)'):  # fmt: skip
        StateStoreHook().url()


def test_a_state_store_a_newer_release_migrated_fails_naming_the_connection(monkeypatch, tmp_path):
    import sqlalchemy as sa

    from b2b_onboarding.store import migrations
    from b2b_onboarding.store.state import StateStore

    path = tmp_path / "state.db"
    StateStore(f"sqlite:///{path}").close()
    engine = sa.create_engine(f"sqlite:///{path}")
    with engine.begin() as connection:
        connection.execute(sa.text(f"UPDATE {migrations.VERSION_TABLE} SET version_num = '0099_newer'"))
    engine.dispose()
    monkeypatch.setenv("AIRFLOW_CONN_D365_STATE", json.dumps({"conn_type": "d365_state", "schema": str(path),
                                                              "extra": {"driver": "sqlite"}}))  # fmt: skip

    with pytest.raises(ConfigurationError) as refused:
        StateStoreHook().get_conn()

    first_line = str(refused.value).splitlines()[0]
    assert first_line.startswith("Airflow connection 'd365_state' (B2B onboarding state store): State store sqlite:///")
    assert "revision 0099_newer, which this code does not know" in first_line and "Next step: install" in first_line
