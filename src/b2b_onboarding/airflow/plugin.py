"""The B2B onboarding pages in the Airflow UI (Browse → B2B onboarding).

Airflow's api-server mounts the app at /b2b-onboarding (its pages and JSON under /b2b-onboarding/api);
the UI shows it in its frame at /plugin/b2b-onboarding. Every route needs an Airflow login. The app
is built at its first request (`LazyApp`): every Airflow process, each task's too, imports this file.
A root middleware marks dry runs of the onboarding DAGs in Airflow's run list (`ui.dry_runs`); a second
one lets the Connections list's Test button test the product's connections, which have no port
(`ui.connection_test`).
"""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from b2b_onboarding.airflow.ui import HREF, URL_PREFIX, URL_ROUTE, LazyApp
from b2b_onboarding.airflow.ui.connection_test import PortlessConnectionTest
from b2b_onboarding.airflow.ui.dry_runs import DryRunMarker


class B2BOnboardingPlugin(AirflowPlugin):
    name = "b2b_onboarding"
    fastapi_apps = [{"app": LazyApp(), "url_prefix": URL_PREFIX, "name": "B2B onboarding"}]
    fastapi_root_middlewares = [
        {"middleware": DryRunMarker, "name": "B2B onboarding: dry runs marked"},
        {"middleware": PortlessConnectionTest, "name": "B2B onboarding: its connections' Test button"},
    ]
    external_views = [
        {
            "name": "B2B onboarding",
            "href": HREF,
            "destination": "nav",
            "category": "browse",
            "url_route": URL_ROUTE,
        }
    ]
