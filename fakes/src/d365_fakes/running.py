"""Start the fakes as a subprocess for a `with` block, and drive their admin surface.

    with running_fakes(tmp_path, [{"client_id": "app", "client_secret": "s3cret"}]) as fakes:
        FakeAdmin(fakes).seed_prospects([...])
        ...  # point MSAL at fakes.authority and httpx at fakes.commerce, with fakes.ca_bundle

For the demo, the test suite and users' own integration tests.
"""

from __future__ import annotations

import json
import os
import select
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

STARTUP_TIMEOUT_S = 30
STOP_TIMEOUT_S = 10
CLIENTS_FILE = "clients.json"
STDERR_FILE = "fakes.stderr.log"
# Python names of repeatable flags spelled otherwise on the command line (a list value gives the
# flag once per item): `faults=[rule, ...]` is `--fault rule ...`.
REPEATED_FLAGS = {"faults": "--fault"}


@dataclass(frozen=True)
class Endpoints:
    entra: str
    tenant_id: str
    authority: str  # for MSAL: f"{entra}/{tenant_id}"
    commerce: str  # the Commerce resource (token audience); OData root is f"{commerce}/data"
    dataverse: str  # the Dataverse resource; Web API root is f"{dataverse}/api/data/v9.2"
    ca_bundle: str  # give it to MSAL (`verify=`) and httpx
    pid: int
    admin: str  # the `/_admin` surface, on a loopback address (it answers nobody else)


class FakesFailedToStart(RuntimeError):
    pass


@contextmanager
def running_fakes(
    state_dir: Path, clients: list[dict[str, Any]], **flags: Any
) -> Iterator[Endpoints]:
    """Run `python -m d365_fakes serve` for the duration of the block.

    `flags` are the serve options in Python spelling (`commerce_page_size=3`, `tenant_id=...`),
    among them service protection: `limits` (True/False or "on"/"off"), `latency_ms`,
    `dataverse_requests`, `dataverse_window_s`, `dataverse_execution_s`, `dataverse_concurrent`,
    `commerce_requests`, `commerce_window_s`; `delta_token_ttl_s`; and fault injection:
    `faults=[{rule}, ...]` (one `--fault` each) and `fault_seed`. Ports default to 0 (any free
    port) so parallel runs do not collide.
    """
    state_dir = Path(state_dir).resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    clients_file = state_dir / CLIENTS_FILE
    _write_private_json(clients_file, clients)

    options = {"entra_port": 0, "commerce_port": 0, "dataverse_port": 0, **flags}
    command = [sys.executable, "-m", "d365_fakes", "serve"]
    command += ["--state-dir", str(state_dir), "--clients", str(clients_file)]
    for name, value in options.items():
        flag = REPEATED_FLAGS.get(name, f"--{name.replace('_', '-')}")
        for item in value if isinstance(value, (list, tuple)) else [value]:
            command += [flag, _flag_value(item)]

    stderr_path = state_dir / STDERR_FILE
    # stderr goes to a file rather than a pipe: an unread pipe would block a chatty server.
    # Appended to, so that a failed second start does not wipe a running instance's log.
    with open(stderr_path, "ab") as stderr, subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=stderr, env=dict(os.environ)
    ) as process:
        try:
            endpoints = _read_endpoints(process, stderr_path)
            yield endpoints
        finally:
            _stop(process)


class FakeAdmin:
    """Client of the fakes' `/_admin` surface (served on the Entra port, so that admin calls do
    not show up in the Commerce or Dataverse request counts)."""

    def __init__(self, endpoints: Endpoints) -> None:
        self._http = httpx.Client(
            base_url=endpoints.admin,
            verify=ssl.create_default_context(cafile=endpoints.ca_bundle),
            timeout=30,
        )

    def __enter__(self) -> FakeAdmin:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def reset(self) -> None:
        """Empty both states and the fault plan (rules and statistics), forget token revocations
        and the service protection windows."""
        self._checked(self._http.post("/reset"))
        self.reset_limits()

    def seed_prospects(self, rows: list[dict[str, Any]]) -> int:
        return self._checked(self._http.post("/commerce/prospects", json={"prospects": rows}))[
            "created"
        ]

    def seed_companies(self, codes: list[str]) -> int:
        """cdm_companies rows for the legal entities `codes` ("usrt", ...), as dual-write's
        legal-entity map creates them (seed_prospects does it for its prospects' companies); codes
        already there, in any case, are skipped. Answers how many were created."""
        return self._checked(self._http.post("/dataverse/companies", json={"codes": codes}))["created"]

    def outbox(self) -> list[dict[str, Any]]:
        return self._checked(self._http.get("/commerce/outbox"))["emails"]

    def counts(self) -> dict[str, Any]:
        return self._checked(self._http.get("/counts"))

    def inject_fault(
        self, system: str, status: int, count: int = 1, retry_after: int | None = None
    ) -> None:
        """The next `count` requests to `system` ("commerce", "dataverse" or "entra") answer
        `status`, with `Retry-After: retry_after` if given. Cleared by `clear_faults` and `reset`."""
        rule = {"retry_after": retry_after} if retry_after is not None else {}
        self.add_fault(system=system, status=status, count=count, **rule)

    def add_fault(self, **rule: Any) -> None:
        """Add a fault rule after the others: `system`, `kind` ("status", "slow" or "reset"),
        `status`, `retry_after`, `delay_s`, `phase`, `route`, `method`, and `count` or `share`
        (see CONTRACT.md). A wrong field raises RuntimeError naming it. Cleared by `clear_faults`
        and `reset`."""
        self._checked(self._http.post("/faults", json=rule))

    def faults(self) -> dict[str, Any]:
        """`{"seed": n, "rules": [{rule fields..., "remaining", "fired"}], "served": {system:
        {"503": n, "slow": n, "reset": n, ...}}}`."""
        return self._checked(self._http.get("/faults"))

    def clear_faults(self) -> None:
        """Drop every rule and the fault statistics."""
        self._checked(self._http.delete("/faults"))

    def revoke_tokens(self, client_id: str | None = None) -> None:
        """Revoke every token issued so far to `client_id` (None: to every client): the APIs answer
        them 401. Tokens issued afterwards work."""
        self._checked(self._http.post("/tokens/revoke", json={} if client_id is None else {"client_id": client_id}))

    def security(self, **body: Any) -> None:
        """Change the tenant's security until reset: `security(client_id=..., system="dataverse",
        application_user=False)` removes the app's user there; `revoke=["prvCreateLead", ...]` takes
        privileges from its roles (HQ: e.g. "CustomersV3EntityCreate"; CONTRACT.md, Security)."""
        self._checked(self._http.post("/security", json=body))

    def skew_clock(self, seconds: float) -> None:
        """Run Microsoft's side (Entra token times, Date headers, token checks) `seconds` off this
        machine's clock, until reset."""
        self._checked(self._http.post("/clock", json={"skew_s": seconds}))

    def change_model(self, **body: Any) -> None:
        """Make the tenant's tables differ from the default ones, in metadata and behaviour:
        `system="dataverse", table="lead"` with `remove_columns=[...]`, `key_status="Failed"`,
        `remove_keys=True`, `max_lengths={"lastname": 80}` or `options={"msdyn_b2bprospectstatus":
        {"Pending": 100000000, ...}}`; `system="commerce", table="Prospects"` with `remove_columns=[...]`
        or `max_lengths={...}`. A wrong field raises RuntimeError naming it. Undone by `reset`."""
        self._checked(self._http.post("/model", json=body))

    def remove_saved_view(self, name: str) -> None:
        """The Dataverse system view `name` ("All Commerce B2B leads") is gone until `reset`."""
        self._checked(self._http.delete(f"/dataverse/savedqueries/{quote(name, safe='')}"))

    def reject_writes(self, entity_set: str, column: str, value: str, message: str | None = None) -> None:
        """Dataverse refuses any write of a row whose `column` is `value` (400, 0x80040265), as a
        synchronous plugin that throws on one record would. Cleared by `clear_rejections` and `reset`."""
        rejection = {"entity_set": entity_set, "column": column, "value": value}
        self._checked(self._http.post("/dataverse/rejections", json=rejection | ({"message": message} if message else {})))

    def clear_rejections(self) -> None:
        self._checked(self._http.delete("/dataverse/rejections"))

    def decide(self, decisions: list[dict[str, str]], as_client_id: str | None = None) -> dict[str, Any]:
        """Sellers' decisions in bulk: `[{"msdyn_prospectid": ..., "outcome": "won" | "lost" |
        "disqualified" | "qualified"}]`, applied as the Web API actions apply them; the answer is
        `{"applied": n, "errors": [{"index", "msdyn_prospectid", "error"}]}`."""
        body: dict[str, Any] = {"decisions": decisions} | ({"as_client_id": as_client_id} if as_client_id else {})
        return self._checked(self._http.post("/dataverse/decisions", json=body, timeout=600))

    def limits(self) -> dict[str, Any]:
        """`{"enabled", "latency_ms", "dataverse": {requests, window_s, execution_s, concurrent,
        throttled: {code: n}}, "commerce": {requests, window_s, throttled: {"requests": n}}}`."""
        return self._checked(self._http.get("/limits"))

    def set_limits(self, **values: Any) -> dict[str, Any]:
        """Change some limits, named as the serve flags (`dataverse_requests=10`, `latency_ms=50`,
        `enabled=False`); the answer is `limits()`. The windows and counts carry on."""
        return self._checked(self._http.post("/limits", json=values))

    def reset_limits(self) -> None:
        """Forget every caller's window and the 429 counts; the limits themselves stay."""
        self._checked(self._http.post("/limits/reset"))

    @staticmethod
    def _checked(response: httpx.Response) -> Any:
        if response.is_error:
            raise RuntimeError(
                f"{response.request.method} {response.request.url} answered "
                f"{response.status_code}: {response.text}"
            )
        return response.json() if response.content else None


def _flag_value(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, dict):
        return json.dumps(value)
    return str(value)


def _read_endpoints(process: subprocess.Popen[bytes], stderr_path: Path) -> Endpoints:
    """The first stdout line of the server, waiting at most STARTUP_TIMEOUT_S."""
    assert process.stdout is not None
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    received = b""
    while b"\n" not in received:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise FakesFailedToStart(
                f"no endpoints line within {STARTUP_TIMEOUT_S} s; stderr:\n"
                + _tail(stderr_path)
            )
        ready, _, _ = select.select([process.stdout], [], [], remaining)
        if ready:
            chunk = os.read(process.stdout.fileno(), 65536)
            if not chunk:
                process.wait(timeout=STOP_TIMEOUT_S)
                raise FakesFailedToStart(
                    f"the fakes exited with code {process.returncode}; stderr:\n"
                    + _tail(stderr_path)
                )
            received += chunk
    return Endpoints(**json.loads(received.split(b"\n", 1)[0]))


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _write_private_json(path: Path, data: Any) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as file:
        os.fchmod(file.fileno(), 0o600)  # O_CREAT's mode does not apply to an existing file
        json.dump(data, file)


def _tail(path: Path, limit: int = 4000) -> str:
    text = path.read_text(encoding="utf-8", errors="replace")
    return text[-limit:] or "(empty)"
