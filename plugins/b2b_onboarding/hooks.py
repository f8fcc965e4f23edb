"""Airflow hooks: each turns one Airflow connection into a configured client, and nothing more."""

from __future__ import annotations

import os
from pathlib import Path

from airflow.sdk import BaseHook
from airflow.sdk.exceptions import AirflowNotFoundException
from airflow.sdk.log import mask_secret

from . import redaction
from .commerce import CommerceClient
from .errors import ConfigurationError
from .sales import SalesClient
from .settings import ServiceSettings
from .store import StateStore


class _DynamicsHook(BaseHook):
    conn_name_attr = "conn_id"
    conn_type = "generic"
    default_conn_name: str
    client_class: type[CommerceClient] | type[SalesClient]

    def __init__(self, conn_id: str | None = None) -> None:
        super().__init__()
        self.conn_id = conn_id or self.default_conn_name

    def settings(self) -> ServiceSettings:
        """The connection's settings, with its client secret hidden from every log from here on."""
        try:
            conn = self.get_connection(self.conn_id)
        except AirflowNotFoundException:
            raise ConfigurationError(
                f"Airflow connection {self.conn_id!r} ({self.hook_name}) is not defined. Next step: add it (README, "
                "Connections), then clear the task."
            ) from None
        _hide_from_logs(conn.password)
        return ServiceSettings.from_connection(
            self.conn_id, conn.host, conn.login, conn.password, conn.extra_dejson, port=conn.port
        )

    def get_conn(self) -> CommerceClient | SalesClient:
        return self.client_class.connect(self.settings())


def _hide_from_logs(secret: str | None) -> None:
    """Airflow's masker (task logs, in the task and its supervisor) and the product's own filter
    (the product's, MSAL's and httpx's loggers) both learn the secret before any client holds it.

    The Task SDK already masks a connection's password when it reads the connection (its
    `_mask_connection_secrets`); masking it here too keeps that true however the connection was read."""
    if secret:
        mask_secret(secret)
        redaction.register_secret(secret)
    redaction.install()


class CommerceHook(_DynamicsHook):
    """`d365_commerce`: Commerce headquarters (Finance and Operations OData)."""

    default_conn_name = "d365_commerce"
    hook_name = "Dynamics 365 Commerce headquarters"
    client_class = CommerceClient


class SalesHook(_DynamicsHook):
    """`d365_sales`: Dynamics 365 Sales (Dataverse Web API)."""

    default_conn_name = "d365_sales"
    hook_name = "Dynamics 365 Sales (Dataverse)"
    client_class = SalesClient


class StateStoreHook(BaseHook):
    """`d365_state`: the state store's database. Without that connection, a SQLite file in AIRFLOW_HOME.

    The connection's fields make the SQLAlchemy URL: extra `driver` (e.g. `postgresql+psycopg2`),
    host, port, login, password, and schema (the database name, or the SQLite file path).
    """

    conn_name_attr = "conn_id"
    default_conn_name = "d365_state"
    conn_type = "generic"
    hook_name = "B2B onboarding state store"

    def __init__(self, conn_id: str | None = None) -> None:
        super().__init__()
        self.conn_id = conn_id or self.default_conn_name

    def url(self) -> str:
        import sqlalchemy as sa

        try:
            conn = self.get_connection(self.conn_id)
        except AirflowNotFoundException:
            home = Path(os.environ.get("AIRFLOW_HOME", Path.home() / "airflow"))
            return f"sqlite:///{home / 'b2b_onboarding_state.db'}"
        return sa.URL.create(
            drivername=conn.extra_dejson.get("driver", conn.conn_type),
            username=conn.login or None,
            password=conn.password or None,
            host=conn.host or None,
            port=conn.port or None,
            database=conn.schema or None,
        ).render_as_string(hide_password=False)

    def get_conn(self) -> StateStore:
        return StateStore(self.url())
