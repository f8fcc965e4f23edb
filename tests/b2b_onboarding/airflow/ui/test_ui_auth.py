"""The plugin mounted the way Airflow mounts it: Airflow's real api-server app, built in-process
(`airflow.api_fastapi.app.create_app`, the plugins folder = plugins/, the Simple auth manager), and
its routes called without a login, with a bad one, and with the UI's own login (a JWT from
`POST /auth/token`, sent as a Bearer header like the REST API or as the `_token` cookie like the
UI's frame)."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from urllib.parse import parse_qs, urlsplit

import jwt
import pytest
from fastapi.testclient import TestClient
from ui_data import fill

from b2b_onboarding.airflow.ui import HREF, URL_PREFIX, URL_ROUTE
from b2b_onboarding.store.state import StateStore

PAGES = ["/", "/prospects?q=ada", "/prospect?legal_entity=usrt&prospect_id=P-1", "/anomalies", "/drift", "/runs",
         "/failures", "/static/style.css", "/static/frame.js"]  # fmt: skip
API = ["/api/summary", "/api/prospects?q=ada", "/api/prospects/usrt/P-1", "/api/prospect?legal_entity=usrt&prospect_id=P-1",
       "/api/anomalies", "/api/kept", "/api/drift", "/api/runs", "/api/failures"]  # fmt: skip


@pytest.fixture(scope="module")
def api_server(airflow_db, tmp_path_factory) -> Iterator[tuple[TestClient, dict[str, str]]]:
    home = tmp_path_factory.mktemp("api-server")
    store = StateStore(f"sqlite:///{home / 'state.db'}")
    fill(store)
    store.close()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AIRFLOW__CORE__AUTH_MANAGER",
                   "airflow.api_fastapi.auth.managers.simple.simple_auth_manager.SimpleAuthManager")  # fmt: skip
        env.setenv("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS", "False")
        env.setenv("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS", "viewer:viewer")
        env.setenv("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE", str(home / "passwords.json"))
        # The api-server's signing key (`airflow db migrate` writes one to airflow.cfg, which this
        # process may have read before it existed).
        env.setenv("AIRFLOW__API_AUTH__JWT_SECRET", secrets.token_urlsafe(64))
        # The pages read the store of the `d365_state` connection, as the tasks do.
        env.setenv("AIRFLOW_CONN_D365_STATE", json.dumps({
            "conn_type": "generic", "schema": str(home / "state.db"), "extra": {"driver": "sqlite"}}))  # fmt: skip
        from airflow.api_fastapi.app import create_app, purge_cached_app

        app = create_app()
        try:
            with TestClient(app, follow_redirects=False) as client:
                yield client, json.loads((home / "passwords.json").read_text())
        finally:
            purge_cached_app()


@pytest.fixture(scope="module")
def token(api_server) -> str:
    client, passwords = api_server
    response = client.post("/auth/token", json={"username": "viewer", "password": passwords["viewer"]})
    assert response.status_code == 201
    return response.json()["access_token"]


def test_airflow_mounts_the_app_and_lists_the_external_view(api_server, token):
    client, _ = api_server
    plugins = client.get("/api/v2/plugins", headers={"Authorization": f"Bearer {token}"}).json()["plugins"]
    plugin = next(p for p in plugins if p["name"] == "b2b_onboarding")
    assert plugin["fastapi_apps"] == [{"app": "b2b_onboarding.airflow.ui.LazyApp", "url_prefix": URL_PREFIX, "name": "B2B onboarding"}]
    view = plugin["external_views"][0]
    assert (view["href"], view["url_route"], view["destination"], view["category"]) == (HREF, URL_ROUTE, "nav", "browse")
    # The UI serves its page of the view (the frame around the app), a route of the React app.
    assert client.get(f"/plugin/{URL_ROUTE}").status_code == 200


def test_anonymous_requests_are_refused(api_server):
    client, _ = api_server
    for path in API:
        response = client.get(URL_PREFIX + path)
        assert response.status_code == 401, path
        assert response.json() == {"detail": "Not authenticated"}
    for path in PAGES:  # pages send the browser to Airflow's login, and back here afterwards
        response = client.get(URL_PREFIX + path)
        assert response.status_code == 307, path
        location = urlsplit(response.headers["location"])
        assert location.path == "/api/v2/auth/login"
        assert parse_qs(location.query)["next"] == [URL_PREFIX + path]
    login = client.get(response.headers["location"])  # Airflow's own login route takes it from there
    assert login.status_code == 307 and urlsplit(login.headers["location"]).path == "/auth/login"


def test_a_forged_or_expired_token_is_refused(api_server, token):
    client, _ = api_server
    claims = jwt.decode(token, options={"verify_signature": False})
    forged = jwt.encode(claims, "not-the-secret-of-this-airflow-but-long-enough-for-hs512-" * 2, algorithm="HS512")
    for headers, cookies in [({"Authorization": f"Bearer {forged}"}, {}), ({}, {"_token": forged})]:
        client.cookies.clear()
        client.cookies.update(cookies)
        assert client.get(URL_PREFIX + "/api/summary", headers=headers).status_code == 403
        page = client.get(URL_PREFIX + "/", headers=headers)
        assert page.status_code == 307 and "/api/v2/auth/login" in page.headers["location"]
    client.cookies.clear()
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser

    expired = get_auth_manager().generate_jwt(SimpleAuthManagerUser(username="viewer", role="viewer"),
                                              expiration_time_in_seconds=-60)  # fmt: skip
    assert client.get(URL_PREFIX + "/api/summary", headers={"Authorization": f"Bearer {expired}"}).status_code == 401


def test_a_logged_in_user_reads_the_pages_with_the_bearer_header_or_the_ui_cookie(api_server, token):
    client, _ = api_server
    client.cookies.clear()
    bearer = {"Authorization": f"Bearer {token}"}
    for path in API:
        response = client.get(URL_PREFIX + path, headers=bearer)
        assert response.status_code == 200, (path, response.text)
    summary = client.get(URL_PREFIX + "/api/summary", headers=bearer).json()
    assert summary["by_stage"]["approved"] == 1
    # Airflow's own metadata database read by the app's defaults: its pools imported, both DAGs readable.
    assert summary["missing_pools"] == [] and all(latest["readable"] for latest in summary["latest_runs"])
    # The UI's frame: a same-origin page load carries the session cookie, and no header.
    client.cookies.set("_token", token)
    try:
        for path in PAGES:
            response = client.get(URL_PREFIX + path)
            assert response.status_code == 200, (path, response.text)
        page = client.get(URL_PREFIX + "/prospect?legal_entity=usrt&prospect_id=P-1").text
        assert "Ada Lovelace" in page and 'href="/dags/b2b_outcome_reconciliation/runs/' in page
        assert 'href="/b2b-onboarding/prospects"' in page
    finally:
        client.cookies.clear()


def test_a_user_the_auth_manager_refuses_the_dags_gets_403(api_server, token, monkeypatch):
    client, _ = api_server
    from airflow.api_fastapi.app import get_auth_manager

    monkeypatch.setattr(type(get_auth_manager()), "is_authorized_dag", lambda self, **kwargs: False)
    bearer = {"Authorization": f"Bearer {token}"}
    assert client.get(URL_PREFIX + "/api/summary", headers=bearer).json() == {"detail": "Forbidden"}
    page = client.get(URL_PREFIX + "/", headers=bearer)
    assert page.status_code == 403 and "may not read the runs" in page.text
