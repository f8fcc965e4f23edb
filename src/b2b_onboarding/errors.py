"""Typed failures of the two Dynamics 365 systems, worded for the engineer who reads them."""

from __future__ import annotations

import re
import ssl
from urllib.parse import urlsplit

# What an on-call engineer should do next, by HTTP status.
_NEXT_STEP = {
    400: "fix the record or the request named above; the record is kept and retried on the next run",
    401: ("check the connection's client id, secret and authority, and that the app has a user in the system "
          "(HQ: a row for its client id in System administration > Setup > Microsoft Entra applications)"),
    403: ("give the connection's application user a security role that allows this operation (README, Before the "
          "first run on your tenant)"),
    404: "the record is gone from the target system; check whether someone deleted it",
    409: "another writer changed the record; rerun the task",
    412: "the record changed since it was read; rerun the task",
    429: "the service is throttling this client; rerun later or lower the task's concurrency",
}
_SERVER_ERROR_STEP = "the service failed; rerun the task, and check the service's health if it persists"
_UNREADABLE_ANSWER_STEP = ("whether the writes were applied is unknown: rerun the task (nothing is written twice), and "
                           "if it persists report it to Microsoft support with the request id")
# Next steps by the service's error code, where the code says more than the status. These cannot
# cure themselves, so none says "rerun".
_CODE_STEP = {
    "0x80040237": ("another record already holds this key in Sales (keys compare case-insensitively, so "
                   "'USMF:P-1' and 'usmf:P-1' are one key): find the lead with that key, and merge or delete the extra "
                   "one; the next sync adopts the one that remains"),
}


# What a security refusal names, in Dataverse's message (0x80040220) and in HQ's (fakes' CONTRACT.md, Security).
_PRIVILEGE_DENIED = "0x80040220"
_NOT_A_MEMBER = "0x80072560"
_MISSING_PRIVILEGE = re.compile(r"is missing (?P<privilege>prv\w+) privilege .*?for entity '(?P<entity>\w+)'")
_MISSING_HQ_ACCESS = re.compile(r"has no (?P<access>\w+) access to data entity (?P<entity>\w+)")
_BEFORE_FIRST_RUN = "(README, Before the first run on your tenant)"


def _security_step(error: D365Error) -> str | None:
    """The next step of a refusal by the system's security, naming the connection to fix and what to
    grant; None for any other failure."""
    connection = f"connection {error.connection!r}" if error.connection else "this connection"
    code = error.code.lower()
    if error.status == 403 and code == _NOT_A_MEMBER:
        return (f"the client id of {connection} has no application user in this Dataverse environment: add one (Power "
                "Platform admin center > the environment > Settings > Users + permissions > Application users) and "
                f"give it the role 'Commerce B2B onboarding integration' {_BEFORE_FIRST_RUN}")  # fmt: skip
    if error.status == 403 and code == _PRIVILEGE_DENIED and (found := _MISSING_PRIVILEGE.search(error.message)):
        return (f"give the application user of {connection} a role with {found['privilege']} on {found['entity']} "
                f"{_BEFORE_FIRST_RUN}")  # fmt: skip
    if error.status == 403 and (found := _MISSING_HQ_ACCESS.search(error.message)):
        return (f"give the HQ user that {connection}'s client id maps to (System administration > Setup > Microsoft Entra "
                f"applications) a role with {found['access']} access to data entity {found['entity']} "
                f"{_BEFORE_FIRST_RUN}")  # fmt: skip
    return None


def one_line(text: str) -> str:
    """A service's message on one line, whole: its line breaks (Entra ID's trace and correlation ids,
    a stack of inner errors) become spaces, so the first line of a failure is the whole failure."""
    return " ".join(str(text).split())


def via(system: str, connection: str | None) -> str:
    """The system as a failure names it: with the Airflow connection to fix, when known."""
    return f"{system} via Airflow connection {connection!r}" if connection else system


class D365Error(Exception):
    """A failed call to Commerce headquarters or Dataverse.

    Carries everything a 3 a.m. reader needs: the Airflow connection, the system, the operation,
    the record, the HTTP status, the service's own error code and message, the id the service gave
    the request (what Microsoft support asks for), and the next step, on one line.
    """

    def __init__(
        self,
        *,
        system: str,
        operation: str,
        status: int,
        code: str = "",
        message: str = "",
        record: str | None = None,
        attempts: int = 1,
        connection: str | None = None,
        request_id: str = "",
    ) -> None:
        self.system = system
        self.operation = operation
        self.status = status
        self.code = code
        self.message = message
        self.record = record
        self.attempts = attempts
        self.connection = connection
        self.request_id = request_id
        super().__init__(str(self))

    @property
    def next_step(self) -> str:
        if self.status == 0:
            return "the service did not answer (network, DNS or TLS); check the connection's host and CA bundle"
        if self.attempts > 1 and (self.status == 429 or self.status >= 500):
            return ("the service kept failing and this task's retries are spent; rerun the task later (nothing "
                    "is written twice), and check the service's health if it persists")  # fmt: skip
        if self.status >= 500:
            return _SERVER_ERROR_STEP
        if 200 <= self.status < 300:  # the service said it succeeded, but its answer could not be read whole
            return _UNREADABLE_ANSWER_STEP
        if step := _security_step(self):
            return step
        if self.code.lower() in _CODE_STEP:
            return _CODE_STEP[self.code.lower()]
        return _NEXT_STEP.get(self.status, "read the service's message above and fix the cause")

    @property
    def cures_itself(self) -> bool:
        """Whether a later try may succeed: not for refused credentials (a 401 stands after a fresh
        token) or a missing privilege (403)."""
        return self.status not in (401, 403)

    @property
    def is_record_error(self) -> bool:
        """A failure of this one record (bad data, conflict), not of the integration as a whole."""
        return 400 <= self.status < 500 and self.status not in (401, 403, 408, 429)

    def __str__(self) -> str:
        subject = f" for {self.record}" if self.record else ""
        code = f" {self.code}" if self.code else ""
        answer = f"HTTP {self.status}{code}" if self.status else "no HTTP answer"
        tries = f" after {self.attempts} attempts" if self.attempts > 1 else ""
        request_id = f" Request id: {self.request_id} (give it to Microsoft support)." if self.request_id else ""
        return (
            f"{via(self.system, self.connection)}: {self.operation}{subject} failed{tries} with {answer}: "
            f"{one_line(self.message).rstrip('.') or '(no message)'}.{request_id} Next step: {self.next_step}."
        )

    def for_record(self, record: str) -> D365Error:
        """The same failure, naming the business record it concerns."""
        return self._with(record=record)

    def after(self, attempts: int) -> D365Error:
        """The same failure, saying how many attempts it took."""
        return self._with(attempts=attempts)

    def _with(self, **changes: object) -> D365Error:
        fields = {"system": self.system, "operation": self.operation, "status": self.status, "code": self.code,
                  "message": self.message, "record": self.record, "attempts": self.attempts,
                  "connection": self.connection, "request_id": self.request_id}  # fmt: skip
        return type(self)(**{**fields, **changes})


class AuthenticationError(Exception):
    """Entra ID refused to issue a token; never carries the secret. `transient` when Entra ID was
    unavailable (a later attempt may succeed) rather than refusing the credentials."""

    def __init__(self, message: str, transient: bool = False) -> None:
        super().__init__(one_line(message))
        self.transient = transient

    def for_connection(self, system: str, connection: str | None) -> AuthenticationError:
        """The same failure, led by the system whose token it was and the Airflow connection to fix."""
        return type(self)(f"{via(system, connection)}: {self}", self.transient)


class ConfigurationError(Exception):
    """A connection or setting is missing or malformed."""


def cures_itself(error: BaseException) -> bool:
    """Whether retrying the task may succeed. Refused credentials, configuration, TLS trust (a
    ConfigurationError) and missing privileges cannot cure themselves: the task fails at once."""
    if isinstance(error, ConfigurationError):
        return False
    if isinstance(error, AuthenticationError):
        return error.transient
    if isinstance(error, D365Error):
        return error.cures_itself
    return True


def first_line(error: BaseException) -> str:
    """The one line a failure starts with: the product's own errors already are one; anything else
    is its type and its message's first line."""
    if isinstance(error, (D365Error, AuthenticationError, ConfigurationError)):
        return one_line(str(error))
    lines = [line for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0].strip()}" if lines else type(error).__name__


class DecisionConflict(Exception):
    """A target's state contradicts the seller's decision; reported as an anomaly of `kind`, never
    overwritten."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def certificate_verify_failure(error: BaseException) -> str | None:
    """Why TLS verification refused the server's certificate (OpenSSL's words), if that is what
    `error` is, anywhere in its chain of causes; None for any other failure. Such a failure is
    permanent: never retried."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [error]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, ssl.SSLCertVerificationError):
            return f"certificate verify failed: {current.verify_message}" if current.verify_message else (
                "certificate verify failed")  # fmt: skip
        text = str(current)
        if "CERTIFICATE_VERIFY_FAILED" in text:
            found = re.search(r"certificate verify failed(?::\s*(?P<reason>[^(]*?))?\s*(?:\(_ssl\.c|$)", text)
            reason = found and found["reason"]
            return f"certificate verify failed: {reason.strip()}" if reason else "certificate verify failed"
        pending += [current.__cause__, current.__context__]
    return None


def certificate_failure_message(system: str, url: str, reason: str, ca_bundle: str | None) -> str:
    """The whole sentence, next step included, for a request to `url` whose TLS certificate was
    refused for `reason` (from `certificate_verify_failure`): by the CA bundle, or without one by
    the system trust store. TLS verification is never the thing to turn off."""
    parts = urlsplit(str(url))
    origin = f"{parts.scheme}://{parts.netloc}" if parts.scheme and parts.netloc else str(url)
    if "hostname mismatch" in reason.lower() or "expired" in reason.lower() or "not yet valid" in reason.lower():
        return (
            f"{system}: the TLS certificate of {origin} is not valid ({reason}). TLS verification stays on. "
            "Next step: the certificate itself is wrong (issued for another host name, or out of date); fix "
            "the service's certificate, or the connection's host if it names the service differently."
        )
    trust = f"the CA bundle {ca_bundle}" if ca_bundle else "the system trust store"
    alternative = "or remove it to use the system trust store" if ca_bundle else "or add that CA to the system trust store"
    return (
        f"{system}: the TLS certificate of {origin} is not trusted by {trust} ({reason}). TLS verification "
        f'stays on. Next step: set the connection\'s extra "ca_bundle" to a CA bundle (PEM file) holding the CA '
        f"that signed the service's certificate (for the fakes: <state_dir>/ca.pem), {alternative}."
    )
