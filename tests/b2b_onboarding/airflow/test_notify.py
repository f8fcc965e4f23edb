"""A task that fails for good: one clear log line, a row in b2b_task_failures, and an alert through the
connection `b2b_alerts` (an email by Airflow's SMTP provider, or a webhook by its http provider), each
received here by a local server."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from types import SimpleNamespace
from urllib.parse import urlsplit

import pytest
from airflow.sdk._shared.secrets_masker import redact as airflow_redact
from alert_receivers import smtp_connection, smtp_receiver, webhook_connection, webhook_receiver

from b2b_onboarding.airflow import notifier as notify
from b2b_onboarding.airflow.params import task_failed  # the DAGs' on_failure_callback
from b2b_onboarding.errors import D365Error
from b2b_onboarding.store.state import StateStore
from d365_fakes.tls import ensure_tls

FAILED_AT = datetime(2026, 11, 21, 2, 14, tzinfo=UTC)


def context(error: BaseException | str | None, map_index: int = 2, rendered: str | None = "usrt P-000001…P-000009"):
    ti = SimpleNamespace(dag_id="b2b_prospect_sync", run_id="scheduled__2026-11-21T02:00:00+00:00",
                         task_id="push_leads", map_index=map_index, rendered_map_index=rendered, try_number=3,
                         end_date=FAILED_AT)  # fmt: skip
    return {"ti": ti, "exception": error, "run_id": ti.run_id}


def dataverse_503() -> D365Error:
    return D365Error(system="Dataverse (Sales)", operation="upsert leads", status=503, code="0x80040216",
                     message="Service Unavailable", record="9 leads (usrt/P-000001 … usrt/P-000009)", attempts=6)  # fmt: skip


@pytest.fixture
def logged(caplog, capsys):
    """Everything logged so far: reading a connection sets up Airflow's logging, which from then on
    writes the product's records to stdout rather than to pytest's log capture."""
    caplog.set_level(logging.INFO, logger="b2b_onboarding")
    return lambda: caplog.text + capsys.readouterr().out


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    """A local CA and a server certificate for 127.0.0.1, as the fakes serve HTTPS with."""
    return ensure_tls(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def state(monkeypatch, tmp_path):
    """The state store the callback records into, through the `d365_state` connection."""
    path = tmp_path / "state.db"
    monkeypatch.setenv("AIRFLOW_CONN_D365_STATE", json.dumps({"conn_type": "generic", "schema": str(path),
                                                              "extra": {"driver": "sqlite"}}))  # fmt: skip
    monkeypatch.delenv("AIRFLOW_CONN_B2B_ALERTS", raising=False)
    return StateStore(f"sqlite:///{path}")


def test_a_failed_call_is_one_line_with_the_task_its_chunk_the_record_the_system_the_status_and_the_next_step():
    line = notify.failure_of(context(dataverse_503())).line()
    assert "\n" not in line
    assert line.startswith("TASK FAILED b2b_prospect_sync.push_leads[usrt P-000001…P-000009] "
                           "run scheduled__2026-11-21T02:00:00+00:00 try 3, no retries left: D365Error: ")  # fmt: skip
    for part in ("Dataverse (Sales)", "upsert leads for 9 leads (usrt/P-000001 … usrt/P-000009)", "HTTP 503",
                 "after 6 attempts", "Next step: the service kept failing"):  # fmt: skip
        assert part in line


def test_a_long_message_keeps_its_first_line_and_says_how_much_follows_and_no_error_still_reads():
    failure = notify.failure_of(context(RuntimeError("SLA check failed: 2 open anomalies.\ntable\nrows"), -1, None))
    assert failure.task == "push_leads"
    assert failure.line().endswith("RuntimeError: SLA check failed: 2 open anomalies. (+2 more lines in the task's log)")
    assert failure.error.count("\n") == 2  # kept whole for the store and the alert
    silent = notify.failure_of(context(None))
    assert silent.error_type == "Failure" and "killed" in silent.line()


def test_secrets_in_an_error_are_redacted_before_they_are_logged_kept_or_sent():
    failure = notify.failure_of(context(RuntimeError("token refused: Bearer abcdefghijklmnopqrstuvwxyz0123")))
    assert "abcdefghijklmnopqrstuvwxyz0123" not in failure.error and "Bearer ***" in failure.error


def test_the_callback_logs_the_line_and_records_the_failure_without_an_alert_connection(state, logged):
    task_failed(context(dataverse_503()))
    text = logged()
    lines = [line for line in text.splitlines() if "TASK FAILED" in line]
    assert len(lines) == 1 and "TASK FAILED b2b_prospect_sync.push_leads[usrt P-000001…P-000009]" in lines[0]
    assert "HTTP 503" in lines[0] and "Next step:" in lines[0]
    assert "no Airflow connection 'b2b_alerts'" in text
    rows = state.task_failures().to_dict("records")
    assert len(rows) == 1
    row = rows[0]
    assert (row["dag_id"], row["task_id"], row["map_index"], row["try_number"]) == ("b2b_prospect_sync", "push_leads", 2, 3)
    assert row["rendered_map_index"] == "usrt P-000001…P-000009" and row["run_id"].startswith("scheduled__")
    assert row["error"].startswith("D365Error: Dataverse (Sales): upsert leads") and "HTTP 503" in row["error"]
    assert row["failed_at"].replace(tzinfo=UTC) == FAILED_AT  # SQLite keeps naive UTC

    task_failed(context(dataverse_503()))  # the same try reported twice is one row
    assert len(state.task_failures()) == 1


def test_an_smtp_connection_emails_the_failure_through_airflows_smtp_provider(state, monkeypatch):
    with smtp_receiver() as inbox:
        monkeypatch.setenv("AIRFLOW_CONN_B2B_ALERTS", smtp_connection(inbox, ["oncall@contoso.example", "b2b@contoso.example"]))
        task_failed(context(dataverse_503()))
    assert len(inbox.mails) == 1
    mail = inbox.mails[0]
    assert mail.sender == "airflow@b2b.example"
    assert sorted(mail.recipients) == ["b2b@contoso.example", "oncall@contoso.example"]
    assert mail.subject == "[B2B onboarding] b2b_prospect_sync.push_leads[usrt P-000001…P-000009] failed: D365Error"
    assert "HTTP 503" in mail.html and "Next step:" in mail.html and "scheduled__2026-11-21T02:00:00+00:00" in mail.html
    assert len(state.task_failures()) == 1  # recorded as well


def test_an_http_connection_posts_the_failure_as_json_with_its_token(state, monkeypatch, logged):
    with webhook_receiver() as hook:
        monkeypatch.setenv("AIRFLOW_CONN_B2B_ALERTS", webhook_connection(hook, token="hook-token-123456"))
        task_failed(context(dataverse_503()))
    assert len(hook.posts) == 1
    post = hook.posts[0]
    assert post.path == "/hooks/b2b-alerts" and post.headers["Authorization"] == "Bearer hook-token-123456"
    body = post.body
    assert body["text"].startswith("TASK FAILED b2b_prospect_sync.push_leads[usrt P-000001…P-000009]")
    assert {key: body[key] for key in ("dag_id", "task_id", "map_index", "try_number", "error_type")} == {
        "dag_id": "b2b_prospect_sync", "task_id": "push_leads", "map_index": 2, "try_number": 3,
        "error_type": "D365Error"}  # fmt: skip
    assert body["failed_at"] == "2026-11-21T02:14:00+00:00" and "HTTP 503" in body["error"]
    text = logged()
    assert "alert posted to the webhook at http://127.0.0.1:" in text
    assert "hooks/b2b-alerts" not in text  # a webhook's path may be its secret


def test_a_failing_alert_is_logged_and_never_raised_and_the_failure_is_still_recorded(state, monkeypatch, logged):
    with webhook_receiver() as hook:
        hook.status = 500
        monkeypatch.setenv("AIRFLOW_CONN_B2B_ALERTS", webhook_connection(hook))
        task_failed(context(dataverse_503()))
    assert "no alert was sent for this failure: RuntimeError: the webhook at http://127.0.0.1:" in logged()
    monkeypatch.setenv("AIRFLOW_CONN_B2B_ALERTS", json.dumps({"conn_type": "smtp", "host": "127.0.0.1", "port": 9,
                                                              "extra": {"disable_ssl": True, "disable_tls": True}}))  # fmt: skip
    task_failed(context(dataverse_503()))
    assert "names no recipient" in logged()
    monkeypatch.setenv("AIRFLOW_CONN_B2B_ALERTS", json.dumps({"conn_type": "generic", "host": "x"}))
    task_failed(context(dataverse_503()))
    assert "has conn_type 'generic'" in logged()
    assert len(state.task_failures()) == 1


@pytest.mark.parametrize("form", ["uri", "host_port_endpoint", "extra_url", "http_provider_schema"])
def test_every_form_of_the_webhook_connection_reaches_the_webhook(state, monkeypatch, form):
    with webhook_receiver() as hook:
        port = urlsplit(hook.url).port
        connection = {
            "uri": f"http://127.0.0.1:{port}/hooks/b2b-alerts",  # conn_type http, schema "hooks/b2b-alerts"
            "host_port_endpoint": json.dumps({"conn_type": "http", "host": "127.0.0.1", "port": port,
                                              "extra": {"endpoint": "/hooks/b2b-alerts"}}),
            "extra_url": json.dumps({"conn_type": "https", "host": "ignored.invalid", "extra": {"url": hook.url}}),
            "http_provider_schema": json.dumps({"conn_type": "http", "host": "127.0.0.1", "port": port,
                                                "schema": "http", "extra": {"endpoint": "hooks/b2b-alerts"}}),
        }[form]  # fmt: skip
        monkeypatch.setenv("AIRFLOW_CONN_B2B_ALERTS", connection)
        task_failed(context(dataverse_503()))
    assert [(post.path, post.body["task_id"]) for post in hook.posts] == [("/hooks/b2b-alerts", "push_leads")]


def test_an_https_webhook_is_verified_against_the_connections_ca_bundle_and_never_without(state, monkeypatch, tls,
                                                                                           logged):  # fmt: skip
    with webhook_receiver(tls=(tls.cert, tls.key)) as hook:
        port = urlsplit(hook.url).port
        fields = {"conn_type": "https", "host": "127.0.0.1", "port": port, "schema": "hooks/b2b-alerts"}
        # extra `verify` is the http provider's switch for TLS verification: this connection ignores it
        monkeypatch.setenv("AIRFLOW_CONN_B2B_ALERTS", json.dumps({**fields, "extra": {"verify": False}}))
        task_failed(context(dataverse_503()))
        assert hook.posts == []
        text = logged()
        assert (f"no alert was sent for this failure: RuntimeError: the webhook at https://127.0.0.1:{port} was not "
                "reached (SSLError: ") in text and "CERTIFICATE_VERIFY_FAILED" in text  # fmt: skip
        assert "Next step: check the connection 'b2b_alerts' (URL, CA bundle)" in text
        monkeypatch.setenv("AIRFLOW_CONN_B2B_ALERTS", json.dumps({**fields, "extra": {"ca_bundle": "/nowhere/ca.pem"}}))
        task_failed(context(dataverse_503()))
        assert "was not reached (OSError: Could not find a suitable TLS CA certificate bundle, invalid path: " \
               "/nowhere/ca.pem)" in logged()  # fmt: skip
        assert hook.posts == []

        extra = {"ca_bundle": str(tls.ca_bundle), "headers": {"X-Team": "b2b-onboarding"}, "timeout": 5}
        fields |= {"password": "hook-token-123456", "extra": extra}
        monkeypatch.setenv("AIRFLOW_CONN_B2B_ALERTS", json.dumps(fields))
        task_failed(context(dataverse_503()))
    assert len(hook.posts) == 1
    post = hook.posts[0]
    assert post.path == "/hooks/b2b-alerts" and post.body["error_type"] == "D365Error"
    assert post.headers["X-Team"] == "b2b-onboarding" and post.headers["Authorization"] == "Bearer hook-token-123456"
    # the connection's other extras are options, not headers (as the http provider would send them)
    assert not {"ca_bundle", "timeout", "verify", "headers"} & {name.lower() for name in post.headers}
    assert f"alert posted to the webhook at https://127.0.0.1:{port}" in logged()


def test_an_unreachable_webhook_is_logged_without_its_path_which_airflows_masker_also_hides(state, monkeypatch, logged):
    with webhook_receiver(path="/services/T0/B0/secret-part") as hook:
        url = hook.url
    monkeypatch.setenv("AIRFLOW_CONN_B2B_ALERTS", json.dumps({"conn_type": "http", "host": url}))  # nothing listens now
    task_failed(context(dataverse_503()))
    warning = next(line for line in logged().splitlines() if "no alert was sent" in line)
    assert f"RuntimeError: the webhook at http://{urlsplit(url).netloc} was not reached (ConnectionError: " in warning
    assert "secret-part" not in warning
    # the http provider's own log lines go through Airflow's masker in a task's log
    assert airflow_redact("url: /services/T0/B0/secret-part (Caused by") == "url: *** (Caused by"
    assert len(state.task_failures()) == 1


@pytest.mark.parametrize(("fields", "url"), [
    ({"conn_type": "https", "host": "https://hooks.contoso.example/services/T0/B0/x"},
     "https://hooks.contoso.example/services/T0/B0/x"),
    ({"conn_type": "https", "host": "hooks.contoso.example", "extra": {"endpoint": "/b2b"}}, "https://hooks.contoso.example/b2b"),
    ({"conn_type": "http", "host": "localhost", "port": 8080, "schema": "hook"}, "http://localhost:8080/hook"),
    ({"conn_type": "http", "host": "ignored", "extra": {"url": "https://alerts.example/x"}}, "https://alerts.example/x"),
    ({"conn_type": "http", "host": "alerts.example", "schema": "https"}, "https://alerts.example"),
])  # fmt: skip
def test_the_webhook_url_comes_from_the_connection(fields, url):
    conn = SimpleNamespace(**{"conn_id": "b2b_alerts", "port": None, "schema": None,
                              **{k: v for k, v in fields.items() if k != "extra"}})
    conn.extra_dejson = fields.get("extra", {})
    assert notify.webhook_url(conn) == url
