"""The preflight from a shell, with the connections Airflow resolves (flow.preflight has the checks):

    python -m b2b_onboarding.airflow.preflight [--commerce-conn d365_commerce] [--sales-conn d365_sales]

prints the table and exits 0 when every check passed, 1 when one failed (2: wrong arguments). The
DAG `b2b_preflight` runs the same checks (`tasks.run_preflight`).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from b2b_onboarding import errors, redaction
from b2b_onboarding.clients.settings import ServiceSettings
from b2b_onboarding.flow.preflight import Preflight, failed, table, verdict


def airflow_connection_settings(conn_id: str) -> ServiceSettings:
    """A connection as Airflow resolves it outside a task: its secrets backend, `AIRFLOW_CONN_*`
    variables, then its metadata database."""
    from airflow.exceptions import AirflowNotFoundException
    from airflow.models.connection import Connection

    try:
        conn = Connection.get_connection_from_secrets(conn_id)
    except AirflowNotFoundException:
        raise errors.ConfigurationError(
            f"Airflow connection {conn_id!r} is not defined. Next step: add it (README, Connections)."
        ) from None
    redaction.register_secret(conn.password)
    return ServiceSettings.from_connection(conn_id, conn.host, conn.login, conn.password, conn.extra_dejson,
                                           port=conn.port)  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m b2b_onboarding.airflow.preflight",
                                     description="The read-only preflight of a tenant (README, Before the first run).")  # fmt: skip
    parser.add_argument("--commerce-conn", default="d365_commerce", help="Airflow connection of Commerce HQ")
    parser.add_argument("--sales-conn", default="d365_sales", help="Airflow connection of Dynamics 365 Sales")
    args = parser.parse_args(argv)
    # Airflow's notes on reading a connection (no Fernet key, a value too short to mask, a connection type
    # with "_" in a URI) would head the table: its log level is read when Airflow is first imported, below.
    os.environ["AIRFLOW__LOGGING__LOGGING_LEVEL"] = "ERROR"
    redaction.install()
    rows = Preflight(lambda: airflow_connection_settings(args.commerce_conn),
                     lambda: airflow_connection_settings(args.sales_conn)).run()  # fmt: skip
    print(table(rows))
    print(verdict(rows))
    return 1 if failed(rows) else 0


if __name__ == "__main__":
    sys.exit(main())
