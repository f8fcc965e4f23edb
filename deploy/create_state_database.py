"""Create the state store's PostgreSQL database if it does not exist (airflow-init, every `up`).

The database is the `d365_state` connection's schema, on the same server and with the same login;
airflow-init then migrates it to the package's schema (`python -m b2b_onboarding.airflow.store_migrate`).
Run inside an Airflow container: the URL is the one the product will use (`StateStoreHook.url`), so
the connection is read the same way.
"""

from __future__ import annotations

import sqlalchemy as sa

from b2b_onboarding.airflow.hooks import StateStoreHook

MAINTENANCE_DATABASE = "postgres"  # exists on every PostgreSQL server


def main() -> None:
    url = sa.make_url(StateStoreHook().url())
    if not url.drivername.startswith("postgresql"):
        print(f"state store on {url.drivername}: nothing to create")
        return
    # CREATE DATABASE cannot run in a transaction: autocommit.
    engine = sa.create_engine(url.set(database=MAINTENANCE_DATABASE), isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        exists = connection.execute(
            sa.text("SELECT 1 FROM pg_database WHERE datname = :name"), {"name": url.database}
        ).scalar()
        if exists:
            print(f"state store database {url.database} exists")
        else:
            name = connection.dialect.identifier_preparer.quote(url.database)
            connection.execute(sa.text(f"CREATE DATABASE {name}"))
            print(f"state store database {url.database} created")
    engine.dispose()


if __name__ == "__main__":
    main()
