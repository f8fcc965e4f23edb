"""Fake Dataverse Web API (Sales) under /api/data/v9.2: leads, opportunities, accounts, contacts,
and the actions that move a lead to a won or lost opportunity.

It keeps the Web API conventions clients depend on: server-generated lowercase GUID keys; lookups
read as `_<name>_value` and written as `<navigation property>@odata.bind`; weak etags from a
version number; PATCH as upsert, also by the lead alternate key `msdyn_prospectid`; keyset
server-driven paging; errors as `{"error": {"code": "0x...", "message": "..."}}`.

All state is touched from async handlers that do not await while they read or write it, so the
event loop serialises requests and the state needs no lock.
"""

import base64
import json
import re
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, NamedTuple
from urllib.parse import unquote_to_bytes

from fastapi import Depends, FastAPI, Request, Response
from fastapi.responses import JSONResponse

from d365_fakes.clients import ClientRegistration
from d365_fakes.faults import Fault, FaultPlan
from d365_fakes.odata_query import Dialect, ODataQueryError, apply_query, unquote_string_literal
from d365_fakes.routing import RESOURCE_CONVERTOR
from d365_fakes.tokens import InvalidToken, TokenIssuer

API_ROOT = "/api/data/v9.2"
MAX_PAGE_SIZE = 5000

NOT_FOUND = "0x80040217"
DUPLICATE_KEY = "0x80040237"
PRECONDITION_FAILED = "0x80060882"
INVALID_ARGUMENT = "0x80040203"
BAD_QUERY = "0x8006088a"
UNKNOWN_NAME = "0x80060888"  # no property, or no resource segment, of that name
UNAUTHORIZED = "0x80072243"
REQUESTS_LIMIT = "0x80072322"  # service protection: number of requests
UNEXPECTED = "0x80040216"

_GUID = r"[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}"
_IDS = uuid.uuid5(uuid.NAMESPACE_URL, "d365-fakes/dataverse")  # namespace of the fixed ids


class DataverseError(Exception):
    def __init__(
        self, status: int, code: str, message: str, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


@dataclass(frozen=True)
class StateModel:
    """A table's statecode/statuscode pairs and which state changes a PATCH may make."""

    type_name: str  # "LeadState", as in messages
    state_names: dict[int, str]
    statuses: dict[int, tuple[int, ...]]  # statecode -> its statuscodes, the default first
    patch_from: dict[int, frozenset[int]]  # target statecode -> statecodes a PATCH may leave for it
    actions: dict[int, str]  # target statecode -> the action that sets it instead of a PATCH


@dataclass(frozen=True)
class Table:
    entity_set: str
    logical_name: str
    primary_key: str
    columns: dict[str, type]  # data columns and their JSON types
    # navigation property -> (lookup column, entity set it points at)
    lookups: dict[str, tuple[str, str]] = field(default_factory=dict)
    computed: tuple[str, ...] = ()  # read-only columns derived from data columns
    alternate_key: str | None = None
    state_model: StateModel | None = None
    writable: bool = True  # by POST/PATCH; read-only sets are written by actions or at start

    @property
    def read_columns(self) -> tuple[str, ...]:
        lookup_values = dict.fromkeys(f"_{column}_value" for column, _ in self.lookups.values())
        return (self.primary_key, *self.columns, *self.computed, *lookup_values, *SERVER_COLUMNS)

    @property
    def type_name(self) -> str:
        return f"Microsoft.Dynamics.CRM.{self.logical_name}"


SERVER_COLUMNS = ("createdon", "modifiedon", "versionnumber")
_OWNER = {"ownerid": ("ownerid", "systemusers")}
_ORIGINATING_LEAD = {"originatingleadid": ("originatingleadid", "leads")}
_ADDRESS = {
    "address1_line1": str,
    "address1_city": str,
    "address1_stateorprovince": str,
    "address1_postalcode": str,
    "address1_country": str,
}

LEADS = Table(
    "leads",
    "lead",
    "leadid",
    columns={
        "firstname": str,
        "lastname": str,
        "companyname": str,
        "emailaddress1": str,
        "telephone1": str,
        **_ADDRESS,
        "subject": str,
        "leadsourcecode": int,
        "statecode": int,
        "statuscode": int,
        "msdyn_prospectid": str,
        "msdyn_b2bcommerceprospect": bool,
        "msdyn_b2bprospectstatus": int,  # a choice column; its values are not documented publicly
    },
    lookups={
        "parentaccountid": ("parentaccountid", "accounts"),
        "parentcontactid": ("parentcontactid", "contacts"),
        "qualifyingopportunityid": ("qualifyingopportunityid", "opportunities"),
        **_OWNER,
    },
    computed=("fullname",),
    alternate_key="msdyn_prospectid",
    state_model=StateModel(
        "LeadState",
        {0: "Open", 1: "Qualified", 2: "Disqualified"},
        {0: (1, 2), 1: (3,), 2: (4, 5, 6, 7)},
        patch_from={2: frozenset({0}), 0: frozenset({1, 2})},
        actions={1: "QualifyLead"},
    ),
)
OPPORTUNITIES = Table(
    "opportunities",
    "opportunity",
    "opportunityid",
    columns={"name": str, "statecode": int, "statuscode": int},
    lookups={
        **_ORIGINATING_LEAD,
        "parentaccountid": ("parentaccountid", "accounts"),
        "parentcontactid": ("parentcontactid", "contacts"),
        **_OWNER,
    },
    state_model=StateModel(
        "OpportunityState",
        {0: "Open", 1: "Won", 2: "Lost"},
        {0: (1, 2), 1: (3,), 2: (4, 5)},
        patch_from={0: frozenset({1, 2})},
        actions={1: "WinOpportunity", 2: "LoseOpportunity"},
    ),
)
ACCOUNTS = Table(
    "accounts",
    "account",
    "accountid",
    columns={
        "name": str,
        "accountnumber": str,
        "emailaddress1": str,
        "telephone1": str,
        **_ADDRESS,
    },
    lookups={**_ORIGINATING_LEAD, **_OWNER},
)
CONTACTS = Table(
    "contacts",
    "contact",
    "contactid",
    columns={"firstname": str, "lastname": str, "emailaddress1": str, "telephone1": str},
    lookups={
        # parentcustomerid may point at an account or a contact: one navigation property each.
        "parentcustomerid_account": ("parentcustomerid", "accounts"),
        "parentcustomerid_contact": ("parentcustomerid", "contacts"),
        **_ORIGINATING_LEAD,
        **_OWNER,
    },
    computed=("fullname",),
)
OPPORTUNITY_CLOSES = Table(
    "opportunitycloses",
    "opportunityclose",
    "activityid",
    columns={"subject": str, "description": str},
    lookups={"opportunityid": ("opportunityid", "opportunities"), **_OWNER},
    writable=False,
)
SYSTEM_USERS = Table(
    "systemusers",
    "systemuser",
    "systemuserid",
    columns={"fullname": str, "applicationid": str},
    writable=False,
)
SAVED_QUERIES = Table(
    "savedqueries",
    "savedquery",
    "savedqueryid",
    columns={"name": str, "returnedtypecode": str},
    writable=False,
)
TABLES = {
    table.entity_set: table
    for table in (
        LEADS,
        OPPORTUNITIES,
        ACCOUNTS,
        CONTACTS,
        OPPORTUNITY_CLOSES,
        SYSTEM_USERS,
        SAVED_QUERIES,
    )
}
_KEPT_ON_RESET = {SYSTEM_USERS.entity_set, SAVED_QUERIES.entity_set}

# System views: (name, returnedtypecode, $filter); `{caller}` is the calling user (FetchXML's
# eq-userid).
SAVED_VIEWS = (
    ("All Commerce B2B leads", "lead", "msdyn_b2bcommerceprospect eq true"),
    ("My open leads", "lead", "_ownerid_value eq {caller} and statecode eq 0"),
)


def saved_view_id(name: str) -> str:
    return str(uuid.uuid5(_IDS, f"savedquery/{name}"))


_VIEW_FILTERS = {saved_view_id(name): (entity, text) for name, entity, text in SAVED_VIEWS}


class RowKey(NamedTuple):
    column: str  # the primary key or the alternate key column
    value: str


class Page(NamedTuple):
    rows: list[dict]
    count: int | None  # with $count=true
    last: dict | None  # the page's last row, unprojected, when more rows follow


class DataverseState:
    """The organization's rows, the fixed views and users, and request/write counts."""

    def __init__(self) -> None:
        self.organization_id = str(uuid.uuid5(_IDS, "organization"))
        self.business_unit_id = str(uuid.uuid5(_IDS, "businessunit"))
        self._rows: dict[str, dict[str, dict]] = {name: {} for name in TABLES}
        self._version = 0
        self.reset()
        for name, entity, _ in SAVED_VIEWS:
            view = self._new_row(SAVED_QUERIES, saved_view_id(name))
            self._store(SAVED_QUERIES, view, {"name": name, "returnedtypecode": entity})

    def reset(self) -> None:
        """Empty the data tables and the counts; the users and saved queries stay."""
        for name, rows in self._rows.items():
            if name not in _KEPT_ON_RESET:
                rows.clear()
        self._requests = 0
        self._writes = {table.entity_set: 0 for table in TABLES.values() if table.writable}

    def counts(self) -> dict[str, Any]:
        return {"requests": self._requests, "writes": dict(self._writes)}

    def count_request(self) -> None:
        self._requests += 1

    def register_users(self, clients: Iterable[ClientRegistration]) -> None:
        """One application user per app registration, as an admin creates them in Dataverse."""
        for client in clients:
            user = self._new_row(SYSTEM_USERS, client.app_user_id)
            values = {"fullname": client.display_name, "applicationid": client.client_id}
            self._store(SYSTEM_USERS, user, values)

    def get(self, table: Table, key: RowKey, params: Mapping[str, str]) -> dict:
        unsupported = sorted(set(params) - {"$select"})
        if unsupported:
            raise DataverseError(
                400, BAD_QUERY, f"The query parameter {unsupported[0]} is not supported here."
            )
        row = _with_etag(self._find(table, key))
        return _project([row], table, params.get("$select"))[0]

    def query(
        self,
        table: Table,
        params: Mapping[str, str],
        caller: str,
        page_size: int,
        after: dict | None,
    ) -> Page:
        """One page of a collection; `after` is the previous page's last row (the paging cookie)."""
        options = {
            name: value for name, value in params.items() if name not in ("$select", "savedQuery")
        }
        unsupported = sorted(name for name in options if not name.startswith("$"))
        if unsupported:
            raise DataverseError(
                400, BAD_QUERY, f"The query parameter {unsupported[0]} is not supported."
            )
        view_filter = self._view_filter(table, params.get("savedQuery"), caller)
        filters = [text for text in (view_filter, params.get("$filter")) if text]
        if filters:
            options["$filter"] = " and ".join(f"({text})" for text in filters)
        rows = [_with_etag(row) for _, row in sorted(self._rows[table.entity_set].items())]
        result = apply_query(rows, options, Dialect.DATAVERSE, table.read_columns)
        matching = result.rows
        if "$top" in options:  # $top asks for one bounded result: no paging
            page, last = matching, None
        else:
            if after is not None:
                matching = _rows_after(after, matching, table, options.get("$orderby"))
            page = matching[:page_size]
            last = page[-1] if len(matching) > page_size else None
        return Page(_project(page, table, params.get("$select")), result.count, last)

    def create(self, table: Table, body: Mapping[str, Any], caller: str) -> dict:
        changes = self._changes_from_body(table, body)
        row = self._new_row(table, str(uuid.uuid4()), caller)
        self._check_changes(table, row, changes)
        self._writes[table.entity_set] += 1
        return self._store(table, row, changes)

    def upsert(
        self,
        table: Table,
        key: RowKey,
        body: Mapping[str, Any],
        caller: str,
        if_match: str | None,
        if_none_match: str | None,
    ) -> dict:
        """PATCH: update the row at `key`, or create it there. `If-Match` makes it update-only (a
        specific etag must be current); `If-None-Match: *` makes it create-only."""
        if key.column != table.primary_key and key.column in body:
            raise DataverseError(
                400,
                INVALID_ARGUMENT,
                f"The alternate key column '{key.column}' is in the URL; "
                "do not repeat it in the body.",
            )
        changes = self._changes_from_body(table, body)
        row = self._lookup(table, key)
        if row is None:
            if if_match is not None:
                raise _not_found(table, key)
            row_id = key.value if key.column == table.primary_key else str(uuid.uuid4())
            row = self._new_row(table, row_id, caller)
            row[key.column] = key.value
        elif if_none_match == "*":
            raise DataverseError(
                412, DUPLICATE_KEY, "A record with matching key values already exists."
            )
        elif if_match not in (None, "*") and if_match != _etag(row):
            raise DataverseError(
                412,
                PRECONDITION_FAILED,
                "The version of the existing record doesn't match the RowVersion property "
                "provided.",
            )
        self._check_changes(table, row, changes)
        self._writes[table.entity_set] += 1
        return self._store(table, row, changes)

    def qualify_lead(self, key: RowKey, params: Mapping[str, Any], caller: str) -> list[dict]:
        """The QualifyLead action: create what is asked, close the lead as Qualified, and answer
        references to the created rows."""
        lead = self._find(LEADS, key)
        creates = {
            name: params.get(name)
            for name in ("CreateAccount", "CreateContact", "CreateOpportunity")
        }
        for name, value in creates.items():
            if not isinstance(value, bool):
                raise DataverseError(
                    400, INVALID_ARGUMENT, f"The parameter '{name}' is required: true or false."
                )
        status = params.get("Status")
        _check_status(LEADS, lead, 1, status)
        if lead["statecode"] != 0:
            raise DataverseError(
                400,
                INVALID_ARGUMENT,
                "The lead is closed. You cannot convert or qualify a lead that is already closed.",
            )
        origin = {"_originatingleadid_value": lead["leadid"]}
        created: list[tuple[Table, dict]] = []
        lead_changes: dict[str, Any] = {"statecode": 1, "statuscode": status}
        if creates["CreateAccount"]:
            copied = _copy(lead, ("emailaddress1", "telephone1", *_ADDRESS))
            account = self._insert(
                ACCOUNTS, caller, {"name": lead["companyname"], **copied, **origin}
            )
            created.append((ACCOUNTS, account))
            lead_changes["_parentaccountid_value"] = account["accountid"]
        account_id = lead_changes.get("_parentaccountid_value", lead["_parentaccountid_value"])
        if creates["CreateContact"]:
            copied = _copy(lead, ("firstname", "lastname", "emailaddress1", "telephone1"))
            contact = self._insert(
                CONTACTS, caller, {**copied, "_parentcustomerid_value": account_id, **origin}
            )
            created.append((CONTACTS, contact))
            lead_changes["_parentcontactid_value"] = contact["contactid"]
        contact_id = lead_changes.get("_parentcontactid_value", lead["_parentcontactid_value"])
        if creates["CreateOpportunity"]:
            opportunity = self._insert(
                OPPORTUNITIES,
                caller,
                {
                    "name": lead["subject"] or lead["companyname"],
                    "_parentaccountid_value": account_id,
                    "_parentcontactid_value": contact_id,
                    **origin,
                },
            )
            created.append((OPPORTUNITIES, opportunity))
            lead_changes["_qualifyingopportunityid_value"] = opportunity["opportunityid"]
        self._store(LEADS, lead, lead_changes)
        self._writes[LEADS.entity_set] += 1
        return [
            {"@odata.type": f"#{table.type_name}", table.primary_key: row[table.primary_key]}
            for table, row in created
        ]

    def close_opportunity(self, params: Mapping[str, Any], caller: str, won: bool) -> None:
        """WinOpportunity / LoseOpportunity: record an opportunityclose and close the opportunity."""
        closing = params.get("OpportunityClose")
        if not isinstance(closing, dict):
            raise DataverseError(
                400, INVALID_ARGUMENT, "The parameter 'OpportunityClose' is required."
            )
        changes = self._changes_from_body(OPPORTUNITY_CLOSES, closing)
        opportunity_id = changes.get("_opportunityid_value")
        if opportunity_id is None:
            raise DataverseError(
                400,
                INVALID_ARGUMENT,
                "OpportunityClose must bind opportunityid@odata.bind to the opportunity to close.",
            )
        opportunity = self._rows[OPPORTUNITIES.entity_set][opportunity_id]
        closed_state = 1 if won else 2
        status = params.get("Status")
        _check_status(OPPORTUNITIES, opportunity, closed_state, status)
        if opportunity["statecode"] != 0:
            raise DataverseError(
                400,
                INVALID_ARGUMENT,
                "Cannot close the entity because it is not in the correct state.",
            )
        self._insert(OPPORTUNITY_CLOSES, caller, changes)
        self._store(OPPORTUNITIES, opportunity, {"statecode": closed_state, "statuscode": status})
        self._writes[OPPORTUNITIES.entity_set] += 1

    def _view_filter(self, table: Table, view_id: str | None, caller: str) -> str | None:
        if view_id is None:
            return None
        entity, text = _VIEW_FILTERS.get(view_id.lower(), (None, None))
        if text is None:
            raise DataverseError(404, NOT_FOUND, f"savedquery With Id = {view_id} Does Not Exist")
        if entity != table.logical_name:
            raise DataverseError(
                400,
                INVALID_ARGUMENT,
                f"The saved query {view_id} returns {entity} rows, not {table.logical_name} rows.",
            )
        return text.format(caller=caller)

    def _lookup(self, table: Table, key: RowKey) -> dict | None:
        rows = self._rows[table.entity_set]
        if key.column == table.primary_key:
            return rows.get(key.value)
        wanted = key.value.casefold()  # key values compare as the database collation does
        return next(
            (
                row
                for row in rows.values()
                if row[key.column] is not None and row[key.column].casefold() == wanted
            ),
            None,
        )

    def _find(self, table: Table, key: RowKey) -> dict:
        row = self._lookup(table, key)
        if row is None:
            raise _not_found(table, key)
        return row

    def _changes_from_body(self, table: Table, body: Mapping[str, Any]) -> dict[str, Any]:
        """A request body as column values; binds become `_x_value` ids of rows that exist.
        Server-managed and computed columns are ignored, as Dataverse ignores them."""
        changes: dict[str, Any] = {}
        for name, value in body.items():
            if name.endswith("@odata.bind"):
                navigation = name.removesuffix("@odata.bind")
                if navigation not in table.lookups:
                    raise _unknown_property(table, navigation)
                column, target = table.lookups[navigation]
                bound = None if value is None else self._bound_id(navigation, target, value)
                changes[f"_{column}_value"] = bound
            elif "@" in name:
                continue  # instance and property annotations, such as @odata.type
            elif name in table.columns:
                changes[name] = _checked_value(name, table.columns[name], value)
            elif name not in (table.primary_key, *table.computed, *SERVER_COLUMNS):
                raise _unknown_property(table, name)
        return changes

    def _bound_id(self, navigation: str, target: str, reference: Any) -> str:
        match = _BIND.fullmatch(reference) if isinstance(reference, str) else None
        if match is None or match["set"] != target:
            raise DataverseError(
                400,
                INVALID_ARGUMENT,
                f"'{reference}' is not a reference to {target} for the navigation property "
                f"'{navigation}'.",
            )
        table = TABLES[target]
        return self._find(table, RowKey(table.primary_key, match["id"].lower()))[table.primary_key]

    def _check_changes(self, table: Table, row: dict, changes: dict[str, Any]) -> None:
        """Refuse state changes a PATCH may not make and duplicate alternate keys. A state change
        without a statuscode gets the state's default status, as in Dataverse."""
        model = table.state_model
        if model is not None and ("statecode" in changes or "statuscode" in changes):
            current = row["statecode"]
            target = changes.get("statecode", current)
            if target not in model.statuses:
                raise DataverseError(
                    400,
                    INVALID_ARGUMENT,
                    f"{target} is not a valid statecode for {table.logical_name}.",
                )
            if target != current:
                if target in model.actions:
                    raise DataverseError(
                        400,
                        INVALID_ARGUMENT,
                        f"A {table.logical_name} cannot be set to statecode {target} "
                        f"({model.state_names[target]}) by an update: use {model.actions[target]}.",
                    )
                if current not in model.patch_from.get(target, ()):
                    raise DataverseError(
                        400,
                        INVALID_ARGUMENT,
                        f"A {model.state_names[current]} {table.logical_name} cannot be set to "
                        f"{model.state_names[target]}.",
                    )
                changes.setdefault("statuscode", model.statuses[target][0])
            _check_status(table, row, target, changes.get("statuscode", row["statuscode"]))
        key_value = changes.get(table.alternate_key) if table.alternate_key else None
        if key_value is not None:
            holder = self._lookup(table, RowKey(table.alternate_key, key_value))
            if holder is not None and holder is not row:
                raise DataverseError(
                    412, DUPLICATE_KEY, "A record with matching key values already exists."
                )

    def _new_row(self, table: Table, row_id: str, caller: str | None = None) -> dict:
        """A row with the server's defaults, not stored yet."""
        row: dict[str, Any] = dict.fromkeys(table.read_columns)
        row[table.primary_key] = row_id
        row["createdon"] = _now()
        if "ownerid" in table.lookups:
            row["_ownerid_value"] = caller
        if table.state_model is not None:
            row["statecode"], row["statuscode"] = 0, table.state_model.statuses[0][0]
        return row

    def _store(self, table: Table, row: dict, changes: Mapping[str, Any]) -> dict:
        row.update(changes)
        if "fullname" in table.computed:
            names = (row["firstname"], row["lastname"])
            row["fullname"] = " ".join(name for name in names if name) or None
        self._version += 1
        row["versionnumber"] = self._version
        row["modifiedon"] = _now()
        self._rows[table.entity_set][row[table.primary_key]] = row
        return row

    def _insert(self, table: Table, caller: str, values: Mapping[str, Any]) -> dict:
        """A row the server itself creates (by an action), with values already checked."""
        return self._store(table, self._new_row(table, str(uuid.uuid4()), caller), values)


_BIND = re.compile(rf"(?:.*/)?(?P<set>\w+)\((?P<id>{_GUID})\)")


def _check_status(table: Table, row: dict, statecode: int, statuscode: Any) -> None:
    model = table.state_model
    if isinstance(statuscode, bool) or statuscode not in model.statuses[statecode]:
        raise DataverseError(
            400,
            INVALID_ARGUMENT,
            f"{statuscode} is not a valid status code for state code "
            f"{model.type_name}.{model.state_names[statecode]} "
            f"on {table.logical_name} with Id {row[table.primary_key]}.",
        )


def _rows_after(
    last: dict, ordered: list[dict], table: Table, orderby: str | None
) -> list[dict]:
    """The rows of `ordered` that sort after `last` by $orderby, then by primary key: keyset
    paging, so rows that change or stop matching between pages are neither skipped nor repeated.
    `last` is put among them and the lot re-sorted by the shared $orderby code."""
    key = table.primary_key
    others = [row for row in ordered if row[key] != last[key]]
    candidates = sorted([*others, last], key=lambda row: row[key])
    sort = {"$orderby": orderby} if orderby else {}
    resorted = apply_query(candidates, sort, Dialect.DATAVERSE, table.read_columns).rows
    position = next(index for index, row in enumerate(resorted) if row is last)
    return resorted[position + 1 :]


def _project(rows: list[dict], table: Table, select: str | None) -> list[dict]:
    """$select; the primary key and the etag always stay, as in Dataverse."""
    options = {"$select": select} if select is not None else {}
    return apply_query(
        rows, options, Dialect.DATAVERSE, table.read_columns, always_selected=(table.primary_key,)
    ).rows


def _checked_value(name: str, kind: type, value: Any) -> Any:
    is_bool_for_int = kind is int and isinstance(value, bool)  # bool is an int in Python only
    if value is None or (isinstance(value, kind) and not is_bool_for_int):
        return value
    edm = {str: "Edm.String", int: "Edm.Int32", bool: "Edm.Boolean"}[kind]
    raise DataverseError(
        400,
        INVALID_ARGUMENT,
        f"Cannot convert the literal '{value}' to the expected type '{edm}' of '{name}'.",
    )


def _copy(row: Mapping[str, Any], columns: Iterable[str]) -> dict[str, Any]:
    return {column: row[column] for column in columns}


def _with_etag(row: dict) -> dict:
    return {"@odata.etag": _etag(row), **row}


def _etag(row: Mapping[str, Any]) -> str:
    return f'W/"{row["versionnumber"]}"'


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _not_found(table: Table, key: RowKey) -> DataverseError:
    if key.column == table.primary_key:
        message = f"{table.logical_name} With Id = {key.value} Does Not Exist"
    else:
        message = (
            f"A record with the specified key values does not exist in {table.logical_name} entity"
        )
    return DataverseError(404, NOT_FOUND, message)


def _unknown_property(table: Table, name: str) -> DataverseError:
    return DataverseError(
        400,
        UNKNOWN_NAME,
        f"Could not find a property named '{name}' on type '{table.type_name}'.",
    )


# --- HTTP -----------------------------------------------------------------------------------------


# `<set>`, `<set>(<guid>)` or `<set>(<alternate key>='<value>')`, then an optional `/<action>`. A
# quote inside the value is doubled, so the literal ends at the first lone quote, and `)`, `/`,
# `#`, `?` or newlines inside it are data.
_RESOURCE = re.compile(
    r"(?P<set>\w+)"
    r"(?:\((?:(?P<id>[^'()]*)|(?P<key_name>\w+)=(?P<key_literal>'(?:[^']|'')*'))\))?"
    r"(?:/(?P<action>[\w.]+))?"
)
_QUALIFY_LEAD = "Microsoft.Dynamics.CRM.QualifyLead"


class _Resource(NamedTuple):
    table: Table
    key: RowKey | None
    action: str | None


def _parse_resource(request: Request) -> _Resource:
    resource = _resource_path(request)
    match = _RESOURCE.fullmatch(resource)
    if match is None:
        raise DataverseError(400, BAD_QUERY, f"Bad Request - Error in query syntax: '{resource}'.")
    table = TABLES.get(match["set"])
    if table is None:
        raise DataverseError(
            404, UNKNOWN_NAME, f"Resource not found for the segment '{match['set']}'."
        )
    key = None
    if match["key_name"] is not None:
        if match["key_name"] != table.alternate_key:
            raise DataverseError(
                400, BAD_QUERY, f"'{match['key_name']}' is not a key of {table.logical_name}."
            )
        key = RowKey(table.alternate_key, unquote_string_literal(match["key_literal"]))
    elif match["id"] is not None:
        if not re.fullmatch(_GUID, match["id"]):
            raise DataverseError(
                400, BAD_QUERY, f"Bad Request - Error in query syntax: '{match['id']}' is not a GUID."
            )
        key = RowKey(table.primary_key, match["id"].lower())
    return _Resource(table, key, match["action"])


def _resource_path(request: Request) -> str:
    """The path after the service root, percent-decoded exactly once. Read from the raw bytes:
    servers differ in how they decode `scope["path"]` (Starlette's TestClient decodes it twice)."""
    raw = request.scope.get("raw_path")
    path = unquote_to_bytes(raw).decode("utf-8", "replace") if raw else request.scope["path"]
    return path.partition(API_ROOT + "/")[2]


def _preferences(request: Request) -> dict[str, str]:
    preferences = {}
    for item in ",".join(request.headers.getlist("prefer")).split(","):
        name, _, value = item.strip().partition("=")
        if name:
            preferences[name.lower()] = value.strip().strip('"')
    return preferences


def _encode_cookie(row: dict) -> str:
    text = json.dumps(row, separators=(",", ":"))
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def _decode_cookie(token: str, table: Table) -> dict:
    try:
        row = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    except ValueError:
        row = None
    if not isinstance(row, dict) or not isinstance(row.get(table.primary_key), str):
        raise DataverseError(400, BAD_QUERY, "The $skiptoken is not a valid paging cookie.")
    return row


def _next_link(request: Request, cookie: str) -> str:
    """The request URL with its $skiptoken replaced."""
    kept = [
        part
        for part in request.url.query.split("&")
        if part and not part.replace("%24", "$").startswith("$skiptoken=")
    ]
    return str(request.url.replace(query="&".join([*kept, f"$skiptoken={cookie}"])))


def _service_root(request: Request) -> str:
    return str(request.base_url).rstrip("/") + API_ROOT


def _entity_id(request: Request, table: Table, row: dict) -> dict[str, str]:
    url = f"{_service_root(request)}/{table.entity_set}({row[table.primary_key]})"
    return {"OData-EntityId": url}


async def _json_body(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.body())
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise DataverseError(400, INVALID_ARGUMENT, "The request body must be a JSON object.")
    return body


def _require_writable(table: Table) -> None:
    if not table.writable:
        raise DataverseError(
            405, INVALID_ARGUMENT, f"The entity set '{table.entity_set}' is read-only."
        )


def _method_not_allowed(method: str) -> DataverseError:
    return DataverseError(
        405, INVALID_ARGUMENT, f"The requested resource does not support http method '{method}'."
    )


def _page_size(preferences: Mapping[str, str]) -> int | None:
    """The `odata.maxpagesize` preference, capped at the maximum; None if absent or invalid."""
    requested = preferences.get("odata.maxpagesize", "")
    if not requested.isdigit() or int(requested) == 0:
        return None
    return min(int(requested), MAX_PAGE_SIZE)


def _fault_response(fault: Fault) -> JSONResponse:
    """An injected fault, answered as the Web API answers service protection limits and outages."""
    if fault.status == 429:
        code, message = REQUESTS_LIMIT, "Number of requests exceeded the limit of 6000 over time window of 300 seconds."
    elif fault.status >= 500:
        code, message = UNEXPECTED, "An unexpected error occurred."
    else:
        code, message = INVALID_ARGUMENT, "The request failed (a fault injected through the fakes' /_admin/faults)."
    body = {"error": {"code": code, "message": message}}
    return JSONResponse(body, status_code=fault.status, headers=fault.headers())


def create_app(
    state: DataverseState,
    issuer: TokenIssuer,
    audience: str,
    clients: Mapping[str, ClientRegistration],
    faults: FaultPlan | None = None,
) -> FastAPI:
    """The Web API at `<audience>/api/data/v9.2`, accepting tokens whose audience is `audience`."""
    state.register_users(clients.values())
    challenge = (
        f'Bearer authorization_uri="{issuer.issuer_base_url}/{issuer.tenant_id}/oauth2/authorize", '
        f'resource_id="{audience}"'
    )
    app = FastAPI(title="Fake Dataverse Web API", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(DataverseError)
    async def dataverse_error(request: Request, error: DataverseError) -> JSONResponse:
        body = {"error": {"code": error.code, "message": error.message}}
        return JSONResponse(body, status_code=error.status, headers=error.headers)

    @app.exception_handler(ODataQueryError)
    async def query_error(request: Request, error: ODataQueryError) -> JSONResponse:
        return await dataverse_error(request, DataverseError(400, BAD_QUERY, str(error)))

    @app.middleware("http")
    async def count_requests(request: Request, call_next: Any) -> Response:
        if not request.url.path.startswith(API_ROOT + "/"):
            return await call_next(request)  # the /_admin routes mounted alongside
        state.count_request()
        fault = faults.take("dataverse") if faults else None
        response = _fault_response(fault) if fault else await call_next(request)
        response.headers["OData-Version"] = "4.0"
        return response

    async def caller(request: Request) -> str:
        """The calling application user's systemuserid."""
        try:
            return issuer.verify(request.headers.get("authorization"), audience).app_user_id
        except InvalidToken as error:
            raise DataverseError(
                401,
                UNAUTHORIZED,
                f"Unauthorized: {error.reason}.",
                {"WWW-Authenticate": challenge},
            ) from None

    @app.get(API_ROOT + "/WhoAmI")
    async def who_am_i(request: Request, user_id: str = Depends(caller)) -> JSONResponse:
        metadata = f"{_service_root(request)}/$metadata#Microsoft.Dynamics.CRM.WhoAmIResponse"
        return JSONResponse(
            {
                "@odata.context": metadata,
                "BusinessUnitId": state.business_unit_id,
                "UserId": user_id,
                "OrganizationId": state.organization_id,
            }
        )

    @app.post(API_ROOT + "/WinOpportunity")
    async def win_opportunity(request: Request, user_id: str = Depends(caller)) -> Response:
        state.close_opportunity(await _json_body(request), user_id, won=True)
        return Response(status_code=204)

    @app.post(API_ROOT + "/LoseOpportunity")
    async def lose_opportunity(request: Request, user_id: str = Depends(caller)) -> Response:
        state.close_opportunity(await _json_body(request), user_id, won=False)
        return Response(status_code=204)

    # The routes below match any resource path; _parse_resource reads it from the raw path.
    @app.get(f"{API_ROOT}/{{resource:{RESOURCE_CONVERTOR}}}")
    async def read(request: Request, user_id: str = Depends(caller)) -> JSONResponse:
        target = _parse_resource(request)
        if target.action is not None:
            raise DataverseError(
                404, UNKNOWN_NAME, f"Resource not found for the segment '{target.action}'."
            )
        params = dict(request.query_params)
        metadata = f"{_service_root(request)}/$metadata#{target.table.entity_set}"
        if target.key is not None:
            row = state.get(target.table, target.key, params)
            return JSONResponse({"@odata.context": f"{metadata}/$entity", **row})
        page_size = _page_size(_preferences(request))
        token = params.pop("$skiptoken", None)
        after = _decode_cookie(token, target.table) if token is not None else None
        page = state.query(target.table, params, user_id, page_size or MAX_PAGE_SIZE, after)
        selected = params.get("$select")
        context = metadata + (f"({selected})" if selected else "")
        body: dict[str, Any] = {"@odata.context": context}
        if page.count is not None:
            body["@odata.count"] = page.count
        body["value"] = page.rows
        if page.last is not None:
            body["@odata.nextLink"] = _next_link(request, _encode_cookie(page.last))
        applied = {"Preference-Applied": f"odata.maxpagesize={page_size}"} if page_size else None
        return JSONResponse(body, headers=applied)

    @app.post(f"{API_ROOT}/{{resource:{RESOURCE_CONVERTOR}}}")
    async def create_or_act(request: Request, user_id: str = Depends(caller)) -> Response:
        target = _parse_resource(request)
        if target.action is not None:
            if target.table is not LEADS or target.key is None or target.action != _QUALIFY_LEAD:
                raise DataverseError(
                    404, UNKNOWN_NAME, f"Resource not found for the segment '{target.action}'."
                )
            created = state.qualify_lead(target.key, await _json_body(request), user_id)
            metadata = f"{_service_root(request)}/$metadata#crmbaseentity"
            return JSONResponse({"@odata.context": metadata, "value": created})
        if target.key is not None:
            raise _method_not_allowed("POST")
        _require_writable(target.table)
        row = state.create(target.table, await _json_body(request), user_id)
        headers = _entity_id(request, target.table, row)
        if _preferences(request).get("return") != "representation":
            return Response(status_code=204, headers=headers)
        headers["Preference-Applied"] = "return=representation"
        metadata = f"{_service_root(request)}/$metadata#{target.table.entity_set}/$entity"
        body = {"@odata.context": metadata, **_with_etag(row)}
        return JSONResponse(body, status_code=201, headers=headers)

    @app.patch(f"{API_ROOT}/{{resource:{RESOURCE_CONVERTOR}}}")
    async def update(request: Request, user_id: str = Depends(caller)) -> Response:
        target = _parse_resource(request)
        if target.key is None or target.action is not None:
            raise _method_not_allowed("PATCH")
        _require_writable(target.table)
        row = state.upsert(
            target.table,
            target.key,
            await _json_body(request),
            user_id,
            request.headers.get("if-match"),
            request.headers.get("if-none-match"),
        )
        return Response(status_code=204, headers=_entity_id(request, target.table, row))

    return app
