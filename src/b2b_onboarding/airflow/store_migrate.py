"""Upgrades the state store of an Airflow connection to this release's schema (README, "The state store").

    python -m b2b_onboarding.airflow.store_migrate [--conn-id d365_state]

Compose's airflow-init runs it on every `up`; run it after installing a new release elsewhere. A
task that finds its store behind upgrades it too. Prints the revision it found and the one it left;
a failure exits 1 with one line saying what to do.
"""

from __future__ import annotations

import argparse
import sys

import sqlalchemy as sa

from b2b_onboarding.airflow.hooks import StateStoreHook
from b2b_onboarding.errors import ConfigurationError, first_line
from b2b_onboarding.store.state import upgrade


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m b2b_onboarding.airflow.store_migrate",
                                     description=__doc__.splitlines()[0])  # fmt: skip
    parser.add_argument("--conn-id", default=StateStoreHook.default_conn_name,
                        help="the Airflow connection of the state store (default: %(default)s)")  # fmt: skip
    conn_id = parser.parse_args(argv).conn_id
    url = StateStoreHook(conn_id).url()
    subject = f"Airflow connection {conn_id!r}: state store {sa.make_url(url).render_as_string(hide_password=True)}"
    try:
        done = upgrade(url)
    except ConfigurationError as error:
        print(f"Airflow connection {conn_id!r}: {error}", file=sys.stderr)
        return 1
    except sa.exc.SQLAlchemyError as error:
        print(f"{subject}: the upgrade failed: {first_line(error)}. Next step: check the connection's host, port, "
              "login, password and schema (the database), and that the database exists, then run this again.",
              file=sys.stderr)  # fmt: skip
        return 1
    print(f"{subject}: {done}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
