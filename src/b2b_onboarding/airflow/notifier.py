"""Failure visibility: what the DAGs' `on_failure_callback` does when a task has failed for good.

1. logs the failure as one line: DAG, task (with its chunk), run, try, and the error, which for a
   failed call names the system, the operation, the record, the HTTP status and the next step;
2. records it in the state store (`b2b_task_failures`);
3. alerts through the Airflow connection `b2b_alerts`, if there is one, with Airflow's own notifiers:
   conn_type `smtp` sends an email (`SmtpNotifier` of the SMTP provider; extra `to`, and `from_email`),
   conn_type `http` or `https` POSTs the failure as JSON to a webhook (`HttpNotifier` of the http
   provider). README, Runbook, "Alerts".

Each part runs whatever the others did; none of them ever raises (a callback that fails is only
logged by Airflow, and would hide the failure it reports). `TaskFailureNotifier` is the three: the
notifier this provider registers, which the DAGs call through `params.task_failed`.
"""

from __future__ import annotations

import html
import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from functools import cached_property
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from airflow.providers.http.hooks.http import HttpHook
from airflow.providers.http.notifications.http import HttpNotifier
from airflow.providers.smtp.notifications.smtp import SmtpNotifier
from airflow.sdk import BaseHook, BaseNotifier, Connection
from airflow.sdk.exceptions import AirflowNotFoundException

from b2b_onboarding import redaction
from b2b_onboarding.errors import ConfigurationError

if TYPE_CHECKING:
    from requests import Response

log = logging.getLogger(__name__)

ALERTS_CONN_ID = "b2b_alerts"
WEBHOOK_TIMEOUT_S = 10.0
_NO_EXCEPTION = ("no exception reached the callback (the task was killed, timed out or was marked failed by hand); "
                 "read the task's log")  # fmt: skip


@dataclass(frozen=True)
class TaskFailure:
    dag_id: str
    run_id: str
    task_id: str
    map_index: int
    rendered_map_index: str | None
    try_number: int
    failed_at: datetime
    error_type: str
    error: str
    log_url: str | None = None
    # The chunk a mapped step task worked on, from its arguments: which prospects it held up.
    legal_entity: str | None = None
    first_id: str | None = None
    last_id: str | None = None

    @property
    def task(self) -> str:
        """The task as the Airflow UI names it, its chunk or legal entity included."""
        if self.map_index < 0:
            return self.task_id
        return f"{self.task_id}[{self.rendered_map_index or self.map_index}]"

    @property
    def summary(self) -> str:
        """The error's first line; a longer message (the SLA check's tables) says how much follows."""
        lines = [line for line in self.error.splitlines() if line.strip()] or [""]
        more = f" (+{len(lines) - 1} more lines in the task's log)" if len(lines) > 1 else ""
        return " ".join(lines[0].split()) + more

    def line(self) -> str:
        """The one line an on-call engineer reads first."""
        return (f"TASK FAILED {self.dag_id}.{self.task} run {self.run_id} try {self.try_number}, no retries left: "
                f"{self.error_type}: {self.summary}")  # fmt: skip

    def payload(self) -> dict:
        """The webhook's JSON: every field, and `text` (the one line) for chat webhooks."""
        fields = asdict(self)
        fields["failed_at"] = self.failed_at.isoformat()
        return {"text": self.line(), "task": self.task, **fields}


def failure_of(context: Mapping[str, Any]) -> TaskFailure:
    """The failure from an Airflow task context (a task's own, or the one the scheduler builds for a
    task that died)."""
    ti = context.get("ti") or context.get("task_instance")
    error = context.get("exception")
    if isinstance(error, BaseException):
        # A failure that cannot cure itself reaches Airflow as its fail-without-retry exception: the
        # product's own error, its cause, names the kind.
        named = error.__cause__ if type(error).__name__ == "AirflowFailException" and error.__cause__ else error
        error_type, text = type(named).__name__, str(error) or repr(error)
    elif error:
        error_type, text = "Error", str(error)
    else:
        error_type, text = "Failure", _NO_EXCEPTION
    dag = context.get("dag")
    try:
        log_url = getattr(ti, "log_url", None)
    except Exception:  # the URL needs the API server's base URL in the configuration
        log_url = None
    end_date = getattr(ti, "end_date", None)
    arguments = getattr(context.get("task") or getattr(ti, "task", None), "op_kwargs", None)
    chunk = {name: str(arguments[name]) if isinstance(arguments, Mapping) and arguments.get(name) is not None else None
             for name in ("legal_entity", "first_id", "last_id")}  # fmt: skip
    return TaskFailure(
        dag_id=str(getattr(ti, "dag_id", None) or getattr(dag, "dag_id", "?")),
        run_id=str(getattr(ti, "run_id", None) or context.get("run_id") or "?"),
        task_id=str(getattr(ti, "task_id", "?")),
        map_index=int(getattr(ti, "map_index", -1) if getattr(ti, "map_index", None) is not None else -1),
        rendered_map_index=getattr(ti, "rendered_map_index", None),
        try_number=int(getattr(ti, "try_number", 0) or 0),
        failed_at=end_date if isinstance(end_date, datetime) else datetime.now(UTC),
        error_type=error_type,
        error=redaction.redact(text),
        log_url=log_url if isinstance(log_url, str) else None,
        **chunk,
    )


class TaskFailureNotifier(BaseNotifier):
    """Logs, records and alerts a task that failed for good (above); never raises. A DAG of your own
    takes it as `on_failure_callback=TaskFailureNotifier()`."""

    def notify(self, context: Mapping[str, Any]) -> None:
        try:
            failure = failure_of(context)
        except Exception:
            log.exception("TASK FAILED, and its failure could not be read from the context")
            return
        log.error("%s", failure.line())
        try:
            record(failure)
        except Exception as error:
            log.warning("the failure was not recorded in the state store (b2b_task_failures): %s: %s",
                        type(error).__name__, redaction.redact(str(error)))  # fmt: skip
        try:
            send_alert(failure, context)
        except Exception as error:
            log.warning("no alert was sent for this failure: %s: %s", type(error).__name__, redaction.redact(str(error)))


def record(failure: TaskFailure) -> None:
    from b2b_onboarding.airflow.hooks import StateStoreHook

    store = StateStoreHook().get_conn()
    try:
        store.record_task_failure(
            dag_id=failure.dag_id, run_id=failure.run_id, task_id=failure.task_id, map_index=failure.map_index,
            rendered_map_index=failure.rendered_map_index, try_number=failure.try_number, failed_at=failure.failed_at,
            error=f"{failure.error_type}: {failure.error}", legal_entity=failure.legal_entity,
            first_id=failure.first_id, last_id=failure.last_id,
        )  # fmt: skip
    finally:
        store.close()


def send_alert(failure: TaskFailure, context: Mapping[str, Any] | None = None, conn_id: str = ALERTS_CONN_ID) -> str | None:
    """Alerts through the connection `conn_id`: "smtp" or "webhook" as sent, None without that connection."""
    try:
        conn = BaseHook.get_connection(conn_id)
    except AirflowNotFoundException:
        log.info("no Airflow connection %r: the failure is logged and recorded, no alert sent "
                 "(README, Runbook, \"Alerts\")", conn_id)  # fmt: skip
        return None
    conn_type = (conn.conn_type or "").lower()
    if conn_type in ("smtp", "email"):
        send_email(conn, failure, context or {})
        return "smtp"
    if conn_type in ("http", "https"):
        post_webhook(conn, failure, context or {})
        return "webhook"
    raise ConfigurationError(
        f"Airflow connection {conn_id!r} has conn_type {conn.conn_type!r}. Next step: make it an smtp connection "
        "(email) or an http/https one (webhook): README, Runbook, \"Alerts\"."
    )


def _recipients(extra: Mapping[str, Any], conn_id: str) -> list[str]:
    to = extra.get("to")
    recipients = [part.strip() for part in to.replace(";", ",").split(",")] if isinstance(to, str) else list(to or [])
    recipients = [address for address in recipients if address]
    if not recipients:
        raise ConfigurationError(f'Airflow connection {conn_id!r} names no recipient. Next step: set its extra "to", '
                                 'e.g. ["oncall@contoso.com"].')  # fmt: skip
    return recipients


def email_content(failure: TaskFailure) -> tuple[str, str]:
    """(subject, HTML body) of the alert email."""
    subject = f"[B2B onboarding] {failure.dag_id}.{failure.task} failed: {failure.error_type}"
    rows = [("DAG", failure.dag_id), ("task", failure.task), ("run", failure.run_id),
            ("try", f"{failure.try_number} (no retries left)"), ("failed at", failure.failed_at.isoformat()),
            ("error", f"{failure.error_type}: {failure.summary}")]  # fmt: skip
    table = "".join(f"<tr><th align='left'>{html.escape(name)}</th><td>{html.escape(value)}</td></tr>"
                    for name, value in rows)  # fmt: skip
    link = f"<p><a href='{html.escape(failure.log_url)}'>The task's log</a></p>" if failure.log_url else ""
    body = (f"<p>{html.escape(failure.line())}</p><table>{table}</table>{link}"
            f"<pre>{html.escape(failure.error)}</pre><p>What to do: README, section Runbook.</p>")  # fmt: skip
    return subject, body


def send_email(conn: Any, failure: TaskFailure, context: Mapping[str, Any]) -> None:
    """Through Airflow's SMTP provider: `SmtpNotifier` with the connection as its SMTP connection
    (host, port, login, password; extra `from_email`, `disable_ssl`, `disable_tls`, `timeout`)."""
    extra = conn.extra_dejson
    subject, body = email_content(failure)
    notifier = SmtpNotifier(to=_recipients(extra, conn.conn_id), from_email=extra.get("from_email"),
                            smtp_conn_id=conn.conn_id, subject=subject, html_content=body)  # fmt: skip
    # notify() rather than the notifier's __call__: the subject and body are final text, which Jinja
    # must not render (an error message may hold `{{`).
    notifier.notify(dict(context))
    log.info("alert emailed to %s through %s:%s", ", ".join(_recipients(extra, conn.conn_id)), conn.host, conn.port)


def webhook_url(conn: Any) -> str:
    """The connection's webhook: extra `url`; or a host holding the whole URL; or scheme, host, port
    and path. The scheme is the connection's schema when that is `http` or `https` (the http
    provider's convention), else the conn_type's; the path is extra `endpoint`, else any other schema
    (what a connection URI `https://host:port/path` gives)."""
    extra = conn.extra_dejson
    if extra.get("url"):
        return str(extra["url"])
    host = conn.host or ""
    if "://" in host:
        return host
    if not host:
        raise ConfigurationError(f"Airflow connection {conn.conn_id!r} has no host. Next step: set its host to the "
                                 "webhook's URL, e.g. https://hooks.contoso.com/b2b-alerts.")  # fmt: skip
    schema = conn.schema or ""
    if schema.lower() in ("http", "https"):
        scheme, path = schema.lower(), ""
    else:
        scheme, path = ("http" if (conn.conn_type or "").lower() == "http" else "https"), schema
    url = f"{scheme}://{host}" + (f":{conn.port}" if conn.port else "")
    path = str(extra.get("endpoint") or path)
    return url + ("/" + path.lstrip("/") if path else "")


def _origin(url: str) -> str:
    """The scheme and host of a URL: all of a webhook that is ever logged (its path may be its secret)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


class AlertWebhookHook(HttpHook):
    """The http provider's hook on the alert connection as this product reads it (README, Runbook,
    "Alerts"): the URL of `webhook_url`, extra `ca_bundle` trusted (TLS is always verified), extra
    `timeout`; no other extra becomes a header, as HttpHook would make it. An error answer is raised
    naming the webhook, the connection and the next step."""

    @classmethod
    def get_connection(cls, conn_id: str) -> Connection:
        conn = super().get_connection(conn_id)
        extra = conn.extra_dejson
        options = {"verify": extra.get("ca_bundle") or True, "timeout": float(extra.get("timeout", WEBHOOK_TIMEOUT_S))}
        return Connection(conn_id=conn.conn_id, conn_type=conn.conn_type, host=webhook_url(conn),
                          extra=json.dumps(options))  # fmt: skip

    def check_response(self, response: Response) -> None:
        if not response.ok:
            raise RuntimeError(f"the webhook at {_origin(self.base_url)} answered HTTP {response.status_code}. "
                               f"Next step: check the connection {self.http_conn_id!r} (URL, token) and the receiving "
                               "service")  # fmt: skip


class AlertWebhookNotifier(HttpNotifier):
    """`HttpNotifier` on `AlertWebhookHook`."""

    @cached_property
    def hook(self) -> HttpHook:
        return AlertWebhookHook(method=self.method, http_conn_id=self.http_conn_id)


def post_webhook(conn: Any, failure: TaskFailure, context: Mapping[str, Any]) -> None:
    """POSTs the failure as JSON through the http provider (`AlertWebhookNotifier`); a password on the
    connection goes as `Authorization: Bearer`, extra `headers` are added. The password and the
    webhook's path and query are hidden from every log first."""
    url = webhook_url(conn)
    from b2b_onboarding.airflow.hooks import hide_from_logs

    hide_from_logs(conn.password, urlsplit(url)._replace(scheme="", netloc="").geturl())
    headers = {str(name): str(value) for name, value in (conn.extra_dejson.get("headers") or {}).items()}
    if conn.password:
        headers["Authorization"] = f"Bearer {conn.password}"
    notifier = AlertWebhookNotifier(http_conn_id=conn.conn_id, json=failure.payload(), headers=headers)
    try:
        # notify() rather than the notifier's __call__: the payload is final text, which Jinja must not
        # render (an error message may hold `{{`).
        notifier.notify(dict(context))
    except OSError as error:  # requests' errors (connection, TLS, timeout) and an unreadable CA bundle
        raise RuntimeError(f"the webhook at {_origin(url)} was not reached ({type(error).__name__}: {error}). "
                           f"Next step: check the connection {conn.conn_id!r} (URL, CA bundle) and the receiving "
                           "service") from error  # fmt: skip
    log.info("alert posted to the webhook at %s", _origin(url))
