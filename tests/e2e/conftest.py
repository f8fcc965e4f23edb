"""The fakes, the app registrations and the Airflow connections of an end-to-end run."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from browser import chromium_path

from d365_fakes.running import Endpoints, running_fakes
from d365_fakes.scenario import Cast, airflow_connections


@dataclass(frozen=True)
class World:
    endpoints: Endpoints
    cast: Cast
    state_db: Path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, airflow_db: Path) -> Iterator[World]:
    directory = tmp_path_factory.mktemp("world")
    cast = Cast.new()
    # Small pages on both sides, so that every run crosses page boundaries.
    with running_fakes(directory / "fakes", cast.clients, commerce_page_size=7) as endpoints:
        state_db = directory / "state.db"
        connections = airflow_connections(endpoints, cast, ["usrt", "usmf"], state_db, sales_page_size=10)
        with pytest.MonkeyPatch.context() as env:
            for name, value in connections.items():
                env.setenv(name, value)
            yield World(endpoints, cast, state_db)


@pytest.fixture(scope="module")
def dags(airflow_db):
    """Both DAGs as Airflow parses them (DAG files and plugins), none failing to import."""
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag()
    assert not bag.import_errors
    return bag


@pytest.fixture
def chromium() -> str:
    """Debian's chromium for the browser tests (`browser.py`): skipped without it, unless CI is set."""
    return chromium_path()
