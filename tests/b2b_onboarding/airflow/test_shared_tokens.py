"""One Entra ID token per client, not per task: the hooks' clients share MSAL's token cache through
the state store of `d365_state`, encrypted with Airflow's Fernet key; without a usable key, tokens stay
in each process and nothing is stored. Task bodies run in processes of their own, as on workers."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from airflow.sdk.crypto import get_fernet
from cryptography.fernet import Fernet

from b2b_onboarding.airflow import hooks
from b2b_onboarding.airflow.hooks import SalesHook, shared_token_cache
from b2b_onboarding.clients import auth
from b2b_onboarding.clients.auth import TokenProvider
from b2b_onboarding.store.state import StateStore
from d365_fakes.running import FakeAdmin

# A task body as a worker runs it: Sales' change tracking read into the state store.
TASK = "from b2b_onboarding.airflow import tasks; tasks.read_outcomes()"


@pytest.fixture
def airflow_env(world, tmp_path, monkeypatch) -> Iterator[dict[str, str]]:
    """The connections `d365_sales` (the fakes) and `d365_state` (a SQLite file), and a Fernet key, as
    every Airflow process of a deployment gets them; this process starts without shared caches."""
    app = world.cast.integration
    env = {
        "AIRFLOW_CONN_D365_SALES": json.dumps({
            "conn_type": "generic", "host": world.endpoints.dataverse, "login": app["client_id"],
            "password": app["client_secret"],
            "extra": {"authority": world.endpoints.authority, "ca_bundle": world.endpoints.ca_bundle}}),
        "AIRFLOW_CONN_D365_STATE": json.dumps({"conn_type": "generic", "schema": str(tmp_path / "state.db"),
                                               "extra": {"driver": "sqlite"}}),
        "AIRFLOW__CORE__FERNET_KEY": Fernet.generate_key().decode(),
    }  # fmt: skip
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(hooks, "_token_caches", {})
    monkeypatch.setattr(auth, "_providers", {})
    get_fernet.cache_clear()
    yield env
    get_fernet.cache_clear()


@pytest.fixture
def state(airflow_env, tmp_path) -> Iterator[StateStore]:
    store = StateStore(f"sqlite:///{tmp_path / 'state.db'}")
    yield store
    store.close()


def issued(admin: FakeAdmin) -> int:
    return admin.counts()["entra"]["tokens_issued"]


def cache_name(world) -> str:
    app = world.cast.integration
    return auth.cache_name(world.endpoints.authority, app["client_id"], app["client_secret"])


def stored_tokens(state: StateStore, world, key: str) -> list[str]:
    """The access tokens of the stored cache, decrypted with the deployment's key."""
    encrypted, _ = state.token_cache(cache_name(world))
    cache = json.loads(Fernet(key.encode()).decrypt(encrypted.encode()))
    return [entry["secret"] for entry in cache.get("AccessToken", {}).values()]


def run_task(env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess:
    """A task body in a new process, with the deployment's connections and key."""
    return subprocess.run([sys.executable, "-c", TASK], env={**os.environ, **env}, cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)  # fmt: skip


def test_the_stored_cache_is_encrypted_with_airflows_fernet_key(world, admin, airflow_env, state):
    persistence = shared_token_cache()
    app = world.cast.integration
    token = TokenProvider(world.endpoints.authority, app["client_id"], app["client_secret"], world.endpoints.ca_bundle,
                          persistence).token(f"{world.endpoints.dataverse}/.default")  # fmt: skip

    encrypted, updated_at = state.token_cache(cache_name(world))
    assert token not in encrypted and "AccessToken" not in encrypted and updated_at is not None
    assert stored_tokens(state, world, airflow_env["AIRFLOW__CORE__FERNET_KEY"]) == [token]
    assert shared_token_cache() is persistence  # one per process and store


def test_a_cache_stored_under_another_fernet_key_is_replaced(world, admin, airflow_env, state, caplog):
    """A rotated-away key: what was stored under it is unreadable, warned of once, and saved over."""
    state.save_token_cache(cache_name(world), Fernet(Fernet.generate_key()).encrypt(b"{}").decode())
    with caplog.at_level(logging.WARNING, logger=auth.__name__):
        sales = SalesHook().get_conn()
        with sales.odata:
            sales.whoami()

    assert [record.getMessage() for record in caplog.records if "cannot be read" in record.getMessage()]
    assert stored_tokens(state, world, airflow_env["AIRFLOW__CORE__FERNET_KEY"])


@pytest.mark.parametrize("key", ["", "not-a-fernet-key"], ids=["no key", "unusable key"])
def test_without_a_usable_fernet_key_no_token_is_stored(world, admin, airflow_env, state, monkeypatch, caplog, key):
    monkeypatch.setenv("AIRFLOW__CORE__FERNET_KEY", key)
    get_fernet.cache_clear()

    with caplog.at_level(logging.WARNING, logger=hooks.__name__):
        for _ in range(2):
            sales = SalesHook().get_conn()
            with sales.odata:
                sales.whoami()

    assert state.token_cache(cache_name(world)) is None
    said = [record.getMessage() for record in caplog.records if record.name == hooks.__name__]
    assert len(said) == 1 and "Entra ID tokens stay in this process" in said[0] and "[core] fernet_key" in said[0]
    assert issued(admin) == 1  # still one per process


def test_two_task_processes_share_one_token(world, admin, airflow_env, state, tmp_path):
    """THE point: a second task, in a process of its own, takes the token the first one stored."""
    before = issued(admin)

    first, second = run_task(airflow_env, tmp_path), run_task(airflow_env, tmp_path)

    assert first.returncode == 0, first.stderr[-3000:]
    assert second.returncode == 0, second.stderr[-3000:]
    assert issued(admin) == before + 1
    (token,) = stored_tokens(state, world, airflow_env["AIRFLOW__CORE__FERNET_KEY"])
    encrypted, _ = state.token_cache(cache_name(world))
    for output in (first.stdout, first.stderr, second.stdout, second.stderr):
        assert token not in output and encrypted not in output


def test_a_revoked_shared_token_is_dropped_from_the_store_and_replaced(world, admin, airflow_env, state, tmp_path):
    """A task meets the revoked token (401), forgets it (the store's copy too), and cannot get a new one
    (Entra ID refuses once): the next task must not load the revoked token, and gets a fresh one."""
    key = airflow_env["AIRFLOW__CORE__FERNET_KEY"]
    assert run_task(airflow_env, tmp_path).returncode == 0
    (revoked,) = stored_tokens(state, world, key)
    admin.revoke_tokens()
    admin.inject_fault("entra", 401)

    refused = run_task(airflow_env, tmp_path)

    assert refused.returncode != 0 and "refused a token to client" in refused.stderr
    assert stored_tokens(state, world, key) == []
    before = issued(admin)
    assert run_task(airflow_env, tmp_path).returncode == 0
    assert issued(admin) == before + 1
    assert stored_tokens(state, world, key) not in ([], [revoked])
    assert run_task(airflow_env, tmp_path).returncode == 0
    assert issued(admin) == before + 1
