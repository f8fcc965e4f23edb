"""Typed failures of the two Dynamics 365 systems, worded for the engineer who reads them."""

from __future__ import annotations

# What an on-call engineer should do next, by HTTP status.
_NEXT_STEP = {
    400: "fix the record or the request named above; the record is kept and retried on the next run",
    401: "check the connection's client id, secret and authority, and that the app user exists",
    403: "grant the application user the security role this operation needs",
    404: "the record is gone from the target system; check whether someone deleted it",
    409: "another writer changed the record; rerun the task",
    412: "the record changed since it was read; rerun the task",
    429: "the service is throttling this client; rerun later or lower the task's concurrency",
}
_SERVER_ERROR_STEP = "the service failed; rerun the task, and check the service's health if it persists"


class D365Error(Exception):
    """A failed call to Commerce headquarters or Dataverse.

    Carries everything a 3 a.m. reader needs: the system, the operation, the record,
    the HTTP status, the service's own error code and message, and the next step.
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
    ) -> None:
        self.system = system
        self.operation = operation
        self.status = status
        self.code = code
        self.message = message
        self.record = record
        super().__init__(str(self))

    @property
    def next_step(self) -> str:
        if self.status == 0:
            return "the service did not answer (network, DNS or TLS); check the connection's host and CA bundle"
        if self.status >= 500:
            return _SERVER_ERROR_STEP
        return _NEXT_STEP.get(self.status, "read the service's message above and fix the cause")

    @property
    def is_record_error(self) -> bool:
        """A failure of this one record (bad data, conflict), not of the integration as a whole."""
        return 400 <= self.status < 500 and self.status not in (401, 403, 408, 429)

    def __str__(self) -> str:
        subject = f" for {self.record}" if self.record else ""
        code = f" {self.code}" if self.code else ""
        answer = f"HTTP {self.status}{code}" if self.status else "no HTTP answer"
        return (
            f"{self.system}: {self.operation}{subject} failed with {answer}: "
            f"{self.message or '(no message)'}. Next step: {self.next_step}."
        )

    def for_record(self, record: str) -> D365Error:
        """The same failure, naming the business record it concerns."""
        return type(self)(
            system=self.system,
            operation=self.operation,
            status=self.status,
            code=self.code,
            message=self.message,
            record=record,
        )


class AuthenticationError(Exception):
    """Entra ID refused to issue a token; never carries the secret."""


class ConfigurationError(Exception):
    """A connection or setting is missing or malformed."""


class DecisionConflict(Exception):
    """A target's state contradicts the seller's decision; reported, never overwritten."""
