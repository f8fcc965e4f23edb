"""The fakes the client tests drive: one running set per test module, emptied before each test."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from b2b_onboarding.clients.sales import SalesClient
from b2b_onboarding.clients.settings import ServiceSettings
from b2b_onboarding.store.state import StateStore
from d365_fakes.actors import Clerk, Seller
from d365_fakes.running import Endpoints, FakeAdmin, running_fakes
from d365_fakes.scenario import Cast


@dataclass(frozen=True)
class World:
    endpoints: Endpoints
    cast: Cast

    def settings(self, resource: str, **extra) -> ServiceSettings:
        """A connection of the integration's app registration to `resource`, trusting the fakes' CA."""
        app = self.cast.integration
        return ServiceSettings.from_connection(
            "d365_test", host=resource, login=app["client_id"], password=app["client_secret"],
            extra={"authority": self.endpoints.authority, "ca_bundle": self.endpoints.ca_bundle, **extra},
        )  # fmt: skip


@pytest.fixture(scope="module")
def world(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """The fakes, with the module's `COMMERCE_PAGE_SIZE` (small pages make every read cross pages)."""
    cast = Cast.new()
    page_size = getattr(request.module, "COMMERCE_PAGE_SIZE", 10_000)
    with running_fakes(tmp_path_factory.mktemp("fakes"), cast.clients, commerce_page_size=page_size) as endpoints:
        yield World(endpoints, cast)


@pytest.fixture
def admin(world: World) -> Iterator[FakeAdmin]:
    """The fakes' admin surface, with empty systems and no faults at the start of each test."""
    with FakeAdmin(world.endpoints) as admin:
        admin.reset()
        yield admin


@pytest.fixture
def store(tmp_path: Path) -> Iterator[StateStore]:
    """An empty state store in a SQLite file of the test's own."""
    store = StateStore(f"sqlite:///{tmp_path / 'state.db'}")
    yield store
    store.close()


@pytest.fixture
def seller(world: World) -> Iterator[Seller]:
    """Another app registration working in Sales, as a person would through the UI."""
    seller = Seller(world.endpoints, world.cast.seller["client_id"], world.cast.seller["client_secret"])
    yield seller
    seller.close()


@pytest.fixture
def clerk(world: World) -> Iterator[Clerk]:
    """A back-office user editing prospects in Commerce HQ."""
    clerk = Clerk(world.endpoints, world.cast.clerk["client_id"], world.cast.clerk["client_secret"])
    yield clerk
    clerk.close()


@pytest.fixture
def sales_client(world: World, admin: FakeAdmin) -> Iterator[SalesClient]:
    """Sales with pages of 2 rows: every read crosses pages."""
    client = SalesClient.connect(world.settings(world.endpoints.dataverse, page_size=2))
    yield client
    client.odata.close()
