"""Airflow's authentication and authorization, on every route of the app.

Airflow mounts a plugin's FastAPI app as it is: nothing protects its routes unless the app does.
This one resolves the user as Airflow's own API does (`core_api.security.get_user`): the JWT of the
`Authorization: Bearer` header (the REST API, scripts) or of the `_token` cookie (the UI's session,
sent with the pages the UI shows in its frame, which come from the same origin). Without a token
the answer is 401; an invalid or revoked one 403; an expired one 401. The user must then be allowed
to read the runs of both onboarding DAGs (403 otherwise): the pages show what those runs did.
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import quote

from fastapi import Depends, HTTPException, Request, status
from starlette.exceptions import HTTPException as StarletteHTTPException

from b2b_onboarding.airflow.ui import links

log = logging.getLogger(__name__)

async def current_user(request: Request) -> Any:
    """The Airflow user of the request's token (header first, then cookie), or HTTPException."""
    from airflow.api_fastapi.core_api.security import bearer_scheme, get_user

    return await get_user(request, None, await bearer_scheme(request))


def reader(user: Any = Depends(current_user)) -> Any:
    """The user, if the auth manager lets them read the runs of both DAGs (sync: runs in a thread,
    as the team lookup reads the metadata database)."""
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity, DagDetails
    from airflow.models.dag import DagModel

    auth_manager = get_auth_manager()
    for dag_id in links.DAG_IDS:
        details = DagDetails(id=dag_id, team_name=DagModel.get_team_name(dag_id))
        if not auth_manager.is_authorized_dag(method="GET", access_entity=DagAccessEntity.RUN, details=details, user=user):
            log.info("user %s may not read the runs of %s: B2B onboarding pages refused", user.get_id(), dag_id)
            raise HTTPException(status.HTTP_403_FORBIDDEN, "Forbidden")
    return user


def must_log_in(error: StarletteHTTPException) -> bool:
    """Airflow's answers that mean "log in (again)": no token or an expired one (401), an invalid or
    revoked one (403 "Invalid JWT token", as the UI itself reads it)."""
    return error.status_code == 401 or (error.status_code == 403 and error.detail == "Invalid JWT token")


def login_url(request: Request) -> str:
    """Airflow's login route (whatever the auth manager), back to this page afterwards."""
    here = request.scope.get("path", "/")
    if request.scope.get("query_string"):
        here += "?" + request.scope["query_string"].decode("latin-1")
    base = request.scope.get("app_root_path", "").rstrip("/")
    return f"{base}/api/v2/auth/login?next={quote(here, safe='/')}"
