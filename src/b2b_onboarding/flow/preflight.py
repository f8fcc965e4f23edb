"""The preflight: before a first run on a tenant, or after a change to it, every check of what the
flow needs that can be made by reading alone, one row each: the check, the system, ✓ / ✗ / –,
what was found, and the next step. `–`: not checked, because a check it depends on failed; so one
misconfiguration fails its own row and only it. Nothing here writes, to either system. Run by the
DAG `b2b_preflight` and by `python -m b2b_onboarding.airflow.preflight`.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

import httpx
import pandas as pd

from b2b_onboarding import errors
from b2b_onboarding.clients.auth import token_provider
from b2b_onboarding.clients.commerce import NO_CUSTOMER_GROUP, CommerceClient
from b2b_onboarding.clients.commerce import SYSTEM as COMMERCE
from b2b_onboarding.clients.sales import SYSTEM as DATAVERSE
from b2b_onboarding.clients.sales import SalesClient
from b2b_onboarding.clients.settings import ServiceSettings
from b2b_onboarding.domain import report, tenant
from b2b_onboarding.errors import D365Error

PASSED, FAILED, NOT_CHECKED = "✓", "✗", "–"
ENTRA = "Entra ID"
VIEW = "All Commerce B2B leads"
# How far Microsoft's clocks and this machine's may drift apart: the 5 minutes token validators
# commonly allow.
MAX_CLOCK_SKEW_S = 300
# Entra ID may date a token's iat and nbf up to this far back (its own allowance for skew).
TOKEN_BACKDATING_S = 300
# The Dataverse privileges the flow uses, by table (logical name, the privileges' schema name):
# leads are read, created and updated, and bound to their company (Append on the lead, AppendTo on
# cdm_company); accounts get their customer account number; the rest is read. savedquery: this
# preflight reads the view the sellers work from.
DATAVERSE_PRIVILEGES = {
    ("lead", "Lead"): ("Read", "Create", "Write", "Append"),
    ("cdm_company", "cdm_Company"): ("Read", "AppendTo"),
    ("account", "Account"): ("Read", "Write"),
    ("contact", "Contact"): ("Read",),
    ("opportunity", "Opportunity"): ("Read",),
    ("savedquery", "Query"): ("Read",),
}
# The HQ entity sets the flow reads (the first four it also writes) and this preflight reads. HQ
# shows an app its access to an entity set only by answering a request: reads are checked here,
# writes not (that would take a write).
COMMERCE_ENTITY_SETS = ("Prospects", "CustomersV3", "CustomerHiearchies", "CustomerHierarchyNodes", "LegalEntities",
                        "CustomerGroups")  # fmt: skip


@dataclass(frozen=True)
class Row:
    check: str
    system: str
    status: str
    detail: str
    next_step: str = ""


class _CheckFailed(Exception):
    """What a check found wrong, and what to do about it."""

    def __init__(self, detail: str, next_step: str) -> None:
        super().__init__(detail)
        self.detail = detail
        self.next_step = next_step


class _NotChecked(Exception):
    """The check had nothing to look at (what it reads came from checks that failed)."""


@dataclass(frozen=True)
class Check:
    name: str
    system: str
    run: Callable[[], str]  # what it found when it passes; raises _CheckFailed (or any error) when not
    needs: tuple[tuple[str, str], ...] = ()  # (name, system) of the checks it depends on

    @property
    def key(self) -> tuple[str, str]:
        return self.name, self.system


def split_next_step(line: str) -> tuple[str, str]:
    """A product error's one line as (what happened, the next step it names); what Entra ID said,
    which a refused token's line ends with, goes with what happened."""
    found, separator, next_step = line.partition(" Next step: ")
    if not separator:
        return line, "read the error above and fix its cause"
    next_step, said, answer = next_step.partition(" Entra ID said: ")
    return f"{found.strip()}{said}{answer}".strip(), next_step.strip()


def run_checks(checks: Sequence[Check]) -> list[Row]:
    """Every check in order, each to its row; a check runs only when every check it needs passed."""
    rows: dict[tuple[str, str], Row] = {}
    for check in checks:
        missing = [need for need in check.needs if rows[need].status != PASSED]
        if missing:
            named = ", ".join(f"{name} ({system})" for name, system in missing)
            rows[check.key] = Row(check.name, check.system, NOT_CHECKED, f"not checked: needs {named}")
            continue
        try:
            rows[check.key] = Row(check.name, check.system, PASSED, check.run())
        except _CheckFailed as failure:
            rows[check.key] = Row(check.name, check.system, FAILED, failure.detail, failure.next_step)
        except _NotChecked as reason:
            rows[check.key] = Row(check.name, check.system, NOT_CHECKED, f"not checked: {reason}")
        except Exception as error:  # noqa: BLE001 - a check that raises fails its row; the others still run
            rows[check.key] = Row(check.name, check.system, FAILED, *split_next_step(errors.first_line(error)))
    return list(rows.values())


def token_claims(token: str) -> dict:
    """The claims of a JWT, unverified: only their times are read, against this machine's clock."""
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


class Preflight:
    """The checks of one pair of connections. `commerce` and `sales` give each connection's settings
    (raising ConfigurationError when the connection is missing or unusable)."""

    def __init__(self, commerce: Callable[[], ServiceSettings], sales: Callable[[], ServiceSettings]) -> None:
        self._load = {COMMERCE: commerce, DATAVERSE: sales}
        self._settings: dict[str, ServiceSettings] = {}
        self._unusable: dict[str, Exception] = {}  # why a connection gave no settings
        self._clients: dict[str, CommerceClient | SalesClient] = {}
        # What the checks saw of Microsoft's clocks: (what, its time less this machine's time then,
        # how far before this machine's time it may be).
        self._times: list[tuple[str, float, float]] = []
        self._user_id = ""
        self._privileges: set[str] | None = None  # the application user's, lowercase, read once

    @property
    def commerce(self) -> CommerceClient:
        return self._clients[COMMERCE]  # type: ignore[return-value]

    @property
    def sales(self) -> SalesClient:
        return self._clients[DATAVERSE]  # type: ignore[return-value]

    def run(self) -> list[Row]:
        for system, load in self._load.items():
            try:
                self._settings[system] = load()
            except Exception as error:  # noqa: BLE001 - reported by the connection's row
                self._unusable[system] = error
        try:
            return run_checks(self._checks())
        finally:
            for client in self._clients.values():
                client.odata.close()

    def _checks(self) -> list[Check]:
        """The checks, in the order they run (those of legal entities: the Commerce connection's)."""
        hq, dv = COMMERCE, DATAVERSE
        app_user = ("Application user", dv)
        checks = [
            Check("Connection", hq, lambda: self._connection(hq)),
            Check("Connection", dv, lambda: self._connection(dv)),
            Check("Token", hq, lambda: self._token(hq), needs=(("Connection", hq),)),
            Check("Token", dv, lambda: self._token(dv), needs=(("Connection", dv),)),
            Check("Application user", dv, self._dataverse_application_user, needs=(("Token", dv),)),
        ]
        for (table, schema_name), privileges in DATAVERSE_PRIVILEGES.items():
            checks.append(Check(f"Privileges on {table}", dv, self._privileges_check(schema_name, privileges),
                                needs=(app_user,)))  # fmt: skip
        checks += [
            Check("Lead columns and alternate key", dv, self._lead_model, needs=(app_user,)),
            Check(f'View "{VIEW}"', dv, self._view, needs=(("Privileges on savedquery", dv),)),
            Check("Application user", hq, self._commerce_application_user, needs=(("Token", hq),)),
        ]
        for entity_set in COMMERCE_ENTITY_SETS:
            checks.append(Check(f"Read {entity_set}", hq, self._readable(entity_set),
                                needs=(("Application user", hq),)))  # fmt: skip
        legal_entities = list(self._settings[hq].legal_entities) if hq in self._settings else []
        for legal_entity in legal_entities:
            checks += [
                Check(f"Legal entity {legal_entity}", hq, self._hq_legal_entity(legal_entity),
                      needs=(("Read LegalEntities", hq),)),
                Check(f"Legal entity {legal_entity}", dv, self._dataverse_legal_entity(legal_entity),
                      needs=(("Privileges on cdm_company", dv),)),
            ]  # fmt: skip
        for legal_entity in legal_entities:
            checks.append(Check(f"Customer group in {legal_entity}", hq, self._customer_group(legal_entity),
                                needs=(("Read CustomerGroups", hq), (f"Legal entity {legal_entity}", hq))))  # fmt: skip
        if not legal_entities:
            checks.append(Check("Legal entities", hq, self._no_legal_entities, needs=(("Connection", hq),)))
        checks.append(Check("Clock", ENTRA, self._clock))
        return checks

    # -- connections and tokens --------------------------------------------------------------------

    def _connection(self, system: str) -> str:
        if system in self._unusable:
            raise self._unusable[system]
        settings = self._settings[system]
        return f"{settings.conn_id}: {settings.resource}, client id {settings.client_id}, authority {settings.authority}"

    def _token(self, system: str) -> str:
        settings = self._settings[system]
        provider = token_provider(settings.authority, settings.client_id, settings.client_secret.get_secret_value(),
                                  settings.verify)  # fmt: skip
        provider.forget()  # a cached token says nothing of the credentials as they are now
        token = provider.token(settings.scope)
        received = time.time()
        claims = token_claims(token)
        self._times += [(f"the {system} token's {claim}", float(claims[claim]) - received,
                         MAX_CLOCK_SKEW_S + TOKEN_BACKDATING_S) for claim in ("iat", "nbf")]  # fmt: skip
        self._clients[system] = (CommerceClient if system == COMMERCE else SalesClient).connect(settings)
        return f"client {settings.client_id} got a token for {settings.scope}, valid until {_utc(claims['exp'])}"

    def _note_date(self, system: str, response: httpx.Response) -> None:
        if date := response.headers.get("Date"):
            offset = parsedate_to_datetime(date).timestamp() - time.time()
            self._times.append((f"the Date header of {system}", offset, MAX_CLOCK_SKEW_S))

    def _clock(self) -> str:
        if not self._times:
            raise _NotChecked("no token was issued and no service answered")
        def farthest(times: list[tuple[str, float, float]]) -> str:
            what, offset, _ = max(times, key=lambda seen: abs(seen[1]))
            return f"the farthest {what} at {round(offset):+d} s"

        off = [(what, offset, behind) for what, offset, behind in self._times
               if not -behind <= offset <= MAX_CLOCK_SKEW_S]  # fmt: skip
        if off:
            raise _CheckFailed(
                f"{len(off)} of {len(self._times)} times read from Microsoft are more than {MAX_CLOCK_SKEW_S} s off "
                f"this machine's clock, {farthest(off)}",
                "set this machine's clock right (NTP: e.g. `timedatectl set-ntp true`, or the container host's clock)",
            )
        return f"within {MAX_CLOCK_SKEW_S} s: {len(self._times)} times read from Microsoft, {farthest(self._times)}"

    # -- Dataverse ---------------------------------------------------------------------------------

    def _dataverse_application_user(self) -> str:
        settings = self._settings[DATAVERSE]
        where = ("the Power Platform admin center: Environments > <environment> > Settings > Users + permissions > "
                 "Application users")  # fmt: skip
        response = self.sales.odata.request("GET", "WhoAmI", operation="WhoAmI")  # 403 without an application user
        self._note_date(DATAVERSE, response)
        user_id = str(response.json()["UserId"])
        user = self.sales.system_user(user_id)
        if user is None:
            raise _CheckFailed(f"WhoAmI names systemuser {user_id}, which cannot be read", f"check it in {where}")
        if str(user.get("applicationid") or "").lower() != settings.client_id.lower():
            raise _CheckFailed(
                f"WhoAmI names systemuser {user_id} ({user.get('fullname')}), whose application id is "
                f"{user.get('applicationid')!r}, not the connection's client id {settings.client_id}",
                f"check the application user's App ID in {where}: it must be client id {settings.client_id}",
            )
        if user.get("isdisabled"):
            raise _CheckFailed(f"application user {user.get('fullname')} ({user_id}) is disabled",
                              f"enable it in {where}")  # fmt: skip
        self._user_id = user_id
        return f"{user.get('fullname')} (systemuser {user_id}), application id {settings.client_id}, enabled"

    def _privileges_check(self, schema_name: str, privileges: Iterable[str]) -> Callable[[], str]:
        wanted = [f"prv{privilege}{schema_name}" for privilege in privileges]

        def check() -> str:
            if self._privileges is None:
                self._privileges = {name.lower() for name in self.sales.user_privileges(self._user_id)}
            missing = [name for name in wanted if name.lower() not in self._privileges]
            if missing:
                raise _CheckFailed(
                    f"the application user lacks {', '.join(missing)}",
                    f"add {', '.join(missing)} to a security role of the application user (Power Platform admin "
                    "center: Settings > Users + permissions > Security roles), or assign it a role that has them",
                )
            return f"has {', '.join(wanted)}"

        return check

    def _lead_model(self) -> str:
        model = self.sales.lead_model()
        problems = tenant.lead_model_problems(model)
        if problems:
            keys = [key for key in model.keys if set(key.columns) == set(tenant.LEAD_KEY)]
            inactive_key = bool(keys) and not any(key.status == "Active" for key in keys)
            steps = [] if inactive_key and len(problems) == 1 else [
                "install or update the solution that adds the Commerce B2B lead columns and key to Dataverse"]
            if inactive_key:
                steps.append("reactivate the key (Power Apps: Tables > Lead > Keys; a Failed key first needs the "
                             "duplicate values it reports removed)")
            raise _CheckFailed("; ".join(problems), "; then ".join(steps))  # fmt: skip
        active = [key.name for key in model.keys if key.status == "Active"]
        return f"{len(model.columns)} columns read; alternate key {', '.join(active)} Active"

    def _view(self) -> str:
        views = self.sales.saved_views(VIEW, "lead")
        if not views:
            raise _CheckFailed(f'no system view "{VIEW}" of lead',
                              f'import the solution with the view "{VIEW}" (sellers work the Commerce B2B leads from '
                              "it), or create it: Power Apps, Tables > Lead > Views")  # fmt: skip
        return f"savedquery {views[0]['savedqueryid']}"

    def _dataverse_legal_entity(self, legal_entity: str) -> Callable[[], str]:
        def check() -> str:
            codes = self.sales.company_codes()
            found = [company_id for company_id, code in codes.items() if code == legal_entity.lower()]
            if not found:
                raise _CheckFailed(
                    f"no cdm_companies row with company code {legal_entity.upper()} ({len(codes)} rows)",
                    "run dual-write's \"Legal entities (cdm_companies)\" map for it, or remove it from the extra "
                    f'"legal_entities" of connection {self._settings[COMMERCE].conn_id}',
                )
            return f"cdm_company {found[0]}"

        return check

    # -- Commerce headquarters ---------------------------------------------------------------------

    def _commerce_application_user(self) -> str:
        """HQ answers 401 to an app it does not map to a user ("Microsoft Entra applications"); an
        answer past that (rows, or 403 for want of a role) shows the mapping is there."""
        client_id = self._settings[COMMERCE].client_id
        try:
            response = self.commerce.first_prospect_answer()
        except D365Error as refused:
            if refused.status != 401:
                raise
            # The token was issued (its row passed): what HQ lacks is the app's registration.
            raise _CheckFailed(split_next_step(str(refused))[0], f"in HQ, System administration > Setup > Microsoft "
                               f"Entra applications: add client id {client_id}, mapped to a user with a security role "
                               "such as 'Commerce B2B onboarding integration' (README, Before the first run on your "
                               "tenant)") from None  # fmt: skip
        self._note_date(COMMERCE, response)
        roles = "its roles let it read Prospects" if response.status_code == 200 else (
            "no role lets it read Prospects (see the Read rows)")  # fmt: skip
        return f"HQ lets client {client_id} in; {roles}"

    def _readable(self, entity_set: str) -> Callable[[], str]:
        def check() -> str:
            rows = self.commerce.first_rows(entity_set)
            return f"read ({len(rows)} row{'' if len(rows) == 1 else 's'} with $top=1)"

        return check

    def _hq_legal_entity(self, legal_entity: str) -> Callable[[], str]:
        def check() -> str:
            found = self.commerce.legal_entity(legal_entity)
            if found is None:
                raise _CheckFailed(
                    f"no legal entity {legal_entity} in HQ's LegalEntities",
                    f'fix the extra "legal_entities" of connection {self._settings[COMMERCE].conn_id} (HQ\'s company '
                    "ids, e.g. usrt), or create the legal entity in HQ",
                )
            return f"{found.get('LegalEntityId')}: {found.get('Name')}"

        return check

    def _no_legal_entities(self) -> str:
        raise _CheckFailed(f"connection {self._settings[COMMERCE].conn_id} names no legal entities",
                          'set its extra "legal_entities", e.g. ["usrt", "usmf"]')  # fmt: skip

    def _customer_group(self, legal_entity: str) -> Callable[[], str]:
        def check() -> str:
            conn_id, group = self._settings[COMMERCE].conn_id, self._settings[COMMERCE].customer_group
            if not group:  # HQ refuses every new customer without one (commerce.required_customer_group)
                raise _CheckFailed(f"connection {conn_id}: {NO_CUSTOMER_GROUP}",
                                   f'set the extra "customer_group" of connection {conn_id} to a customer group of '
                                   'each legal entity (e.g. "10")')  # fmt: skip
            found = self.commerce.customer_group(legal_entity, group)
            if found is None:
                raise _CheckFailed(
                    f"no customer group {group} in legal entity {legal_entity}",
                    f'create customer group {group} in {legal_entity} (Accounts receivable > Setup > Customer groups), '
                    f'or fix the extra "customer_group" of connection {self._settings[COMMERCE].conn_id}',
                )
            return f"{group}: {found.get('Description')}"

        return check


def _utc(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(float(epoch)))


def table(rows: Sequence[Row]) -> str:
    frame = pd.DataFrame([(r.check, r.system, r.status, r.detail, r.next_step) for r in rows],
                         columns=["check", "system", "", "found", "next step"])  # fmt: skip
    return report.text(frame, index=False)


def failed(rows: Sequence[Row]) -> list[Row]:
    return [row for row in rows if row.status == FAILED]


def verdict(rows: Sequence[Row]) -> str:
    """One line: every check passed, or which failed (and how many were not checked because of them)."""
    bad, skipped = failed(rows), sum(row.status == NOT_CHECKED for row in rows)
    if not bad:
        return f"Preflight passed: all {len(rows)} checks ✓." if not skipped else (
            f"Preflight passed: {len(rows) - skipped} of {len(rows)} checks ✓, {skipped} not checked.")  # fmt: skip
    names = ", ".join(f"{row.check} ({row.system})" for row in bad)
    return (f"Preflight failed: {len(bad)} of {len(rows)} checks ✗ ({names}); {skipped} not checked because of "
            "them. Next step: the failed rows' next steps, then run the preflight again.")  # fmt: skip
