"""Airflow hooks: each turns one Airflow connection into a configured client, and tests it for the
Connections form's Test button.

A connection of the hook's own type (`d365_commerce`, `d365_sales`, `d365_state`: the form's fields,
provider_info.py) and one of conn_type `generic` with the same extra read alike: the hooks read a
connection by its conn_id, whatever its type."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from airflow.sdk import BaseHook
from airflow.sdk.crypto import FernetProtocol, get_fernet
from airflow.sdk.exceptions import AirflowException, AirflowNotFoundException
from airflow.sdk.log import mask_secret
from cryptography.fernet import InvalidToken

from b2b_onboarding import redaction
from b2b_onboarding.clients.auth import TokenCachePersistence, token_provider
from b2b_onboarding.clients.commerce import CommerceClient
from b2b_onboarding.clients.odata import literal
from b2b_onboarding.clients.sales import SalesClient
from b2b_onboarding.clients.settings import ServiceSettings
from b2b_onboarding.errors import ConfigurationError, first_line
from b2b_onboarding.store.state import DryRunStore, StateStore

log = logging.getLogger(__name__)


class _DynamicsHook(BaseHook):
    conn_name_attr = "conn_id"
    default_conn_name: str
    client_class: type[CommerceClient] | type[SalesClient]

    def __init__(self, conn_id: str | None = None) -> None:
        super().__init__()
        self.conn_id = conn_id or self.default_conn_name

    def settings(self) -> ServiceSettings:
        """The connection's settings, with its client secret hidden from every log from here on."""
        return self._settings(self.conn_id)

    def _settings(self, named: str) -> ServiceSettings:
        """The settings of the connection `conn_id`, naming it `named` in every failure."""
        try:
            conn = self.get_connection(self.conn_id)
        except AirflowNotFoundException:
            raise ConfigurationError(
                f"Airflow connection {self.conn_id!r} ({self.hook_name}) is not defined. Next step: add it (README, "
                "Connections), then clear the task."
            ) from None
        hide_from_logs(conn.password)
        return ServiceSettings.from_connection(named, conn.host, conn.login, conn.password, conn.extra_dejson,
                                               port=conn.port)  # fmt: skip

    def get_conn(self) -> CommerceClient | SalesClient:
        return self.client(self.settings())

    def client(self, settings: ServiceSettings) -> CommerceClient | SalesClient:
        """A client of `settings` (as `settings()` read them) whose Entra ID tokens every task and
        trigger shares (`shared_token_cache`)."""
        # The process-wide token provider, which `connect` takes up, now shares its cache.
        token_provider(settings.authority, settings.client_id, settings.client_secret.get_secret_value(),
                       settings.verify, shared_token_cache())  # fmt: skip
        return self.client_class.connect(settings)

    def test_connection(self) -> tuple[bool, str]:
        """Airflow's Test button (and `airflow connections test`): a token from Entra ID, then one cheap
        read the product's security role allows, tried once. The message says what was read or, on a
        failure, what to fix (the failure a task would raise); it names the system, never the conn_id:
        the Connections form tests its values under a random one. It does not set up the shared token
        cache (`client`): a token some task stored says nothing of the secret in the form."""
        try:
            settings = self._settings("").model_copy(update={"max_attempts": 1})
            client = self.client_class.connect(settings)
            try:
                found = self._read_one(client, settings)
            finally:
                client.odata.close()
        except Exception as error:  # noqa: BLE001 - Airflow shows the message; the secret never reaches it
            return False, redaction.redact(first_line(error))
        return True, f"{self.hook_name} at {settings.resource}: a token for client {settings.client_id}; {found}."

    def _read_one(self, client: Any, settings: ServiceSettings) -> str:
        """The test's read, and what it found."""
        raise NotImplementedError


def hide_from_logs(*secrets: str | None) -> None:
    """Airflow's masker (task logs, in the task and its supervisor) and the product's own filter
    (the product's, MSAL's and httpx's loggers) both learn each secret before any client holds it; one
    shorter than `redaction.MIN_SECRET_LENGTH` is too short to hide without hiding ordinary words.

    The Task SDK already masks a connection's password when it reads the connection (its
    `_mask_connection_secrets`); masking it here too keeps that true however the connection was read."""
    for secret in secrets:
        if secret and len(secret) >= redaction.MIN_SECRET_LENGTH:
            mask_secret(secret)
            redaction.register_secret(secret)
    redaction.install()


class CommerceHook(_DynamicsHook):
    """`d365_commerce`: Commerce headquarters (Finance and Operations OData)."""

    conn_type = "d365_commerce"
    default_conn_name = "d365_commerce"
    hook_name = "Dynamics 365 Commerce headquarters"
    client_class = CommerceClient

    def _read_one(self, client: CommerceClient, settings: ServiceSettings) -> str:
        """One prospect of the first legal entity: what each sync reads first."""
        if not settings.legal_entities:
            raise ConfigurationError(
                "Commerce headquarters: the connection names no legal entities. Next step: set its Legal entities "
                '(extra "legal_entities"), e.g. "usrt, usmf".'
            )
        legal_entity = settings.legal_entities[0]
        client.odata.get("Prospects", operation="read Prospects", record=f"legal entity {legal_entity}",
                         params={"cross-company": "true", "$filter": f"dataAreaId eq {literal(legal_entity)}",
                                 "$top": "1", "$select": "ProspectId"})  # fmt: skip
        return f"Prospects of legal entity {legal_entity} are readable"


class SalesHook(_DynamicsHook):
    """`d365_sales`: Dynamics 365 Sales (Dataverse Web API)."""

    conn_type = "d365_sales"
    default_conn_name = "d365_sales"
    hook_name = "Dynamics 365 Sales (Dataverse)"
    client_class = SalesClient

    def _read_one(self, client: SalesClient, settings: ServiceSettings) -> str:
        """WhoAmI: the app registration has an enabled application user in the environment."""
        me = client.whoami()
        return f"WhoAmI: application user {me['UserId']} of organization {me['OrganizationId']}"


class FernetTokenCaches:
    """MSAL's token caches in the state store, encrypted with Airflow's Fernet key (a `TokenCachePersistence`):
    the store, its backups and its logs never hold a token in clear."""

    def __init__(self, store: StateStore, fernet: FernetProtocol) -> None:
        self._store = store
        self._fernet = fernet

    def load(self, name: str) -> str | None:
        found = self._store.token_cache(name)
        if found is None:
            return None
        try:
            return self._fernet.decrypt(found[0].encode()).decode()
        except InvalidToken:  # saved under another Fernet key: the provider ignores it and saves over it
            raise ValueError("it is not encrypted with this Airflow's Fernet key") from None

    def save(self, name: str, serialized: str) -> None:
        self._store.save_token_cache(name, self._fernet.encrypt(serialized.encode()).decode())


# This process's shared token caches, by state store URL: None where tokens stay in the process.
_token_caches: dict[str, FernetTokenCaches | None] = {}


def shared_token_cache() -> TokenCachePersistence | None:
    """Where Entra ID tokens are shared by every task and trigger: the state store of `d365_state`,
    encrypted with Airflow's Fernet key. Without a usable Fernet key, None (each process keeps its
    tokens in memory; said once): a token is never stored in clear."""
    hook = StateStoreHook()
    url = hook.url()
    if url not in _token_caches:
        try:
            fernet = get_fernet()
            reason = None if fernet.is_encrypted else "Airflow has no Fernet key ([core] fernet_key)"
        except AirflowException as error:  # a key that is not one: Airflow's message never holds the key
            reason = f"Airflow's Fernet key is not usable: {error}"
        if reason is None:
            _token_caches[url] = FernetTokenCaches(hook.get_conn(), fernet)
        else:
            log.warning("Entra ID tokens stay in this process, not shared with the other tasks and triggers: %s, and "
                        "tokens are never stored unencrypted. Next step: set [core] fernet_key, the same on every "
                        "Airflow machine.", reason)  # fmt: skip
            _token_caches[url] = None
    return _token_caches[url]


# Connection types that name no SQLAlchemy driver; any other one (a URI's scheme: `sqlite://...`) does.
_NOT_A_DRIVER = ("generic", "d365_state")


class StateStoreHook(BaseHook):
    """`d365_state`: the state store's database. Without that connection, a SQLite file in AIRFLOW_HOME.

    The connection's fields make the SQLAlchemy URL: extra `driver` (e.g. `postgresql+psycopg2`),
    host, port, login, password, and schema (the database name, or the SQLite file path).
    """

    conn_name_attr = "conn_id"
    default_conn_name = "d365_state"
    conn_type = "d365_state"
    hook_name = "B2B onboarding state store"

    def __init__(self, conn_id: str | None = None) -> None:
        super().__init__()
        self.conn_id = conn_id or self.default_conn_name

    def url(self) -> str:
        try:
            conn = self.get_connection(self.conn_id)
        except AirflowNotFoundException:
            home = Path(os.environ.get("AIRFLOW_HOME", Path.home() / "airflow"))
            return f"sqlite:///{home / 'b2b_onboarding_state.db'}"
        return _store_url(conn, f"Airflow connection {self.conn_id!r}")

    def get_conn(self, dry_run_of: str | None = None) -> StateStore:
        """The store, migrated to this code's schema (`StateStore`); for `dry_run_of` (a run id), that dry
        run's view of it. A store that a newer release migrated fails naming this connection."""
        url = self.url()
        try:
            return DryRunStore(url, dry_run_of) if dry_run_of else StateStore(url)
        except ConfigurationError as error:
            raise ConfigurationError(f"Airflow connection {self.conn_id!r} ({self.hook_name}): {error}") from None

    def test_connection(self) -> tuple[bool, str]:
        """Airflow's Test button: connects and asks the database for `SELECT 1`, writing nothing but
        what connecting to a new SQLite file creates. Names the database, never the password."""
        import sqlalchemy as sa

        where = self.hook_name
        try:
            conn = self.get_connection(self.conn_id)
            redaction.register_secret(conn.password)
            url = sa.make_url(_store_url(conn, "The connection"))
            where = f"{self.hook_name} at {url.render_as_string(hide_password=True)}"
            engine = sa.create_engine(url)
            try:
                with engine.connect() as connection:
                    connection.execute(sa.text("SELECT 1"))
                    tables = sa.inspect(connection).has_table("b2b_prospects")
            finally:
                engine.dispose()
        except ConfigurationError as error:
            return False, first_line(error)
        except Exception as error:  # noqa: BLE001 - Airflow shows the message; the password never reaches it
            return False, redaction.redact(f"{where}: {first_line(error).rstrip('.')}. Next step: check the "
                                           "connection's Driver, Host, Port, User, Password and Database.")  # fmt: skip
        found = "the store's tables are there" if tables else "no store yet: the first task creates its tables"
        return True, f"{where}: connected; {found}."


def _store_url(conn: Any, named: str) -> str:
    """The SQLAlchemy URL of a state store connection; a ConfigurationError naming it `named` when it
    names no driver."""
    import sqlalchemy as sa

    driver = conn.extra_dejson.get("driver") or (conn.conn_type if conn.conn_type not in _NOT_A_DRIVER else None)
    if not driver:
        raise ConfigurationError(
            f'{named} ({StateStoreHook.hook_name}) names no driver. Next step: set its Driver (extra "driver"), '
            "e.g. postgresql+psycopg2, or sqlite with Database (schema) the file's path."
        )
    return sa.URL.create(
        drivername=driver,
        username=conn.login or None,
        password=conn.password or None,
        host=conn.host or None,
        port=conn.port or None,
        database=conn.schema or None,
    ).render_as_string(hide_password=False)
