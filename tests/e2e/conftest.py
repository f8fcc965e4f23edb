"""The fakes, the app registrations and the Airflow connections of an end-to-end run."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from d365_fakes.running import Endpoints, running_fakes
from d365_fakes.scenario import Cast

LEGAL_ENTITIES = ["usrt", "usmf"]


@dataclass(frozen=True)
class World:
    endpoints: Endpoints
    cast: Cast
    state_db: Path


def connection_env(endpoints: Endpoints, cast: Cast, state_db: Path) -> dict[str, str]:
    """The three Airflow connections, as `AIRFLOW_CONN_*` JSON (one of the README's ways)."""
    def service(resource: str, extra: dict) -> str:
        return json.dumps({
            "conn_type": "generic", "host": resource, "login": cast.integration["client_id"],
            "password": cast.integration["client_secret"],
            "extra": {"authority": endpoints.authority, "ca_bundle": endpoints.ca_bundle, **extra},
        })  # fmt: skip

    return {
        "AIRFLOW_CONN_D365_COMMERCE": service(endpoints.commerce, {"legal_entities": LEGAL_ENTITIES}),
        "AIRFLOW_CONN_D365_SALES": service(endpoints.dataverse, {"page_size": 10}),
        "AIRFLOW_CONN_D365_STATE": json.dumps({"conn_type": "generic", "schema": str(state_db),
                                               "extra": {"driver": "sqlite"}}),  # fmt: skip
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, airflow_db: Path) -> Iterator[World]:
    directory = tmp_path_factory.mktemp("world")
    cast = Cast.new()
    with running_fakes(directory / "fakes", cast.clients, commerce_page_size=7) as endpoints:
        state_db = directory / "state.db"
        with pytest.MonkeyPatch.context() as env:
            for name, value in connection_env(endpoints, cast, state_db).items():
                env.setenv(name, value)
            yield World(endpoints, cast, state_db)
