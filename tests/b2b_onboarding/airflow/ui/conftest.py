"""The onboarding pages against a real state store (a SQLite file of the test's own: the `store`
fixture), filled as the DAGs fill it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from ui_data import client_for, fill

from b2b_onboarding.store.state import StateStore


@pytest.fixture
def filled(store: StateStore) -> StateStore:
    fill(store)
    return store


@pytest.fixture
def client(filled: StateStore) -> Iterator[TestClient]:
    with client_for(filled) as client:
        yield client
