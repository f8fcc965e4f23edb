"""The token cache shared through a persistence (`TokenCachePersistence`), against the fake Entra ID:
a provider of another process (a new MSAL app) takes the token another one saved instead of asking for
one; a cache that cannot be read is ignored; a forgotten (revoked) token leaves the persisted cache too."""

from __future__ import annotations

import json
import logging

import pytest

from b2b_onboarding.clients import auth
from b2b_onboarding.clients.auth import TokenProvider, token_provider
from d365_fakes.running import FakeAdmin


class MemoryPersistence:
    """A persistence in a dict (the Airflow glue's is the state store, encrypted), counting its reads."""

    def __init__(self, saved: str | None = None, unreadable: bool = False) -> None:
        self.saved: dict[str, str] = {}
        self.initial = saved
        self.unreadable = unreadable
        self.loads = 0

    def load(self, name: str) -> str | None:
        self.loads += 1
        if self.unreadable and name not in self.saved:
            raise ValueError("it is not encrypted with this key")
        return self.saved.get(name, self.initial)

    def save(self, name: str, serialized: str) -> None:
        self.saved[name] = serialized


def provider(world, persistence: MemoryPersistence | None) -> TokenProvider:
    """A provider of its own (a new MSAL app, as in a new process) for the integration's app registration."""
    app = world.cast.integration
    return TokenProvider(world.endpoints.authority, app["client_id"], app["client_secret"], world.endpoints.ca_bundle,
                         persistence)  # fmt: skip


def issued(admin: FakeAdmin) -> int:
    return admin.counts()["entra"]["tokens_issued"]


def cached_tokens(serialized: str) -> list[str]:
    return [entry["secret"] for entry in json.loads(serialized).get("AccessToken", {}).values()]


def test_a_second_provider_takes_the_persisted_token_instead_of_asking_entra_id(world, admin):
    persistence, scope = MemoryPersistence(), f"{world.endpoints.dataverse}/.default"
    first = provider(world, persistence)

    token = first.token(scope)

    assert issued(admin) == 1
    (name, serialized), = persistence.saved.items()
    assert cached_tokens(serialized) == [token]
    # named by authority, client and a digest of the secret, never the secret, which the cache does not hold either
    assert name.startswith(f"{world.cast.integration['client_id']}@{world.endpoints.authority}#")
    assert world.cast.integration["client_secret"] not in name + serialized

    second = provider(world, persistence)
    assert second.token(scope) == token and second.last_token_source == "cache"
    assert issued(admin) == 1


def test_a_good_token_in_the_process_is_used_without_reading_the_persistence_again(world, admin):
    persistence, scope = MemoryPersistence(), f"{world.endpoints.commerce}/.default"
    tokens = provider(world, persistence)
    tokens.token(scope)
    loads = persistence.loads

    for _ in range(20):
        tokens.token(scope)

    assert persistence.loads == loads and issued(admin) == 1


def test_another_scope_is_saved_beside_the_first_in_the_one_cache_of_the_client(world, admin):
    persistence = MemoryPersistence()
    commerce = provider(world, persistence).token(f"{world.endpoints.commerce}/.default")
    dataverse = provider(world, persistence).token(f"{world.endpoints.dataverse}/.default")

    assert sorted(cached_tokens(*persistence.saved.values())) == sorted([commerce, dataverse])
    later = provider(world, persistence)
    assert later.token(f"{world.endpoints.commerce}/.default") == commerce
    assert later.token(f"{world.endpoints.dataverse}/.default") == dataverse
    assert issued(admin) == 2


@pytest.mark.parametrize("persistence", [
    MemoryPersistence(saved="{not json"), MemoryPersistence(saved='["not", "a", "cache"]'),
    MemoryPersistence(unreadable=True),
], ids=["not JSON", "not a cache", "undecryptable"])  # fmt: skip
def test_a_persisted_cache_that_cannot_be_read_is_ignored_with_one_warning_and_replaced(world, admin, persistence,
                                                                                       caplog):  # fmt: skip
    scope = f"{world.endpoints.dataverse}/.default"
    tokens = provider(world, persistence)

    with caplog.at_level(logging.WARNING, logger=auth.__name__):
        token = tokens.token(scope)
        tokens.forget()
        tokens.token(scope)

    warnings = [record.getMessage() for record in caplog.records if record.name == auth.__name__]
    assert len(warnings) == 1 and "shared token cache of client" in warnings[0] and "cannot be read" in warnings[0]
    assert token not in warnings[0]
    assert issued(admin) == 2  # a new token each time: the unreadable cache held none
    assert provider(world, persistence).token(scope) != token  # the cache saved over it is read
    assert issued(admin) == 2


def test_forgetting_a_token_drops_it_from_the_persisted_cache_too(world, admin):
    """A token the APIs refuse (revoked: the client's 401 handling forgets it) must not be taken up
    from the persisted cache by another process."""
    persistence, scope = MemoryPersistence(), f"{world.endpoints.dataverse}/.default"
    revoked = provider(world, persistence).token(scope)
    elsewhere = provider(world, persistence)
    assert elsewhere.token(scope) == revoked
    admin.revoke_tokens()

    elsewhere.forget()

    assert cached_tokens(*persistence.saved.values()) == []
    fresh = provider(world, persistence).token(scope)
    assert fresh != revoked and issued(admin) == 2
    assert cached_tokens(*persistence.saved.values()) == [fresh]


def test_forgetting_also_drops_what_another_process_saved_after_this_one_last_looked(world, admin):
    persistence, scope = MemoryPersistence(), f"{world.endpoints.dataverse}/.default"
    here = provider(world, persistence)
    here.token(scope)
    persistence.saved.clear()
    there = provider(world, persistence).token(f"{world.endpoints.commerce}/.default")  # a newer cache, saved later
    assert cached_tokens(*persistence.saved.values()) == [there]

    here.forget()

    assert cached_tokens(*persistence.saved.values()) == []


def test_without_a_persistence_tokens_stay_in_the_provider(world, admin):
    scope = f"{world.endpoints.dataverse}/.default"
    token = provider(world, None).token(scope)
    assert provider(world, None).token(scope) != token and issued(admin) == 2


def test_the_process_wide_provider_takes_up_a_persistence_given_later(world, admin, monkeypatch):
    """A client connects through `token_provider` without one; the Airflow glue gives it first."""
    monkeypatch.setattr(auth, "_providers", {})
    app, endpoints, persistence = world.cast.integration, world.endpoints, MemoryPersistence()
    arguments = (endpoints.authority, app["client_id"], app["client_secret"], endpoints.ca_bundle)
    shared = token_provider(*arguments)
    shared.token(f"{endpoints.commerce}/.default")
    assert persistence.saved == {}

    assert token_provider(*arguments, persistence) is shared
    assert token_provider(*arguments) is shared  # a client connecting later keeps it
    token = shared.token(f"{endpoints.commerce}/.default")  # the token it holds is saved at the next sync

    assert cached_tokens(*persistence.saved.values()) == [token] and issued(admin) == 1
    assert provider(world, persistence).token(f"{endpoints.commerce}/.default") == token


def test_a_token_another_secret_got_never_answers_for_a_wrong_secret(world, admin):
    """A secret rotated or pasted wrong fails at once, as it did before tokens were shared, not when the
    token the right secret got expires."""
    persistence, scope = MemoryPersistence(), f"{world.endpoints.dataverse}/.default"
    provider(world, persistence).token(scope)
    app = world.cast.integration
    wrong = TokenProvider(world.endpoints.authority, app["client_id"], "pasted-wrong-" + "x" * 24,
                          world.endpoints.ca_bundle, persistence)  # fmt: skip

    with pytest.raises(auth.AuthenticationError, match="invalid_client"):
        wrong.token(scope)
    assert issued(admin) == 1
