"""What a `d365_commerce` or `d365_sales` connection must hold, checked before any call is made."""

from __future__ import annotations

from typing import Any

import pydantic
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from b2b_onboarding.errors import ConfigurationError

MICROSOFT_AUTHORITY = "https://login.microsoftonline.com"
# Attempts per request for transient failures, and retries per task beyond a fifth of its requests.
DEFAULT_MAX_ATTEMPTS = 6
DEFAULT_RETRY_BUDGET = 20


class ServiceSettings(BaseModel):
    """One system's connection: host = the environment URL (the token's resource), login = client id,
    password = client secret, extra = authority or tenant_id, ca_bundle, and per-system options."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # The Airflow connection, named in every failure; "" for one that has no name of its own (Airflow's
    # Test button tests the form's values under a random conn_id).
    conn_id: str
    resource: str
    client_id: str = Field(min_length=1)
    client_secret: SecretStr
    authority: str
    ca_bundle: str | None = None
    timeout_s: float = Field(default=60.0, gt=0)
    legal_entities: tuple[str, ...] = ()
    # Commerce: the customer group of new customers, which HQ requires (`commerce.required_customer_group`
    # fails a task that writes customers without it); a customer group of every legal entity.
    customer_group: str | None = None
    # Commerce: the customer accounts of new customers. None: HQ's number sequence numbers them (the
    # default); else a template of `{legal_entity}`, `{prospect_id}` and `{role}` (ORG or ADM).
    customer_account_template: str | None = None
    page_size: int = Field(default=5000, ge=1, le=5000)
    # Bulk writes (Sales: UpsertMultiple/UpdateMultiple; Commerce: $batch changesets) and change
    # tracking; `false` is the one-request-per-record mode, kept as the benchmark's baseline.
    bulk: bool = True
    batch_size: int | None = Field(default=None, ge=1, le=1000)
    change_tracking: bool = True
    max_attempts: int = Field(default=DEFAULT_MAX_ATTEMPTS, ge=1, le=20)
    retry_budget: int = Field(default=DEFAULT_RETRY_BUDGET, ge=0)
    # Requests one task keeps in flight: with the Airflow pool's slots, what this client may send at once.
    max_concurrency: int = Field(default=4, ge=1, le=52)

    @field_validator("resource", "authority")
    @classmethod
    def _https(cls, url: str) -> str:
        if not url.startswith("https://"):
            raise ValueError(f"must be an https URL, got {url!r}")
        return url.rstrip("/")

    @field_validator("client_secret")
    @classmethod
    def _secret_present(cls, secret: SecretStr) -> SecretStr:
        if not secret.get_secret_value():
            raise ValueError("is empty")
        return secret

    @field_validator("ca_bundle")
    @classmethod
    def _ca_bundle_readable(cls, path: str | None) -> str | None:
        """A CA bundle that is missing or not PEM would otherwise surface as a TLS failure at the first call."""
        if not path:
            return None
        import ssl
        from pathlib import Path

        if Path(path).is_dir():  # a c_rehash'd directory of CA certificates, as OpenSSL's capath
            return path
        if not Path(path).is_file():
            raise ValueError(f"the CA bundle file {path} does not exist")
        try:
            ssl.create_default_context(cafile=path)
        except (ssl.SSLError, OSError, ValueError) as error:
            raise ValueError(f"the CA bundle file {path} holds no readable PEM certificate ({error})") from None
        return path

    @field_validator("customer_group")
    @classmethod
    def _group(cls, group: str | None) -> str | None:
        return (group or "").strip() or None

    @field_validator("customer_account_template")
    @classmethod
    def _template(cls, template: str | None) -> str | None:
        """A template must tell legal entities, prospects and the two customers of one apart: account
        numbers are per legal entity in HQ but one column (`accountnumber`) in Sales."""
        if not template:
            return None
        missing = [name for name in ("{legal_entity}", "{prospect_id}", "{role}") if name not in template]
        if missing:
            raise ValueError(f"must hold {', '.join(missing)} (e.g. '{{legal_entity}}-{{prospect_id}}-{{role}}'), got {template!r}")
        try:
            template.format(legal_entity="", prospect_id="", role="")
        except (KeyError, IndexError, ValueError) as error:
            raise ValueError(f"{template!r} is not a template of {{legal_entity}}, {{prospect_id}} and {{role}} ({error})") from None
        return template

    @field_validator("legal_entities", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        return [part.strip() for part in value.split(",") if part.strip()] if isinstance(value, str) else value

    @property
    def scope(self) -> str:
        return f"{self.resource}/.default"

    @property
    def verify(self) -> str | bool:
        """A CA bundle path, or the system's trust store; never off."""
        return self.ca_bundle or True

    @classmethod
    def from_connection(
        cls,
        conn_id: str,
        host: str | None,
        login: str | None,
        password: str | None,
        extra: dict[str, Any],
        port: int | None = None,
    ) -> ServiceSettings:
        """From an Airflow connection's fields; a host without a scheme means https. An option left
        empty (null or "": what the Connections form saves for a field not filled in) takes its default."""
        if host and "://" not in host:
            host = f"https://{host}" + (f":{port}" if port else "")
        extra = {name: value for name, value in extra.items() if value is not None and value != ""}
        tenant_id = extra.pop("tenant_id", None)
        authority = extra.pop("authority", None) or (tenant_id and f"{MICROSOFT_AUTHORITY}/{tenant_id}")
        fields = {
            "conn_id": conn_id,
            "resource": host or "",
            "client_id": login or "",
            "client_secret": password or "",
            "authority": authority or "",
            **extra,
        }
        try:
            return cls.model_validate(fields)
        except pydantic.ValidationError as error:
            names = {"resource": "host", "client_id": "login", "client_secret": "password",
                     "authority": "extra.authority or extra.tenant_id"}  # fmt: skip
            problems = "; ".join(
                f"{names.get(str(e['loc'][0]), 'extra.' + str(e['loc'][0]))}: {e['msg']}" for e in error.errors()
            )
            connection = f"Airflow connection {conn_id!r}" if conn_id else "The connection"
            raise ConfigurationError(
                f"{connection} is not usable: {problems}. Next step: fix the connection (README, section Connections)."
            ) from None
