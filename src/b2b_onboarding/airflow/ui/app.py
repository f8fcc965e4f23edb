"""The app: server-rendered pages (Jinja2, autoescaped) and the same data as JSON under `/api`.

Pages: `/` (summary), `/prospects?q=&stage=&legal_entity=&page=` (search), `/prospect?legal_entity=
&prospect_id=` (one prospect and its timeline), `/anomalies` (anomalies and kept records), `/drift`,
`/runs` (each DAG's recent runs and their trend), `/failures?dag_id=&run_id=` (tasks that failed for good).
JSON: `/api/summary`, `/api/prospects?q=`, `/api/prospects/{legal_entity}/{prospect_id}` (or
`/api/prospect?legal_entity=&prospect_id=` for any key), `/api/anomalies`, `/api/kept`, `/api/drift`,
`/api/runs`, `/api/failures`. Lists come a page at a time (`page`, `per_page` up to 200). Every route
needs an Airflow login (`auth`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote, urlencode

import jinja2
import sqlalchemy as sa
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from sqlalchemy import event
from starlette.exceptions import HTTPException as StarletteHTTPException

from b2b_onboarding.airflow.ui import auth, health, links
from b2b_onboarding.airflow.ui.health import DagRuns, PoolNames
from b2b_onboarding.airflow.ui.queries import (
    DEFAULT_PER_PAGE,
    MAX_PER_PAGE,
    MAX_QUERY_LENGTH,
    STAGES,
    TABLES,
    Page,
    Queries,
    StoreNotReady,
    json_value,  # fmt: skip
    utc,
)

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
STATIC_FILES = {"style.css": "text/css; charset=utf-8", "frame.js": "text/javascript; charset=utf-8"}
# Scripts and styles of this app only, nothing inline, framed by the Airflow UI (same origin) only.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; form-action 'self'; "
    "frame-ancestors 'self'; base-uri 'none'"
)
PAGE_PATHS = {"summary": "/", "prospects": "/prospects", "prospect": "/prospect", "anomalies": "/anomalies",
              "drift": "/drift", "runs": "/runs", "failures": "/failures"}  # fmt: skip
RECENT_FAILURES = 5  # on the summary

DriftCheck = Callable[[], "dict | None"]
# Query parameters (Annotated: FastAPI copies the Query for each parameter).
Text = Annotated[str, Query(max_length=MAX_QUERY_LENGTH)]
Key = Annotated[str, Query(max_length=255)]
PageNumber = Annotated[int, Query(ge=1, le=10_000_000)]


def airflow_latest_drift_check() -> dict | None:
    """The reconciliation's latest `check_drift` that succeeded, from Airflow's metadata database.

    A check that finds nothing keeps no row in the store: this tells "the latest check found no
    drift" from "the latest findings" (of an older check)."""
    try:
        from airflow.models.taskinstance import TaskInstance
        from airflow.utils.session import create_session

        with create_session() as session:
            row = session.execute(
                sa.select(TaskInstance.run_id, TaskInstance.end_date)
                .where(TaskInstance.dag_id == links.RECONCILIATION_DAG_ID, TaskInstance.task_id == "check_drift",
                       TaskInstance.state == "success", TaskInstance.end_date.is_not(None))
                .order_by(TaskInstance.end_date.desc())
                .limit(1)
            ).first()  # fmt: skip
    except Exception:  # the page still shows what the store holds
        log.warning("could not read the latest drift check from Airflow's metadata database", exc_info=True)
        return None
    return None if row is None else {"run_id": row.run_id, "ended_at": utc(row.end_date).isoformat()}


def state_store_engine() -> sa.Engine:
    """A read-only engine on the state store of the `d365_state` connection (as the tasks use it)."""
    from b2b_onboarding.airflow.hooks import StateStoreHook

    url = sa.make_url(StateStoreHook().url())
    if url.get_backend_name() == "postgresql":
        return sa.create_engine(url, pool_pre_ping=True, execution_options={"postgresql_readonly": True})
    # SQLite: a connection per request (opening a file costs microseconds), so the pages read the file
    # the path names now, also after it was replaced (a restore), never a pooled handle on the old one.
    sqlite = url.get_backend_name() == "sqlite"
    engine = sa.create_engine(url, **({"poolclass": sa.pool.NullPool} if sqlite else {"pool_pre_ping": True}))
    if sqlite:

        @event.listens_for(engine, "connect")
        def _read_only(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA query_only = ON")
            cursor.execute("PRAGMA busy_timeout = 10000")
            cursor.close()

    return engine


class _Store:
    """The engine, made at the first request (the connection is read then), and its tables checked."""

    def __init__(self, engine: sa.Engine | None) -> None:
        self._engine = engine
        self._ready = False
        self._lock = threading.Lock()

    def queries(self, request: Request) -> Queries:
        with self._lock:
            if self._engine is None:
                self._engine = state_store_engine()
            if not self._ready:
                self._check(sa.inspect(self._engine))
                self._ready = True
        return Queries(self._engine, airflow_base=request.scope.get("app_root_path", "").rstrip("/"))

    @staticmethod
    def _check(inspector: sa.Inspector) -> None:
        """The tables and columns the pages read are there: a store that an older version of the tasks
        made lacks some until its migrations run (a task's first open of it, or `store_migrate`)."""
        if not inspector.has_table(TABLES[0].name):
            raise StoreNotReady("The state store has no tables yet: no run of the onboarding DAGs wrote to it, and "
                                "`python -m b2b_onboarding.airflow.store_migrate` has not run.")  # fmt: skip
        missing = []
        for table in TABLES:
            if not inspector.has_table(table.name):
                missing.append(table.name)
                continue
            present = {column["name"] for column in inspector.get_columns(table.name)}
            missing += [f"{table.name}.{name}" for name in table.c.keys() if name not in present]
        if missing:
            raise StoreNotReady(f"The state store predates these pages: it lacks {', '.join(missing)}. Next step: "
                                "`python -m b2b_onboarding.airflow.store_migrate` (or the next task) adds them.")  # fmt: skip


class Urls:
    """Paths of this app's pages (under its mount) and of the Airflow UI, for the templates."""

    def __init__(self, request: Request) -> None:
        self.root = request.scope.get("root_path", "").rstrip("/")
        self.airflow = request.scope.get("app_root_path", "").rstrip("/")

    def page(self, name: str, **query: Any) -> str:
        kept = {key: value for key, value in query.items() if value not in (None, "")}
        return self.root + PAGE_PATHS[name] + ("?" + urlencode(kept) if kept else "")

    def prospect(self, legal_entity: str, prospect_id: str) -> str:
        # Keys travel as query parameters: any character, '/' or '..' included, comes back as it was.
        return self.root + "/prospect?" + urlencode({"legal_entity": legal_entity, "prospect_id": prospect_id})

    def static(self, name: str) -> str:
        return f"{self.root}/static/{name}"

    def dag(self, dag_id: str) -> str:
        return f"{self.airflow}/dags/{quote(dag_id, safe='')}"


def age(seconds: int | None) -> str:
    if seconds is None:
        return ""
    minutes, hours, days = seconds // 60, seconds // 3600, seconds // 86400
    if days:
        return f"{days} d {hours % 24} h"
    if hours:
        return f"{hours} h {minutes % 60} min"
    return f"{minutes} min" if minutes else f"{seconds} s"


def when(value: str | None) -> str:
    """An ISO timestamp as the pages show it: UTC, to the second."""
    if not value:
        return ""
    return datetime.fromisoformat(value).astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _templates() -> Jinja2Templates:
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=True,  # every value, in text and in attributes; prospect data is hostile input
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    environment.filters.update(age=age, when=when)
    return Jinja2Templates(env=environment)


def found_nothing(latest_check: dict | None, latest_findings: dict | None) -> bool:
    """Whether the latest successful drift check is later than the latest findings, and so found
    nothing (a check without findings keeps no row in the store)."""
    if latest_check is None:
        return False
    if latest_findings is None or latest_findings["run_id"] is None:
        return True
    later = datetime.fromisoformat(latest_check["ended_at"]) > datetime.fromisoformat(latest_findings["checked_at"])
    return latest_check["run_id"] != latest_findings["run_id"] and later


def drift_report(queries: Queries, latest_check: dict | None, run_id: str | None, page: int, per_page: int) -> dict:
    """The findings of a run (the latest that found something, by default), and whether a later
    successful check found nothing at all."""
    report = queries.drift(run_id, page, per_page)
    if latest_check is not None:
        check = links.run_links(queries.airflow_base, latest_check["run_id"], links.RECONCILIATION_DAG_ID, "check_drift")
        latest_check = {**latest_check, "run_url": check["run_url"], "task_url": check["task_url"]}
    return {**report, "latest_check": latest_check,
            "latest_check_found_nothing": run_id is None and found_nothing(latest_check, report)}  # fmt: skip


def summary_of(queries: Queries, latest_check: dict | None, dag_runs: DagRuns, pool_names: PoolNames) -> dict:
    """The store's counts, the latest drift check, each DAG's last run (and what failed in it), the
    latest failures, and the Airflow pools missing."""
    summary = queries.summary()
    return {**summary, "latest_drift_check": latest_check,
            "latest_check_found_nothing": found_nothing(latest_check, summary["latest_drift"]),
            "latest_runs": health.latest_runs(queries, dag_runs),
            "recent_failures": queries.failures(1, RECENT_FAILURES).items,
            "missing_pools": health.missing_pools(pool_names),
            "import_pools": f"airflow pools import {health.POOLS_FILE}"}  # fmt: skip


def run_histories(queries: Queries, dag_runs: DagRuns) -> list[dict]:
    """Each DAG's recent runs (None when Airflow cannot be read) and the figures shown for them."""
    now = datetime.now(UTC)
    histories = []
    for dag_id in links.DAG_IDS:
        runs = dag_runs(dag_id, health.RUN_HISTORY)
        histories.append({
            "dag_id": dag_id,
            "figures": [{"key": figure.key, "label": figure.label} for figure in health.FIGURES[dag_id]],
            "runs": None if runs is None else health.run_history(queries, dag_id, runs, now),
        })  # fmt: skip
    return histories


def with_held_up(queries: Queries, found: Page, dag_runs: DagRuns) -> Page:
    """The prospects of a page, each with the failure that holds it up (or None)."""
    latest = health.latest_runs(queries, dag_runs)
    for item in found.items:
        item["held_up"] = health.held_up(item, latest)
    return found


def create_app(
    engine: sa.Engine | None = None, *, latest_drift_check: DriftCheck = airflow_latest_drift_check,
    dag_runs: DagRuns = health.airflow_dag_runs, pool_names: PoolNames = health.airflow_pool_names,
) -> FastAPI:  # fmt: skip
    """The app on the store of `engine`, or of the `d365_state` connection (read at the first request);
    Airflow's metadata database read by the callables given (a test gives its own)."""
    store = _Store(engine)
    templates = _templates()
    app = FastAPI(
        title="B2B onboarding",
        dependencies=[Depends(auth.reader)],
        docs_url=None, redoc_url=None, openapi_url=None,
    )  # fmt: skip

    def render(request: Request, template: str, status_code: int = 200, **context: Any) -> Response:
        context = {"u": Urls(request), "stages": STAGES, "max_query_length": MAX_QUERY_LENGTH, **context}
        return templates.TemplateResponse(request, template, context, status_code=status_code)

    def is_api(request: Request) -> bool:
        path, root = request.scope.get("path", ""), request.scope.get("root_path", "")
        return path.removeprefix(root).startswith("/api/")

    @app.middleware("http")
    async def headers(request: Request, call_next: Callable) -> Response:
        response = await call_next(request)
        response.headers.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "same-origin"
        response.headers.setdefault("Cache-Control", "no-store")  # prospects' personal data
        return response

    @app.exception_handler(StarletteHTTPException)  # FastAPI's (auth, routes) and Starlette's (no such route)
    async def http_error(request: Request, error: StarletteHTTPException) -> Response:
        if is_api(request):
            return JSONResponse({"detail": error.detail}, error.status_code, headers=error.headers)
        if auth.must_log_in(error):
            return RedirectResponse(auth.login_url(request), status_code=307)
        message = "You may not read the runs of the onboarding DAGs." if error.status_code == 403 else str(error.detail)
        return render(request, "message.html", error.status_code, title=str(error.status_code), message=message)

    @app.exception_handler(StoreNotReady)
    async def not_ready(request: Request, error: StoreNotReady) -> Response:
        if is_api(request):
            return JSONResponse({"detail": str(error)}, 503)
        return render(request, "message.html", 503, title="No data yet", message=str(error))

    @app.exception_handler(sa.exc.SQLAlchemyError)
    async def store_error(request: Request, error: sa.exc.SQLAlchemyError) -> Response:
        log.error("B2B onboarding pages: the state store failed", exc_info=error)
        message = f"The state store could not be read ({type(error).__name__}); see the api-server's log."
        if is_api(request):
            return JSONResponse({"detail": message}, 503)
        return render(request, "message.html", 503, title="State store unavailable", message=message)

    def paging(page: PageNumber = 1, per_page: int = Query(DEFAULT_PER_PAGE, ge=1, le=MAX_PER_PAGE)):
        return page, per_page

    Paging = Depends(paging)

    # Pages

    @app.get("/", name="summary")
    def summary_page(request: Request) -> Response:
        summary = summary_of(store.queries(request), latest_drift_check(), dag_runs, pool_names)
        return render(request, "summary.html", summary=summary, dag_ids=links.DAG_IDS)

    @app.get("/prospects", name="prospects")
    def prospects_page(request: Request, q: Text = "", stage: Text = "", legal_entity: Text = "",
                       paged: tuple[int, int] = Paging) -> Response:  # fmt: skip
        queries = store.queries(request)
        found = with_held_up(queries, queries.prospects(q, stage, legal_entity, *paged), dag_runs)
        return render(request, "prospects.html", found=found, q=q, stage=stage, legal_entity=legal_entity)

    @app.get("/prospect", name="prospect")
    def prospect_page(request: Request, legal_entity: Key, prospect_id: Key,
                      page: PageNumber = 1) -> Response:  # fmt: skip
        queries = store.queries(request)
        prospect = queries.prospect(legal_entity, prospect_id)
        if prospect is None:
            return render(request, "message.html", 404, title="Not found",
                          message=f"No prospect {legal_entity}/{prospect_id} in the state store.")  # fmt: skip
        timeline = queries.timeline(legal_entity, prospect_id, page, MAX_PER_PAGE)
        found = queries.anomalies(1, MAX_PER_PAGE, legal_entity, prospect_id)
        held_up = health.held_up(prospect, health.latest_runs(queries, dag_runs))
        return render(request, "prospect.html", prospect=prospect, timeline=timeline, anomalies=found,
                      held_up=held_up, last_run_dag=links.dag_of_stage(prospect["stage"]))  # fmt: skip

    @app.get("/anomalies", name="anomalies")
    def anomalies_page(request: Request, paged: tuple[int, int] = Paging,
                       kept_page: PageNumber = 1) -> Response:  # fmt: skip
        queries = store.queries(request)
        return render(request, "anomalies.html", anomalies=queries.anomalies(*paged),
                      kept=queries.kept(kept_page, paged[1]))  # fmt: skip

    @app.get("/drift", name="drift")
    def drift_page(request: Request, run_id: str | None = Query(None, max_length=250),
                   paged: tuple[int, int] = Paging) -> Response:  # fmt: skip
        queries = store.queries(request)
        report = drift_report(queries, latest_drift_check(), run_id, *paged)
        return render(request, "drift.html", report=report, runs=queries.drift_runs())

    @app.get("/runs", name="runs")
    def runs_page(request: Request) -> Response:
        histories = run_histories(store.queries(request), dag_runs)
        charts = {history["dag_id"]: health.chart(history["runs"]) for history in histories if history["runs"]}
        return render(request, "runs.html", histories=histories, charts=charts)

    @app.get("/failures", name="failures")
    def failures_page(request: Request, dag_id: Key = "", run_id: Key = "",
                      paged: tuple[int, int] = Paging) -> Response:  # fmt: skip
        found = store.queries(request).failures(*paged, dag_id=dag_id, run_id=run_id)
        return render(request, "failures.html", found=found, dag_id=dag_id, run_id=run_id)

    @app.get("/static/{name}", name="static")
    def static(name: str) -> Response:
        if name not in STATIC_FILES:
            raise HTTPException(404, "Not Found")
        return FileResponse(HERE / "static" / name, media_type=STATIC_FILES[name], headers={"Cache-Control": "no-cache"})

    # JSON

    @app.get("/api/summary")
    def summary_json(request: Request) -> dict:
        return summary_of(store.queries(request), latest_drift_check(), dag_runs, pool_names)

    @app.get("/api/prospects")
    def prospects_json(request: Request, q: Text = "", stage: Text = "", legal_entity: Text = "",
                       paged: tuple[int, int] = Paging) -> dict:  # fmt: skip
        queries = store.queries(request)
        found = with_held_up(queries, queries.prospects(q, stage, legal_entity, *paged), dag_runs)
        urls = Urls(request)
        for item in found.items:
            item["url"] = urls.prospect(item["legal_entity"], item["prospect_id"])
        return found.as_json()

    def prospect_json(request: Request, legal_entity: str, prospect_id: str, page: int) -> dict:
        queries = store.queries(request)
        prospect = queries.prospect(legal_entity, prospect_id)
        if prospect is None:
            raise HTTPException(404, f"no prospect {legal_entity}/{prospect_id} in the state store")
        return json_value({
            "prospect": prospect,
            "held_up": health.held_up(prospect, health.latest_runs(queries, dag_runs)),
            "timeline": queries.timeline(legal_entity, prospect_id, page, MAX_PER_PAGE),
            "anomalies": queries.anomalies(1, MAX_PER_PAGE, legal_entity, prospect_id),
        })  # fmt: skip

    @app.get("/api/prospect")
    def prospect_by_query_json(request: Request, legal_entity: Key, prospect_id: Key,
                               page: PageNumber = 1) -> dict:  # fmt: skip
        return prospect_json(request, legal_entity, prospect_id, page)

    @app.get("/api/prospects/{legal_entity}/{prospect_id:path}")
    def prospect_by_path_json(request: Request, legal_entity: str, prospect_id: str, page: PageNumber = 1) -> dict:
        return prospect_json(request, legal_entity, prospect_id, page)

    @app.get("/api/anomalies")
    def anomalies_json(request: Request, paged: tuple[int, int] = Paging) -> dict:
        return store.queries(request).anomalies(*paged).as_json()

    @app.get("/api/kept")
    def kept_json(request: Request, paged: tuple[int, int] = Paging) -> dict:
        return store.queries(request).kept(*paged).as_json()

    @app.get("/api/drift")
    def drift_json(request: Request, run_id: str | None = Query(None, max_length=250), paged: tuple[int, int] = Paging) -> dict:
        queries = store.queries(request)
        return json_value(drift_report(queries, latest_drift_check(), run_id, *paged))

    @app.get("/api/runs")
    def runs_json(request: Request) -> dict:
        return {"dags": run_histories(store.queries(request), dag_runs)}

    @app.get("/api/failures")
    def failures_json(request: Request, dag_id: Key = "", run_id: Key = "",
                      paged: tuple[int, int] = Paging) -> dict:  # fmt: skip
        return store.queries(request).failures(*paged, dag_id=dag_id, run_id=run_id).as_json()

    return app

