"""The onboarding pages in the Airflow UI: a FastAPI app that Airflow's api-server mounts at
`URL_PREFIX`, shown in the UI's navigation as an external view (see `src/b2b_onboarding/airflow/plugin.py`).

Every Airflow process imports the plugins, each task's process too, and only the api-server serves
them: `LazyApp` builds the app (FastAPI, Jinja2, the store's tables, pandas) at its first request.
"""

from __future__ import annotations

import threading
from typing import Any

URL_PREFIX = "/b2b-onboarding"
# The UI's own route to the page (`/plugin/<url_route>`), and the frame's source: relative, so that
# it resolves under `[api] base_url` when Airflow is served below a path.
URL_ROUTE = "b2b-onboarding"
HREF = "b2b-onboarding/"


class LazyApp:
    """An ASGI app that builds `ui.app.create_app()` when the first request comes."""

    def __init__(self) -> None:
        self._app: Any = None
        self._lock = threading.Lock()

    @property
    def app(self) -> Any:
        if self._app is None:
            with self._lock:
                if self._app is None:
                    from b2b_onboarding.airflow.ui.app import create_app

                    self._app = create_app()
        return self._app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)
