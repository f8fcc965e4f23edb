"""What Airflow's providers manager reads of this package (entry point `apache_airflow_provider`):
the connection types with their form fields, the notifier. Plain data: Airflow reads it in every
process, without importing the hooks.

The form's fields are the options `clients.settings.ServiceSettings` accepts (tests check they stay
so). Airflow's Connections form keeps each in the connection's extra under its own name, as
connections written as JSON or environment variables do: both shapes read alike."""

from __future__ import annotations

from importlib.metadata import version

DISTRIBUTION = "airflow-provider-d365-b2b-onboarding"
# A string field (`type` null: the form may leave it empty), an integer or a switch.
_TEXT = {"type": ["string", "null"]}


def _integer(minimum: int, maximum: int | None = None) -> dict:
    return {"type": ["integer", "null"], "minimum": minimum} | ({"maximum": maximum} if maximum else {})


def _field(label: str, description: str, schema: dict = _TEXT) -> dict:
    return {"label": label, "description": description, "schema": schema}


# Signing in to Entra ID and reaching the service: the fields the Commerce and Sales connections share.
_SIGN_IN_FIELDS = {
    "tenant_id": _field("Tenant ID", "The Entra ID tenant (directory) id of the app registration: the token comes "
                        "from https://login.microsoftonline.com/<tenant ID>. Or set Authority instead."),
    "authority": _field("Authority", "Instead of Tenant ID: the full authority URL (https), e.g. "
                        "https://login.microsoftonline.com/<tenant ID>."),
    "ca_bundle": _field("CA bundle", "Optional: the path, on the workers and the api-server, of a PEM file of the CAs "
                        "to trust (the fakes: <state_dir>/ca.pem). Empty: the system trust store. TLS is always "
                        "verified."),
    "timeout_s": _field("Timeout (s)", "HTTP timeout per request, default 60.", {"type": ["number", "null"],
                                                                                  "exclusiveMinimum": 0}),
}  # fmt: skip
_REQUEST_FIELDS = {
    "max_concurrency": _field("Max concurrency", "Requests one task keeps in flight, default 4 (README, "
                              "Performance).", _integer(1, 52)),
    "max_attempts": _field("Max attempts", "Attempts per request for transient failures (429, 5xx, timeouts, "
                           "resets), default 6.", _integer(1, 20)),
    "retry_budget": _field("Retry budget", "Retries one task may spend per system beyond a fifth of its requests, "
                           "default 20 (README, Reliability).", _integer(0)),
}  # fmt: skip
_BULK_SCHEMA = {"type": ["boolean", "null"], "default": True}

# Host, login and password as the app registration names them; schema and port unused (the
# Environment URL carries any port).
_SERVICE_FIELDS = {"hidden-fields": ["schema", "port"],
                   "relabeling": {"host": "Environment URL", "login": "Client ID", "password": "Client secret"}}  # fmt: skip
_CLIENT_ID = "the application (client) ID of the app registration in Entra ID"

COMMERCE = {
    "hook-class-name": "b2b_onboarding.airflow.hooks.CommerceHook",
    "hook-name": "Dynamics 365 Commerce headquarters",
    "connection-type": "d365_commerce",
    "ui-field-behaviour": _SERVICE_FIELDS | {"placeholders": {
        "host": "https://contoso.operations.dynamics.com", "login": _CLIENT_ID,
        "password": "its client secret"}},  # fmt: skip
    "conn-fields": {
        **_SIGN_IN_FIELDS,
        "legal_entities": _field("Legal entities", "The legal entities (dataAreaId) to onboard, comma-separated, e.g. "
                                 "usrt, usmf."),
        "customer_group": _field("Customer group", "Required: the customer group (CustomerGroupId) of new customers, "
                                 "e.g. 10; it must exist in every legal entity above."),
        "customer_account_template": _field("Customer account template", "Optional: new customers' accounts from "
                                            "{legal_entity}, {prospect_id} and {role}, e.g. "
                                            "{legal_entity}-{prospect_id}-{role}. Empty: HQ's number sequence numbers "
                                            "them."),
        "bulk": _field("Bulk writes", "$batch changesets; off: one request per record (the benchmark's baseline).",
                       _BULK_SCHEMA),
        "batch_size": _field("Batch size", "Changesets per $batch request, default 100.", _integer(1, 1000)),
        **_REQUEST_FIELDS,
    },  # fmt: skip
}
SALES = {
    "hook-class-name": "b2b_onboarding.airflow.hooks.SalesHook",
    "hook-name": "Dynamics 365 Sales (Dataverse)",
    "connection-type": "d365_sales",
    "ui-field-behaviour": _SERVICE_FIELDS | {"placeholders": {
        "host": "https://contoso.crm.dynamics.com", "login": _CLIENT_ID, "password": "its client secret"}},  # fmt: skip
    "conn-fields": {
        **_SIGN_IN_FIELDS,
        "page_size": _field("Page size", "Rows per page of a read (Prefer: odata.maxpagesize), default and maximum "
                            "5000.", _integer(1, 5000)),
        "bulk": _field("Bulk writes", "UpsertMultiple and UpdateMultiple; off: one request per record (the "
                       "benchmark's baseline).", _BULK_SCHEMA),
        "batch_size": _field("Batch size", "Targets per UpsertMultiple or UpdateMultiple, default 1000.",
                             _integer(1, 1000)),
        "change_tracking": _field("Change tracking", "Read the sellers' outcomes with delta links; off: read every "
                                  "decided lead each night.", {"type": ["boolean", "null"], "default": True}),
        **_REQUEST_FIELDS,
    },  # fmt: skip
}
STATE_STORE = {
    "hook-class-name": "b2b_onboarding.airflow.hooks.StateStoreHook",
    "hook-name": "B2B onboarding state store",
    "connection-type": "d365_state",
    "ui-field-behaviour": {
        "hidden-fields": [],
        "relabeling": {"schema": "Database", "login": "User"},
        "placeholders": {"host": "the database server; empty for SQLite", "port": "5432",
                         "schema": "the database name, e.g. b2b_state; for SQLite the file's path", "login": "b2b"},
    },  # fmt: skip
    "conn-fields": {
        "driver": _field("Driver", "The SQLAlchemy driver: postgresql+psycopg2, or sqlite (Database is then the file's "
                         "path).", {"type": ["string", "null"], "examples": ["postgresql+psycopg2", "sqlite"]}),
    },  # fmt: skip
}

# `[d365_b2b_onboarding]` in airflow.cfg, or AIRFLOW__D365_B2B_ONBOARDING__<OPTION>: how the DAGs are
# scheduled (airflow/schedules.py reads it when a DAG file is parsed).
CONFIG_SECTION = "d365_b2b_onboarding"
_CRON_EXAMPLE = "*/15 * * * *"


def _option(description: str, default: str, example: str, option_type: str = "string") -> dict:
    return {"description": description, "version_added": "0.16.0", "type": option_type, "example": example,
            "default": default}  # fmt: skip


CONFIG = {
    CONFIG_SECTION: {
        "description": "Scheduling of the B2B onboarding DAGs (README, The DAGs).",
        "options": {
            "scheduling": _option(
                "events: the triggerer watches Commerce HQ and Dataverse and starts b2b_prospect_sync (with an "
                "hourly safety net) and b2b_outcomes as soon as there is work; time: both run on the crons below. "
                "b2b_outcome_reconciliation runs nightly either way.", "events", "time"),
            "poll_interval_s": _option(
                "Seconds between two looks of each event trigger (events mode): one request to HQ and two to "
                "Dataverse a look when idle.", "30", "60", "float"),
            "sync_schedule": _option("The cron of b2b_prospect_sync in time mode.", "*/15 * * * *", _CRON_EXAMPLE),
            "outcomes_schedule": _option("The cron of b2b_outcomes in time mode.", "*/15 * * * *", _CRON_EXAMPLE),
            "reconciliation_schedule": _option("The cron of b2b_outcome_reconciliation, in both modes.",
                                               "0 2 * * *", "30 1 * * *"),
        },
    },
}  # fmt: skip


def get_provider_info() -> dict:
    return {
        "package-name": DISTRIBUTION,
        "name": "Dynamics 365 B2B onboarding",
        "description": "Dynamics 365 Commerce B2B partner onboarding through Dynamics 365 Sales.",
        "versions": [version(DISTRIBUTION)],  # pyproject.toml's, as installed
        "connection-types": [COMMERCE, SALES, STATE_STORE],
        # What the onboarding DAGs do when a task fails for good; a DAG of your own can do the same.
        "notifications": ["b2b_onboarding.airflow.notifier.TaskFailureNotifier"],
        # The event triggers the DAGs' asset watchers run in the triggerer (scheduling = events).
        "triggers": [{"integration-name": "Dynamics 365 B2B onboarding",
                      "python-modules": ["b2b_onboarding.airflow.triggers"]}],  # fmt: skip
        "config": CONFIG,
    }
