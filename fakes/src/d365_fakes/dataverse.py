"""Fake Dataverse Web API (Sales) under /api/data/v9.2: leads, opportunities, accounts, contacts,
and the actions that move a lead to a won or lost opportunity; the legal entities dual-write keeps
in `cdm_companies`.

It keeps the Web API conventions clients depend on: server-generated lowercase GUID keys; lookups
read as `_<name>_value` and written as `<navigation property>@odata.bind`; weak etags from a
version number; PATCH as upsert, also by the lead's alternate key, composite as dual-write makes
company-specific keys (`msdyn_prospectid` and the company); key values that cannot travel in a URL
refused there, as the service refuses them; the bulk
actions CreateMultiple, UpdateMultiple and UpsertMultiple, all-or-nothing; DELETE; change tracking
(`Prefer: odata.track-changes`, delta links, deleted rows); keyset server-driven paging; errors as
`{"error": {"code": "0x...", "message": "..."}}`. Keyed reads and writes cost O(rows touched), so
a table of 100,000 leads stays quick: an index per alternate key, and rows kept in key order.

All state is touched from async handlers that do not await while they read or write it, so the
event loop serialises requests and the state needs no lock.
"""

import base64
import json
import re
import time
import uuid
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from fnmatch import fnmatchcase
from functools import cached_property
from itertools import chain, islice
from operator import itemgetter
from typing import Any, NamedTuple
from urllib.parse import quote, unquote, unquote_to_bytes

from fastapi import Depends, FastAPI, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.types import Scope

from d365_fakes import metadata, model
from d365_fakes.clients import ClientRegistration
from d365_fakes.dataverse_batch import BatchError, run_batch
from d365_fakes.faults import Fault
from d365_fakes.limits import BATCH_PART, dataverse_request_id
from d365_fakes.odata_query import (
    Dialect,
    ODataQueryError,
    UnknownProperty,
    ValueIndex,
    apply_query,
    index_plan,
    lookup_limit,
    unquote_string_literal,
)
from d365_fakes.routing import RESOURCE_CONVERTOR, StampedAnswers
from d365_fakes.security import (
    DATAVERSE,
    PrivilegeMissing,
    TenantSecurity,
    dataverse_privileges_needed,
    missing_privilege_message,
)
from d365_fakes.tokens import InvalidToken, TokenIssuer

API_ROOT = "/api/data/v9.2"
MAX_PAGE_SIZE = 5000

NOT_FOUND = "0x80040217"
DUPLICATE_KEY = "0x80040237"
PRECONDITION_FAILED = "0x80060882"
INVALID_ARGUMENT = "0x80040203"
BAD_QUERY = "0x8006088a"
RESOURCE_NOT_FOUND = "0x8006088a"  # no resource segment (entity set, action) of that name
UNKNOWN_NAME = "0x80060888"  # no property of that name
UNAUTHORIZED = "0x80072243"
PRIVILEGE_DENIED = "0x80040220"  # the caller's roles lack a privilege the request needs
NOT_A_MEMBER = "0x80072560"  # the app registration has no application user in this environment
REQUESTS_LIMIT = "0x80072322"  # service protection: number of requests
UNEXPECTED = "0x80040216"
ISV_ABORTED = "0x80040265"  # a synchronous plugin threw; the whole operation is rolled back
EXPIRED_VERSION_STAMP = "0x80044352"  # a change tracking token older than its retention
STRING_TOO_LONG = "0x80044331"  # a string longer than its column's MaxLength
OUT_OF_RANGE = "0x8004431a"  # a choice value that is not one of the column's options

DELTA_TOKEN_TTL_S = 7 * 24 * 3600  # change tracking tokens expire after 7 days by default

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
    # The alternate key's columns as read (a lookup part as `_<column>_value`); () for none.
    alternate_key: tuple[str, ...] = ()
    state_model: StateModel | None = None
    writable: bool = True  # by POST/PATCH; read-only sets are written by actions or at start

    @cached_property
    def read_columns(self) -> tuple[str, ...]:
        lookup_values = dict.fromkeys(f"_{column}_value" for column, _ in self.lookups.values())
        return (self.primary_key, *self.columns, *self.computed, *lookup_values, *SERVER_COLUMNS)

    @property
    def type_name(self) -> str:
        return f"Microsoft.Dynamics.CRM.{self.logical_name}"

    @cached_property
    def key_lookups(self) -> dict[str, tuple[str, str]]:
        """The alternate key's lookup parts: `_<column>_value` -> (navigation property, entity set).
        A lookup part is a row id, written unquoted in a URL key and bound in a body."""
        return {
            f"_{column}_value": (navigation, target)
            for navigation, (column, target) in self.lookups.items()
            if f"_{column}_value" in self.alternate_key
        }

    @cached_property
    def key_forms(self) -> str:
        """How a URL names a row of this table, for messages."""
        forms = f"{self.entity_set}(<{self.primary_key}>)"
        if self.alternate_key:
            parts = (
                f"{column}=<guid>" if column in self.key_lookups else f"{column}='<value>'"
                for column in self.alternate_key
            )
            forms += f" or {self.entity_set}({','.join(parts)})"
        return forms


SERVER_COLUMNS = ("createdon", "modifiedon", "versionnumber")


def _table(
    entity: model.Entity,
    patch_from: dict[int, frozenset[int]] | None = None,
    actions: dict[int, str] | None = None,
    writable: bool = True,
) -> Table:
    """A table as the model describes it: its data columns and their JSON types, its navigation
    properties, the columns the server computes, its alternate key, its states and statuses.
    `patch_from` and `actions`: which state changes a PATCH may make, and the actions for the rest."""
    attributes = [a for a in entity.attributes if a.logical_name != entity.primary_id]
    lookups = {
        navigation: (column, model.DATAVERSE_ENTITIES[target].entity_set_name)
        for navigation, (column, target) in model.navigation_properties(entity).items()
    }
    lookup_columns = {column for column, _ in lookups.values()}
    key = entity.keys[0].key_attributes if entity.keys else ()
    state_model = None
    if "statecode" in entity.by_name:
        states = entity.by_name["statecode"].options
        statuses = entity.by_name["statuscode"].options
        state_model = StateModel(
            f"{entity.schema_name}State",
            {state.value: state.label for state in states},
            {state.value: tuple(s.value for s in statuses if s.state == state.value) for state in states},
            patch_from or {},
            actions or {},
        )
    return Table(
        entity.entity_set_name,
        entity.logical_name,
        entity.primary_id,
        columns={a.logical_name: a.value_type for a in attributes if a.is_data},
        lookups=lookups,
        computed=tuple(
            a.logical_name
            for a in attributes
            if a.value_type is not None and not a.is_data and a.logical_name not in SERVER_COLUMNS
        ),
        alternate_key=tuple(f"_{column}_value" if column in lookup_columns else column for column in key),
        state_model=state_model,
        writable=writable,
    )


_ADDRESS = tuple(column for column in model.LEAD.by_name if column.startswith("address1_"))
# The lead's key is dual-write's (msdyn_prospectid, msdyn_company). A lead without a company
# (written before the company was part of the key) is keyed by its msdyn_prospectid alone.
LEADS = _table(
    model.LEAD,
    patch_from={2: frozenset({0}), 0: frozenset({1, 2})},
    actions={1: "QualifyLead"},
)
OPPORTUNITIES = _table(
    model.OPPORTUNITY, patch_from={0: frozenset({1, 2})}, actions={1: "WinOpportunity", 2: "LoseOpportunity"}
)
ACCOUNTS = _table(model.ACCOUNT)
CONTACTS = _table(model.CONTACT)
OPPORTUNITY_CLOSES = _table(model.OPPORTUNITY_CLOSE, writable=False)
SYSTEM_USERS = _table(model.SYSTEM_USER, writable=False)
SAVED_QUERIES = _table(model.SAVED_QUERY, writable=False)
# Dual-write owns cdm_companies, so the Web API only reads it. Filled through the admin surface
# (`seed_companies`), as the legal-entity map would at setup.
CDM_COMPANIES = _table(model.CDM_COMPANY, writable=False)
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
        CDM_COMPANIES,
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


def company_id(code: str) -> str:
    """The cdm_companyid of legal entity `code` (any case): fixed, so that tests and the admin
    surface can name a company without reading it first."""
    return str(uuid.uuid5(_IDS, "cdm_company:" + code.lower()))


_VIEW_FILTERS = {saved_view_id(name): (entity, text) for name, entity, text in SAVED_VIEWS}


class RowKey(NamedTuple):
    """A row named by its primary key (one column, the id) or by its alternate key (every column
    of it, in the table's order; a lookup part is a lowercase id, or None for an empty lookup)."""

    columns: tuple[str, ...]
    values: tuple[str | None, ...]

    def is_id(self, table: "Table") -> bool:
        return self.columns == (table.primary_key,)

    def folded(self) -> tuple[str | None, ...]:
        """The values as the database collation compares them: case-insensitively."""
        return tuple([value.casefold() if type(value) is str else value for value in self.values])


def _id_key_of(table: Table, row_id: str) -> RowKey:
    return RowKey((table.primary_key,), (row_id,))


class Page(NamedTuple):
    rows: list[dict]
    count: int | None  # with $count=true
    last: dict | None  # the page's last row, unprojected, when more rows follow


class DeletedRow(NamedTuple):
    id: str
    version: int  # the version the delete was given


class ChangePage(NamedTuple):
    rows: list[dict]  # rows changed since the token, projected, in primary key order...
    deleted: list[str]  # ...then the ids of rows deleted since
    cursor: dict | None  # where the next page starts; None on the last page


@dataclass(frozen=True)
class Rejection:
    """A synchronous plugin that throws on any write of a row whose `column` equals `value`."""

    column: str
    value: str | int | bool
    message: str | None


DECISION_OUTCOMES = ("won", "lost", "disqualified", "qualified")
_DISQUALIFIED_STATUS = 6  # No Longer Interested, as Seller.disqualify sets it
_LOST_STATUS = 4  # Canceled, as Seller.close_opportunity sets it
_TOKEN_TIME = "%m/%d/%Y %H:%M:%S"  # as in Dataverse's tokens: `919042!08/22/2017 08:10:44`
_DELTA_TOKEN = re.compile(r"(?P<version>\d{1,18})!(?P<moment>\d\d/\d\d/\d{4} \d\d:\d\d:\d\d)")


class DataverseState:
    """The organization's rows, the fixed views and users, and request/write counts.

    `clock` stamps rows and change tracking tokens (tests pass a fake one to make tokens expire);
    a token older than `delta_token_ttl_s` is refused, as Dataverse refuses one older than its
    change tracking retention.
    """

    def __init__(
        self,
        clock: Callable[[], float] = time.time,
        delta_token_ttl_s: float = DELTA_TOKEN_TTL_S,
    ) -> None:
        self.organization_id = str(uuid.uuid5(_IDS, "organization"))
        self.business_unit_id = str(uuid.uuid5(_IDS, "businessunit"))
        self.system_user_id = str(uuid.uuid5(_IDS, "systemuser/SYSTEM"))
        self._clock = clock
        self._stamp: tuple[datetime | None, str] = (None, "")  # `_now`'s last second and its text
        self._delta_token_ttl_s = delta_token_ttl_s
        self._rows: dict[str, dict[str, dict]] = {name: {} for name in TABLES}
        # Each table's rows in primary key order, and the rows added since (merged in on reading).
        self._ordered_rows: dict[str, list[dict]] = {name: [] for name in TABLES}
        self._added: dict[str, dict[str, dict]] = {name: {} for name in TABLES}
        # Per alternate key: its values, casefolded as the database collation compares them, to ids.
        self._keys: dict[str, dict[tuple[str | None, ...], str]] = {
            table.entity_set: {} for table in TABLES.values() if table.alternate_key
        }
        self._tombstones: dict[str, list[DeletedRow]] = {name: [] for name in TABLES}
        # Per table: a column's rows by value, for `$filter` lookups (each made on first use).
        self._value_indexes: dict[str, dict[str, ValueIndex]] = {name: {} for name in TABLES}
        self._app_users: dict[str, str] = {}  # client id -> its application user's systemuserid
        self._journal: list[tuple[Table, str, dict | None]] | None = None  # see _atomic
        self._version = 0
        self.model = model.DataverseModel()  # the tenant's tables, as EntityDefinitions serves them
        self.reset()
        system = self._new_row(SYSTEM_USERS, self.system_user_id)
        self._store(SYSTEM_USERS, system, {"fullname": "SYSTEM"})

    def reset(self) -> None:
        """Empty the data tables (cdm_companies too: `seed_companies` fills it again), their change
        history, the rejections and the counts; the users and saved queries stay (a removed saved
        view comes back), and the model is the default tenant's again. Delta tokens issued before
        expire: the rows emptied here left no tombstones to report, so their holders must sync in
        full."""
        for name, rows in self._rows.items():
            if name not in _KEPT_ON_RESET:
                rows.clear()
                self._ordered_rows[name] = []
                self._added[name].clear()
                self._tombstones[name].clear()
                self._keys.get(name, {}).clear()
                self._value_indexes[name].clear()
        self._rejections: dict[str, list[Rejection]] = {}
        self.model.reset()
        for name, entity, _ in SAVED_VIEWS:
            if saved_view_id(name) not in self._rows[SAVED_QUERIES.entity_set]:
                view = self._new_row(SAVED_QUERIES, saved_view_id(name))
                self._store(SAVED_QUERIES, view, {"name": name, "returnedtypecode": entity})
        self._version += 1
        self._oldest_token_version = self._version
        self._requests = 0
        self._writes = {table.entity_set: 0 for table in TABLES.values() if table.writable}

    def counts(self) -> dict[str, Any]:
        return {"requests": self._requests, "writes": dict(self._writes)}

    def count_request(self) -> None:
        self._requests += 1

    def remove_saved_view(self, name: str) -> None:
        """The system view `name` is gone (as if an admin deleted it) until reset; KeyError if
        there is no view of that name."""
        view = self._rows[SAVED_QUERIES.entity_set].get(saved_view_id(name))
        if view is None:
            raise KeyError(name)
        self._remove(SAVED_QUERIES, view)

    def register_users(self, clients: Iterable[ClientRegistration]) -> None:
        """One application user per app registration, as an admin creates them in Dataverse."""
        for client in clients:
            user = self._new_row(SYSTEM_USERS, client.app_user_id)
            values = {"fullname": client.display_name, "applicationid": client.client_id, "isdisabled": False}
            self._store(SYSTEM_USERS, user, values)
            self._app_users[client.client_id] = client.app_user_id

    def seed_companies(self, codes: Any) -> int:
        """A cdm_companies row per legal entity code, as dual-write's legal-entity map creates them
        at setup: `cdm_companycode` in capitals as F&O shows company ids, the fixed `company_id`.
        Codes already there (any case) are skipped. Answers how many were created; ValueError if
        `codes` is not a list of non-empty strings (then nothing is created)."""
        if not isinstance(codes, list) or not all(isinstance(code, str) and code for code in codes):
            raise ValueError('codes must be a list of legal entity codes, e.g. ["usrt", "usmf"]')
        created = 0
        for code in codes:
            if self._lookup(CDM_COMPANIES, RowKey(CDM_COMPANIES.alternate_key, (code,))) is None:
                row = self._new_row(CDM_COMPANIES, company_id(code))
                # The fake knows no legal entity names: the name repeats the code.
                values = {"cdm_companycode": code.upper(), "cdm_name": code.upper()}
                self._store(CDM_COMPANIES, row, values)
                created += 1
        return created

    def exists(self, table: Table, key: RowKey) -> bool:
        """Whether a GET of the row would find it: a row holds `key`, a key the table defines."""
        try:
            self._check_key_defined(table, key)
        except DataverseError:
            return False
        return self._lookup(table, key) is not None

    def annotated(self, table: Table, row: dict, wanted: Callable[[str], bool]) -> dict:
        """`row` with the annotations Dataverse adds for `Prefer: odata.include-annotations` (those
        whose names `wanted` accepts), each before its property: the label of a choice, state,
        status or yes/no column and the text of a date (`FormattedValue`); for a lookup, its row's
        primary name, the navigation property and the table it points at."""
        entity = self.model.entity(table.logical_name)
        annotated: dict[str, Any] = {}
        for name, value in row.items():
            if value is not None and not name.startswith("@"):
                for annotation, text in self._annotations(table, entity, name, value):
                    if wanted(annotation):
                        annotated[f"{name}@{annotation}"] = text
            annotated[name] = value
        return annotated

    def _annotations(
        self, table: Table, entity: model.Entity, name: str, value: Any
    ) -> list[tuple[str, str]]:
        lookup = re.fullmatch(r"_(\w+)_value", name)
        attribute = entity.by_name.get(lookup[1] if lookup else name)
        if attribute is None:
            return []
        if lookup and attribute.is_lookup:
            for navigation, (column, target) in table.lookups.items():
                referenced = self._rows.get(target, {}).get(value) if column == attribute.logical_name else None
                if referenced is not None:
                    target_table = TABLES[target]
                    primary_name = model.DATAVERSE_ENTITIES[target_table.logical_name].primary_name
                    annotations = [(_FORMATTED, referenced.get(primary_name))] if primary_name else []
                    return [
                        *[(annotation, text) for annotation, text in annotations if text is not None],
                        ("Microsoft.Dynamics.CRM.associatednavigationproperty", navigation),
                        ("Microsoft.Dynamics.CRM.lookuplogicalname", target_table.logical_name),
                    ]
            return []
        if attribute.options:
            label = next((option.label for option in attribute.options if option.value == int(value)), None)
            return [(_FORMATTED, label)] if label is not None else []
        if attribute.type == "DateTime":
            moment = datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ")
            hour = moment.hour % 12 or 12
            text = f"{moment.month}/{moment.day}/{moment.year} {hour}:{moment.minute:02d} {'PM' if moment.hour >= 12 else 'AM'}"
            return [(_FORMATTED, text)]
        return []

    def get(self, table: Table, key: RowKey, params: Mapping[str, str]) -> dict:
        unsupported = sorted(set(params) - {"$select"})
        if unsupported:
            raise DataverseError(
                400, BAD_QUERY, f"The query parameter {unsupported[0]} is not supported here."
            )
        self._check_key_defined(table, key)
        row = _with_etag(self._find(table, key))
        return _project([row], table, self.read_columns(table), params.get("$select"))[0]

    def query(
        self,
        table: Table,
        params: Mapping[str, str],
        caller: str,
        page_size: int,
        after: dict | None,
    ) -> Page:
        """One page of a collection; `after` is the previous page's last row (the paging cookie).
        Filters and sorts references to the stored rows; only the page's rows are copied."""
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
        keys = None
        if "$filter" in options:

            def index(column: str) -> ValueIndex:
                return self._value_index(table, column)

            plan = index_plan(options["$filter"], Dialect.DATAVERSE, index, fields=self.read_columns(table))
            limit = lookup_limit(len(self._rows[table.entity_set]))
            keys = None if plan is None else plan.narrowest(index, limit)
        if keys is None:
            rows = self._ordered(table)
        else:  # as Dataverse's SQL finds them by index; the filter still runs on them
            stored = self._rows[table.entity_set]
            rows = [stored[row_id] for row_id in sorted(keys)]  # primary key order, as `_ordered`
        result = apply_query(rows, options, Dialect.DATAVERSE, self.read_columns(table))
        matching = result.rows
        if "$top" in options:  # $top asks for one bounded result: no paging
            page, last = matching, None
        else:
            if after is not None:
                matching = _rows_after(after, matching, table, options.get("$orderby"))
            page = matching[:page_size]
            last = page[-1] if len(matching) > page_size else None
        columns = self.read_columns(table)
        rows = _project([_with_etag(row) for row in page], table, columns, params.get("$select"))
        return Page(rows, result.count, last)

    def changes(
        self,
        table: Table,
        select: str | None,
        since: int | None,
        cursor: Mapping[str, Any] | None,
        page_size: int,
    ) -> ChangePage:
        """One page of change tracking: the rows changed after version `since` (every row when
        None) in primary key order, then the rows deleted after it. A row created and deleted
        since shows only as deleted; one deleted and created again (same id) only as changed."""
        key = itemgetter(table.primary_key)
        changed: Iterable[dict] = ()
        deleted_after = since
        if cursor is None or "row" in cursor:
            rows = self._ordered(table)
            start = bisect_right(rows, cursor["row"], key=key) if cursor else 0
            changed = (
                row
                for row in islice(rows, start, None)
                if since is None or row["versionnumber"] > since
            )
        else:
            deleted_after = cursor["deleted"]
        deleted: Iterable[DeletedRow] = ()
        if since is not None:
            tombstones, live = self._tombstones[table.entity_set], self._rows[table.entity_set]
            start = bisect_right(tombstones, deleted_after, key=itemgetter(1))
            deleted = (gone for gone in islice(tombstones, start, None) if gone.id not in live)
        taken = list(islice(chain(changed, deleted), page_size + 1))
        page = taken[:page_size]
        next_cursor = None
        if len(taken) > page_size:
            last = page[-1]
            is_deleted = isinstance(last, DeletedRow)
            next_cursor = {"deleted": last.version} if is_deleted else {"row": key(last)}
        rows = [_with_etag(item) for item in page if not isinstance(item, DeletedRow)]
        deleted_ids = [item.id for item in page if isinstance(item, DeletedRow)]
        return ChangePage(_project(rows, table, self.read_columns(table), select), deleted_ids, next_cursor)

    def delta_token(self) -> str:
        """A token for the changes after now: the version, then the time, as Dataverse writes it."""
        moment = datetime.fromtimestamp(self._clock(), timezone.utc)
        return f"{self._version}!{moment.strftime(_TOKEN_TIME)}"

    def token_version(self, token: str, check_expiry: bool = True) -> int:
        """The version a delta token stands for: 400 if the token is not one this organization
        issued, 400 ExpiredVersionStamp if it is older than the retention or than the last reset."""
        match = _DELTA_TOKEN.fullmatch(token)
        try:
            issued = datetime.strptime(match["moment"], _TOKEN_TIME) if match else None
        except ValueError:
            issued = None
        if match is None or issued is None or int(match["version"]) > self._version:
            raise DataverseError(400, BAD_QUERY, f"The $deltatoken '{token}' is not valid.")
        version = int(match["version"])
        age = self._clock() - issued.replace(tzinfo=timezone.utc).timestamp()
        if check_expiry and (version < self._oldest_token_version or age > self._delta_token_ttl_s):
            raise DataverseError(
                400,
                EXPIRED_VERSION_STAMP,
                "ExpiredVersionStamp: The version stamp associated with the change tracking "
                "token has expired. Perform a full sync.",
            )
        return version

    def create(self, table: Table, body: Mapping[str, Any], caller: str) -> dict:
        """POST. A primary key in the body names the new row's id: create-only at that id."""
        if body.get(table.primary_key) is not None:
            key = _id_key(table, body[table.primary_key])
            return self.upsert(table, key, body, caller, if_match=None, if_none_match="*")
        changes = self._changes_from_body(table, body)
        row = self._new_row(table, str(uuid.uuid4()), caller)
        self._check_changes(table, row, changes)
        self._store(table, row, changes)
        self._writes[table.entity_set] += 1
        return row

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
        specific etag must be current); `If-None-Match: *` makes it create-only. A row created at
        an alternate key gets the key's values; a company in it must exist, as a bind's must."""
        if not key.is_id(table):
            self._check_key_defined(table, key)
            _refuse_key_in_body(table, body)
        changes = self._changes_from_body(table, body)
        row = self._lookup(table, key)
        if row is None:
            if if_match is not None:
                raise _not_found(table, key)
            row_id = key.values[0] if key.is_id(table) else str(uuid.uuid4())
            if not key.is_id(table):
                self._check_key_lookups(table, key)
                for column, value in zip(key.columns, key.values):
                    attribute = self.model.attribute(table.logical_name, column)
                    if attribute is not None and value is not None:  # not a lookup part
                        _checked_value(table, attribute, value)
            row = self._new_row(table, row_id, caller)
            row.update(zip(key.columns, key.values))
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
        self._store(table, row, changes)
        self._writes[table.entity_set] += 1
        return row

    def write_multiple(self, table: Table, operation: str, targets: Any, caller: str) -> list[str]:
        """CreateMultiple, UpdateMultiple or UpsertMultiple (`operation` "create", "update" or
        "upsert"): each target written exactly as the single-row POST, PATCH with `If-Match: *`
        or PATCH writes it, all in one transaction, so the first target that fails fails the
        request and leaves every row as it was. Answers the rows' ids in target order."""
        if not isinstance(targets, list) or not targets:
            raise DataverseError(
                400,
                INVALID_ARGUMENT,
                "The parameter 'Targets' is required: a non-empty collection of records.",
            )
        keyed = [
            (_target_key(table, index, target, key_required=operation != "create"), target)
            for index, target in enumerate(targets)
        ]
        seen: dict[tuple, int] = {}
        for index, (key, target) in enumerate(keyed):
            identity = self._identity(table, key, target)
            if identity in seen:
                raise DataverseError(
                    400,
                    INVALID_ARGUMENT,
                    f"Targets[{seen[identity]}] and Targets[{index}] are the same "
                    f"{table.logical_name} record; a request may write each record once.",
                )
            if identity is not None:
                seen[identity] = index
        with self._atomic():
            rows = [
                self._write_target(table, operation, key, target, caller) for key, target in keyed
            ]
        return [row[table.primary_key] for row in rows]

    def delete(self, table: Table, key: RowKey) -> None:
        """DELETE: the row goes; a tombstone stays, for change tracking to report."""
        self._check_key_defined(table, key)
        row = self._find(table, key)
        if self._journal is not None:
            self._journal.append((table, row[table.primary_key], dict(row)))
        self._remove(table, row)
        self._version += 1
        self._tombstones[table.entity_set].append(
            DeletedRow(row[table.primary_key], self._version)
        )
        self._writes[table.entity_set] += 1

    def qualify_lead(self, key: RowKey, params: Mapping[str, Any], caller: str) -> list[dict]:
        """The QualifyLead action: create what is asked, close the lead as Qualified, and answer
        references to the created rows. One transaction."""
        self._check_key_defined(LEADS, key)
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
        with self._atomic():
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
        """WinOpportunity / LoseOpportunity: record an opportunityclose and close the opportunity,
        in one transaction."""
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
        with self._atomic():
            self._insert(OPPORTUNITY_CLOSES, caller, changes)
            self._store(
                OPPORTUNITIES, opportunity, {"statecode": closed_state, "statuscode": status}
            )
        self._writes[OPPORTUNITIES.entity_set] += 1

    def add_rejection(self, entity_set: Any, column: Any, value: Any, message: Any = None) -> None:
        """From now on, a write of a row of `entity_set` whose `column` would equal `value` fails
        as it does when a synchronous plugin throws on that record. ValueError naming the field if
        an argument is wrong."""
        table = TABLES.get(entity_set) if isinstance(entity_set, str) else None
        if table is None or not table.writable:
            writable = ", ".join(name for name, candidate in TABLES.items() if candidate.writable)
            raise ValueError(f"entity_set must be one of {writable}")
        if column not in table.read_columns:
            raise ValueError(f"column must be a column of {entity_set}, as {table.primary_key} is")
        if not isinstance(value, (str, int, bool)):
            raise ValueError("value must be a string, an integer or a boolean")
        if message is not None and not isinstance(message, str):
            raise ValueError("message must be a string")
        self._rejections.setdefault(entity_set, []).append(Rejection(column, value, message))

    def clear_rejections(self) -> None:
        self._rejections.clear()

    def apply_decisions(self, decisions: Any, as_client_id: Any = None) -> dict[str, Any]:
        """Sellers' decisions on leads named by prospect id (and company, see `_decided_lead`),
        made through the Web API's own actions (QualifyLead, WinOpportunity, LoseOpportunity, the
        disqualifying PATCH) as the application user of the registered client `as_client_id`, or
        as SYSTEM. Each decision is its own transaction: those that fail are reported, the others
        stay. ValueError if the request itself is malformed (then nothing is applied)."""
        if as_client_id is None:
            caller = self.system_user_id
        elif isinstance(as_client_id, str) and as_client_id in self._app_users:
            caller = self._app_users[as_client_id]
        else:
            raise ValueError("as_client_id must be the client_id of a registered client")
        outcomes = " | ".join(f'"{outcome}"' for outcome in DECISION_OUTCOMES)
        shape = f'{{"msdyn_prospectid": "...", "outcome": {outcomes}}}'
        shape += ', optionally with "company": "<legal entity>"'
        if not isinstance(decisions, list):
            raise ValueError(f"decisions must be a list of {shape}")
        for index, decision in enumerate(decisions):
            if (
                not isinstance(decision, dict)
                or not {"msdyn_prospectid", "outcome"} <= set(decision)
                or not set(decision) <= {"msdyn_prospectid", "outcome", "company"}
                or not isinstance(decision["msdyn_prospectid"], str)
                or decision["outcome"] not in DECISION_OUTCOMES
                or not isinstance(decision.get("company", "-"), str)
                or decision.get("company") == ""
            ):
                raise ValueError(f"decisions[{index}] must be {shape}")
        errors = []
        for index, decision in enumerate(decisions):
            prospect_id, company = decision["msdyn_prospectid"], decision.get("company")
            try:
                with self._atomic():
                    lead = self._decided_lead(prospect_id, company)
                    self._decide(lead, decision["outcome"], caller)
            except DataverseError as error:
                named = {"msdyn_prospectid": prospect_id}
                named |= {"company": company} if company is not None else {}
                errors.append(
                    {"index": index, **named, "code": error.code, "error": error.message}
                )
        return {"applied": len(decisions) - len(errors), "errors": errors}

    def _decided_lead(self, prospect_id: str, company: str | None) -> dict:
        """The lead a decision names. With `company`: the lead keyed (prospect_id, company).
        Without: the lead keyed `prospect_id` with no company (leads written before the company
        was part of the key carried `usrt:P-000001`), else, for `usrt:P-000001`, the lead keyed
        ('P-000001', usrt). Found through the key index, never through a URL key, so a ':' in the
        value is no obstacle here."""
        key_columns = LEADS.alternate_key
        if company is not None:
            return self._find(LEADS, RowKey(key_columns, (prospect_id, company_id(company))))
        literal = RowKey(key_columns, (prospect_id, None))
        lead = self._lookup(LEADS, literal)
        code, colon, bare = prospect_id.partition(":")
        if lead is None and colon:
            lead = self._lookup(LEADS, RowKey(key_columns, (bare, company_id(code))))
        if lead is None:
            raise _not_found(LEADS, literal)
        return lead

    def _decide(self, lead: dict, outcome: str, caller: str) -> None:
        """A seller's decision: won and lost qualify the lead (account, contact, opportunity) and
        close the opportunity; a lead already qualified has its qualifying opportunity closed."""
        lead_key = _id_key_of(LEADS, lead[LEADS.primary_key])
        if outcome == "disqualified":
            changes = {"statecode": 2, "statuscode": _DISQUALIFIED_STATUS}
            self.upsert(LEADS, lead_key, changes, caller, if_match="*", if_none_match=None)
            return
        opportunity_id = lead["_qualifyingopportunityid_value"] if lead["statecode"] == 1 else None
        if outcome == "qualified" or opportunity_id is None:
            everything = {"CreateAccount": True, "CreateContact": True, "CreateOpportunity": True}
            created = self.qualify_lead(lead_key, {**everything, "Status": 3}, caller)
            opportunity_id = created[-1]["opportunityid"]
        if outcome in ("won", "lost"):
            won = outcome == "won"
            closing = {
                "subject": "Won" if won else "Lost",
                "opportunityid@odata.bind": f"/opportunities({opportunity_id})",
            }
            params = {"Status": 3 if won else _LOST_STATUS, "OpportunityClose": closing}
            self.close_opportunity(params, caller, won)

    def _write_target(
        self, table: Table, operation: str, key: RowKey | None, target: dict, caller: str
    ) -> dict:
        if operation == "create":
            if key is None:
                return self.create(table, target, caller)
            return self.upsert(table, key, target, caller, if_match=None, if_none_match="*")
        if_match = "*" if operation == "update" else None
        return self.upsert(table, key, target, caller, if_match=if_match, if_none_match=None)

    def _identity(self, table: Table, key: RowKey | None, target: dict) -> tuple | None:
        """The record a bulk target writes, so that two targets for one record are caught: the
        existing row's id, else the key the row would be created at (for a target named by
        nothing, the alternate key its body gives); None for a new row named by nothing."""
        if key is None:
            key = _key_in_body(table, target)
            if key is None:
                return None
        row = self._lookup(table, key)
        if row is not None:
            return table.primary_key, row[table.primary_key]
        return key.columns, key.folded()

    def _view_filter(self, table: Table, view_id: str | None, caller: str) -> str | None:
        if view_id is None:
            return None
        entity, text = _VIEW_FILTERS.get(view_id.lower(), (None, None))
        if text is None or view_id.lower() not in self._rows[SAVED_QUERIES.entity_set]:
            raise DataverseError(404, NOT_FOUND, f"savedquery With Id = {view_id} Does Not Exist")
        if entity != table.logical_name:
            raise DataverseError(
                400,
                INVALID_ARGUMENT,
                f"The saved query {view_id} returns {entity} rows, not {table.logical_name} rows.",
            )
        return text.format(caller=caller)

    def _check_key_defined(self, table: Table, key: RowKey) -> None:
        """A request may name a row by an alternate key only while the tenant's table has that
        key and its index is Active (a key removed, Pending, InProgress or Failed is refused)."""
        if key.is_id(table):
            return
        keys = self.model.entity(table.logical_name).keys
        if not any(defined.status == "Active" for defined in keys):
            raise DataverseError(
                400,
                UNKNOWN_NAME,
                "The specified key attributes are not a defined key for the "
                f"{table.logical_name} entity",
            )

    def _lookup(self, table: Table, key: RowKey) -> dict | None:
        rows = self._rows[table.entity_set]
        if key.is_id(table):
            return rows.get(key.values[0])
        row_id = self._keys[table.entity_set].get(key.folded())
        return None if row_id is None else rows[row_id]

    def _find(self, table: Table, key: RowKey) -> dict:
        row = self._lookup(table, key)
        if row is None:
            raise _not_found(table, key)
        return row

    def _changes_from_body(self, table: Table, body: Mapping[str, Any]) -> dict[str, Any]:
        """A request body as column values, each valid for the tenant's model of the table (see
        `_checked_value`); binds become `_x_value` ids of rows that exist. Server-managed and
        computed columns are ignored, as Dataverse ignores them; a column the tenant's table does
        not have is an unknown property."""
        changes: dict[str, Any] = {}
        for name, value in body.items():
            if name.endswith("@odata.bind"):
                navigation = name.removesuffix("@odata.bind")
                if navigation not in table.lookups:
                    raise _unknown_property(table, navigation)
                column, target = table.lookups[navigation]
                attribute = self.model.attribute(table.logical_name, column)
                if attribute is None:
                    raise _unknown_property(table, navigation)
                if value is None and attribute.required == "SystemRequired":
                    raise _null_required(column)
                bound = None if value is None else self._bound_id(navigation, target, value)
                changes[f"_{column}_value"] = bound
            elif "@" in name:
                continue  # instance and property annotations, such as @odata.type
            elif name in table.columns:
                attribute = self.model.attribute(table.logical_name, name)
                if attribute is None:  # a column the tenant's table does not have
                    raise _unknown_property(table, name)
                changes[name] = _checked_value(table, attribute, value)
            elif name not in (table.primary_key, *table.computed, *SERVER_COLUMNS):
                raise _unknown_property(table, name)
        return changes

    def read_columns(self, table: Table) -> tuple[str, ...]:
        """The columns a read may name: the table's, less those the tenant's model lacks."""
        entity = self.model.entity(table.logical_name)
        if len(entity.attributes) == len(model.DATAVERSE_ENTITIES[table.logical_name].attributes):
            return table.read_columns
        kept = {f"_{a.logical_name}_value" if a.is_lookup else a.logical_name for a in entity.attributes}
        return tuple(column for column in table.read_columns if column in kept)

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
        return self._find(table, _id_key_of(table, match["id"].lower()))[table.primary_key]

    def _check_key_lookups(self, table: Table, key: RowKey) -> None:
        """The rows an alternate key's lookup parts name must exist (404 as for a bind)."""
        for column, value in zip(key.columns, key.values):
            if value is not None and column in table.key_lookups:
                target = TABLES[table.key_lookups[column][1]]
                self._find(target, _id_key_of(target, value))

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
        if any(column in changes for column in table.alternate_key):
            key = _row_key({**row, **changes}, table)
            holder = self._lookup(table, key) if key is not None else None
            if holder is not None and holder is not row:
                raise DataverseError(
                    412, DUPLICATE_KEY, "A record with matching key values already exists."
                )

    def _new_row(self, table: Table, row_id: str, caller: str | None = None) -> dict:
        """A row with the server's defaults, not stored yet."""
        row: dict[str, Any] = dict.fromkeys(table.read_columns)
        row[table.primary_key] = row_id
        row["createdon"] = self._now()
        if "ownerid" in table.lookups:
            row["_ownerid_value"] = caller
        if table.state_model is not None:
            row["statecode"], row["statuscode"] = 0, table.state_model.statuses[0][0]
        return row

    def _store(self, table: Table, row: dict, changes: Mapping[str, Any]) -> dict:
        """Every write of a row goes here: plugins may refuse it; it is journalled for rollback
        and gets the next version; a new row joins its table and the indexes."""
        self._check_rejections(table, row, changes)
        row_id = row[table.primary_key]
        stored = self._rows[table.entity_set].get(row_id)
        if self._journal is not None:
            self._journal.append((table, row_id, None if stored is None else dict(stored)))
        if stored is not None and stored is not row:  # a fresh row at a stored id (a user again)
            self._remove(table, stored)
            stored = None
        if stored is not None:
            self._unindex(table, row)
        row.update(changes)
        if "fullname" in table.computed and "firstname" in table.columns:  # not a user's
            names = (row["firstname"], row["lastname"])
            row["fullname"] = " ".join(name for name in names if name) or None
        self._version += 1
        row["versionnumber"] = self._version
        row["modifiedon"] = self._now()
        if stored is None:
            self._add(table, row)
        else:
            self._index(table, row)
        return row

    def _insert(self, table: Table, caller: str, values: Mapping[str, Any]) -> dict:
        """A row the server itself creates (by an action), with values already checked."""
        return self._store(table, self._new_row(table, str(uuid.uuid4()), caller), values)

    def _check_rejections(self, table: Table, row: dict, changes: Mapping[str, Any]) -> None:
        for rejection in self._rejections.get(table.entity_set, ()):
            value = changes.get(rejection.column, row[rejection.column])
            if type(value) is type(rejection.value) and value == rejection.value:
                message = "ISV code aborted the operation"
                message += f": {rejection.message}" if rejection.message else "."
                raise DataverseError(400, ISV_ABORTED, message)

    def transaction(self) -> AbstractContextManager[None]:
        """A `$batch` changeset's transaction: see `_atomic`."""
        return self._atomic()

    @contextmanager
    def _atomic(self) -> Iterator[None]:
        """A transaction: if the block raises, every row it created, updated or deleted is as it
        was, and the version, write counts and tombstones too. A block inside another joins the
        outer one."""
        if self._journal is not None:
            yield
            return
        self._journal = []
        version, writes = self._version, dict(self._writes)
        try:
            yield
        except BaseException:
            for table, row_id, previous in reversed(self._journal):
                current = self._rows[table.entity_set].get(row_id)
                if current is None:  # deleted in the block
                    self._add(table, previous)
                    tombstones = self._tombstones[table.entity_set]
                    del tombstones[bisect_right(tombstones, version, key=itemgetter(1)) :]
                elif previous is None:
                    self._remove(table, current)
                else:
                    self._unindex(table, current)
                    current.clear()
                    current.update(previous)
                    self._index(table, current)
            self._version, self._writes = version, writes
            raise
        finally:
            self._journal = None

    def _ordered(self, table: Table) -> list[dict]:
        """The table's rows in primary key order. Rows added since the last call are sorted and
        merged in; Timsort merges the two sorted runs in about linear time."""
        name = table.entity_set
        added = self._added[name]
        if added:
            key = itemgetter(table.primary_key)
            merged = chain(self._ordered_rows[name], sorted(added.values(), key=key))
            self._ordered_rows[name] = sorted(merged, key=key)
            added.clear()
        return self._ordered_rows[name]

    def _add(self, table: Table, row: dict) -> None:
        row_id = row[table.primary_key]
        self._rows[table.entity_set][row_id] = row
        self._added[table.entity_set][row_id] = row
        self._index(table, row)

    def _remove(self, table: Table, row: dict) -> None:
        name, row_id = table.entity_set, row[table.primary_key]
        del self._rows[name][row_id]
        self._unindex(table, row)
        if self._added[name].pop(row_id, None) is None:
            ordered = self._ordered_rows[name]
            del ordered[bisect_left(ordered, row_id, key=itemgetter(table.primary_key))]

    def _index(self, table: Table, row: dict) -> None:
        key = _row_key(row, table)
        if key is not None:
            self._keys[table.entity_set][key.folded()] = row[table.primary_key]
        for column, index in self._value_indexes[table.entity_set].items():
            index.add(row.get(column), row[table.primary_key])

    def _unindex(self, table: Table, row: dict) -> None:
        key = _row_key(row, table)
        index = self._keys.get(table.entity_set, {})
        if key is not None and index.get(key.folded()) == row[table.primary_key]:
            del index[key.folded()]
        for column, values in self._value_indexes[table.entity_set].items():
            values.remove(row.get(column), row[table.primary_key])

    def _value_index(self, table: Table, column: str) -> ValueIndex:
        indexes = self._value_indexes[table.entity_set]
        if column not in indexes:
            indexes[column] = ValueIndex.of(self._rows[table.entity_set], column)
        return indexes[column]

    def _now(self) -> str:
        moment = datetime.fromtimestamp(self._clock(), timezone.utc).replace(microsecond=0)
        if moment != self._stamp[0]:  # a bulk write stamps thousands of rows in the same second
            self._stamp = (moment, moment.strftime("%Y-%m-%dT%H:%M:%SZ"))
        return self._stamp[1]


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
    Without $orderby the rows are in key order: a binary search. With it, `last` is put among
    them and the lot re-sorted by the shared $orderby code."""
    key = table.primary_key
    if not orderby:
        return ordered[bisect_right(ordered, last[key], key=itemgetter(key)) :]
    others = [row for row in ordered if row[key] != last[key]]
    candidates = sorted([*others, last], key=itemgetter(key))
    sort = {"$orderby": orderby}
    resorted = apply_query(candidates, sort, Dialect.DATAVERSE, table.read_columns).rows
    position = next(index for index, row in enumerate(resorted) if row is last)
    return resorted[position + 1 :]


def _project(
    rows: list[dict], table: Table, columns: tuple[str, ...], select: str | None
) -> list[dict]:
    """$select of `columns`; the primary key and the etag always stay, as in Dataverse. Without
    $select, every column of `columns` (the tenant's table may lack some of the stored ones)."""
    options = {"$select": select} if select is not None else {}
    projected = apply_query(
        rows, options, Dialect.DATAVERSE, columns, always_selected=(table.primary_key,)
    ).rows
    if select is None and len(columns) < len(table.read_columns):
        kept = set(columns)
        projected = [
            {name: value for name, value in row.items() if name in kept or name.startswith("@")}
            for row in projected
        ]
    return projected


def _checked_value(table: Table, attribute: model.Attribute, value: Any) -> Any:
    """`value` for the column, as Dataverse validates it: of the column's type, within its
    MaxLength, one of its choice's options, not null for a SystemRequired column."""
    name, kind = attribute.logical_name, attribute.value_type
    if value is None:
        if attribute.required == "SystemRequired":
            raise _null_required(name)
        return value
    is_bool_for_int = kind is int and isinstance(value, bool)  # bool is an int in Python only
    if not isinstance(value, kind) or is_bool_for_int:
        edm = {str: "Edm.String", int: "Edm.Int32", bool: "Edm.Boolean"}[kind]
        raise DataverseError(
            400,
            INVALID_ARGUMENT,
            f"Cannot convert the literal '{value}' to the expected type '{edm}' of '{name}'.",
        )
    if attribute.max_length is not None and len(value) > attribute.max_length:
        raise DataverseError(
            400,
            STRING_TOO_LONG,
            f"A validation error occurred. The length of the '{name}' attribute of the "
            f"'{table.logical_name}' entity exceeded the maximum allowed length of "
            f"'{attribute.max_length}'.",
        )
    if attribute.type == "Picklist" and value not in {option.value for option in attribute.options}:
        accepted = ",".join(str(option.value) for option in attribute.options)
        raise DataverseError(
            400,
            OUT_OF_RANGE,
            f"A validation error occurred. The value {value} of '{name}' on record of type "
            f"'{table.logical_name}' is outside the valid range. Accepted Values: {accepted}",
        )
    return value


def _null_required(column: str) -> DataverseError:
    return DataverseError(400, INVALID_ARGUMENT, f"Attribute: {column} cannot be set to NULL")


def _copy(row: Mapping[str, Any], columns: Iterable[str]) -> dict[str, Any]:
    return {column: row[column] for column in columns}


def _with_etag(row: dict) -> dict:
    return {"@odata.etag": _etag(row), **row}


def _etag(row: Mapping[str, Any]) -> str:
    return f'W/"{row["versionnumber"]}"'


def _not_found(table: Table, key: RowKey) -> DataverseError:
    if key.is_id(table):
        message = f"{table.logical_name} With Id = {key.values[0]} Does Not Exist"
    else:
        message = (
            f"A record with the specified key values does not exist in {table.logical_name} entity"
        )
    return DataverseError(404, NOT_FOUND, message)


def _id_key(table: Table, value: Any) -> RowKey:
    """A primary key value from a request body."""
    if not isinstance(value, str) or not re.fullmatch(_GUID, value):
        raise DataverseError(
            400,
            INVALID_ARGUMENT,
            f"Cannot convert the literal '{value}' to the expected type 'Edm.Guid' of "
            f"'{table.primary_key}'.",
        )
    return _id_key_of(table, value.lower())


def _row_key(row: Mapping[str, Any], table: Table) -> RowKey | None:
    """A row's alternate key; None if the table has none or a column of it that is not a lookup
    is empty (such rows are not in the key's index: many leads may have no msdyn_prospectid).
    An empty lookup part is a value: two leads with the same msdyn_prospectid and no company
    collide."""
    if not table.alternate_key:
        return None
    values = tuple([row[column] for column in table.alternate_key])
    if None in values:
        lookups = table.key_lookups
        for column, value in zip(table.alternate_key, values):
            if value is None and column not in lookups:
                return None
    return RowKey(table.alternate_key, values)


def _key_in_body(table: Table, body: Mapping[str, Any]) -> RowKey | None:
    """The alternate key a create body gives its row (the columns, the lookups as binds), to
    tell two bulk targets for one record apart before anything is written; None if it gives
    none, or a bind the write itself will refuse."""
    values = []
    for column in table.alternate_key:
        if column in table.key_lookups:
            reference = body.get(f"{table.key_lookups[column][0]}@odata.bind")
            match = _BIND.fullmatch(reference) if isinstance(reference, str) else None
            if reference is not None and match is None:
                return None
            values.append(match["id"].lower() if match else None)
        else:
            values.append(body.get(column))
    return _row_key(dict(zip(table.alternate_key, values)), table)


def _refuse_key_in_body(table: Table, body: Mapping[str, Any]) -> None:
    """A write addressed by alternate key must not name key values in its body (a part the URL
    left out, the company of an older lead, is part of the key all the same)."""
    for column in table.alternate_key:
        navigation = table.key_lookups[column][0] if column in table.key_lookups else column
        if navigation in body or f"{navigation}@odata.bind" in body:
            raise DataverseError(
                400,
                INVALID_ARGUMENT,
                f"The alternate key column '{navigation}' is in the URL; "
                "do not repeat it in the body.",
            )


def _target_key(table: Table, index: int, target: Any, key_required: bool) -> RowKey | None:
    """The record a bulk target names, by `@odata.id` or by its primary key column. 400 if the
    target is not a record of `table` or, where `key_required`, names no record."""
    where = f"Targets[{index}]"
    if not isinstance(target, dict):
        raise DataverseError(400, INVALID_ARGUMENT, f"{where} must be a JSON object.")
    if target.get("@odata.type") not in (table.type_name, f"#{table.type_name}"):
        raise DataverseError(
            400,
            INVALID_ARGUMENT,
            f'{where} must be annotated "@odata.type": "{table.type_name}": the entity set '
            f"'{table.entity_set}' holds {table.logical_name} records.",
        )
    forms = table.key_forms
    reference, row_id = target.get("@odata.id"), target.get(table.primary_key)
    if reference is not None and row_id is not None:
        raise DataverseError(
            400,
            INVALID_ARGUMENT,
            f"{where} names its record twice: by @odata.id and by {table.primary_key}.",
        )
    if reference is not None:
        return _referenced_key(table, where, reference, forms)
    if row_id is not None:
        return _id_key(table, row_id)
    if key_required:
        raise DataverseError(
            400,
            INVALID_ARGUMENT,
            f'{where} must name its record: "@odata.id": "{forms}", or {table.primary_key}.',
        )
    return None


def _referenced_key(table: Table, where: str, reference: Any, forms: str) -> RowKey:
    """An `@odata.id`, read as the request URL is read: percent-decoded once, then the key
    literal (quotes doubled); relative to the service root, or absolute. A key value that cannot
    be used in a URL is refused as in the request URL."""
    text = unquote(reference) if isinstance(reference, str) else ""
    if text.startswith(("https://", "http://")):
        text = text.partition(API_ROOT + "/")[2]
    try:
        resource = _parse_resource_path(text.removeprefix("/"))
    except DataverseError:
        resource = None
    if resource is None or resource.table is not table or resource.key is None or resource.action:
        raise DataverseError(
            400,
            INVALID_ARGUMENT,
            f"{where}: the @odata.id '{reference}' is not a reference to a {table.logical_name} "
            f"record: {forms}.",
        )
    _check_usable_in_url(table, resource.key, f"{where}: ")
    return resource.key


def _resource_not_found(segment: str) -> DataverseError:
    return DataverseError(404, RESOURCE_NOT_FOUND, f"Resource not found for the segment '{segment}'.")


def _unknown_property(table: Table, name: str) -> DataverseError:
    return DataverseError(
        400,
        UNKNOWN_NAME,
        f"Could not find a property named '{name}' on type '{table.type_name}'.",
    )


# --- HTTP -----------------------------------------------------------------------------------------


# `<set>`, `<set>(<guid>)` or `<set>(<column>='<value>',<lookup column>=<guid>,...)` (an
# alternate key, its parts in any order), then an optional `/<action>`. A quote inside a value is
# doubled, so the literal ends at the first lone quote, and `)`, `,`, `=`, `#`, `?` or newlines
# inside it are data (some of them then refused: _URL_KEY_UNUSABLE).
_KEY_VALUE = r"'(?:[^']|'')*'|[^',()=]*"  # a quoted literal, or an unquoted one (a GUID)
_RESOURCE = re.compile(
    r"(?P<set>\w+)"
    rf"(?:\((?:(?P<id>[^'(),=]*)|(?P<key>\w+=(?:{_KEY_VALUE})(?:,\w+=(?:{_KEY_VALUE}))*))\))?"
    r"(?:/(?P<action>[\w.]+|\$count))?"
)
_KEY_PARTS = re.compile(rf"(?P<name>\w+)=(?P<value>{_KEY_VALUE})(?:,|$)")
# Characters a key value cannot hold in a URL (Power Apps, "Define alternate keys"): the web
# front end refuses them in a path before Dataverse reads the key.
_URL_KEY_UNUSABLE = re.compile(r"[/<>*%&:\\?+]")
_QUALIFY_LEAD = "Microsoft.Dynamics.CRM.QualifyLead"
_FORMATTED = "OData.Community.Display.V1.FormattedValue"
_INCLUDE_ANNOTATIONS = re.compile(r'odata\.include-annotations\s*=\s*(?:"([^"]*)"|([^,;\s]+))', re.IGNORECASE)
_COUNT = "$count"
_BULK_OPERATIONS = {  # bound to a collection; the operation each target gets
    "Microsoft.Dynamics.CRM.CreateMultiple": "create",
    "Microsoft.Dynamics.CRM.UpdateMultiple": "update",
    "Microsoft.Dynamics.CRM.UpsertMultiple": "upsert",
}


class _Resource(NamedTuple):
    table: Table
    key: RowKey | None
    action: str | None


def _parse_resource(request: Request) -> _Resource:
    resource = _parse_resource_path(_resource_path(request))
    if resource.key is not None:
        _check_usable_in_url(resource.table, resource.key)
    return resource


def _parse_resource_path(resource: str) -> _Resource:
    """A path after the service root, already percent-decoded."""
    match = _RESOURCE.fullmatch(resource)
    if match is None:
        raise DataverseError(400, BAD_QUERY, f"Bad Request - Error in query syntax: '{resource}'.")
    table = TABLES.get(match["set"])
    if table is None:
        raise _resource_not_found(match["set"])
    key = None
    if match["key"] is not None:
        key = _alternate_key(table, match["key"])
    elif match["id"] is not None:
        if not re.fullmatch(_GUID, match["id"]):
            raise DataverseError(
                400, BAD_QUERY, f"Bad Request - Error in query syntax: '{match['id']}' is not a GUID."
            )
        key = _id_key_of(table, match["id"].lower())
    return _Resource(table, key, match["action"])


def _alternate_key(table: Table, text: str) -> RowKey:
    """The key parts of a URL, `name='literal'` or `lookup=<guid>`, in any order. Every column of
    the key is named, but a lookup part may be left out: then it addresses the row whose lookup
    is empty (`leads(msdyn_prospectid='...')` is a lead without a company)."""
    given: dict[str, str] = {}
    for part in _KEY_PARTS.finditer(text):
        name, literal = part["name"], part["value"]
        if name not in table.alternate_key:
            raise DataverseError(400, BAD_QUERY, f"'{name}' is not a key of {table.logical_name}.")
        if name in given:
            raise DataverseError(400, BAD_QUERY, f"The key part '{name}' is given twice.")
        given[name] = _key_part(table, name, literal)
    for column in table.alternate_key:
        if column not in given and column not in table.key_lookups:
            raise DataverseError(
                400,
                BAD_QUERY,
                f"The key of {table.logical_name} needs {column}: {table.key_forms}.",
            )
    return RowKey(table.alternate_key, tuple(given.get(column) for column in table.alternate_key))


def _key_part(table: Table, name: str, literal: str) -> str:
    """One key part's value: a lookup's id unquoted (lowercased), any other a quoted literal."""
    if name in table.key_lookups:
        if not re.fullmatch(_GUID, literal):
            raise DataverseError(
                400,
                BAD_QUERY,
                f"Cannot convert the literal '{literal}' to the expected type 'Edm.Guid' of "
                f"'{name}'.",
            )
        return literal.lower()
    if not literal.startswith("'"):
        raise DataverseError(
            400,
            BAD_QUERY,
            f"Cannot convert the literal '{literal}' to the expected type 'Edm.String' of "
            f"'{name}': write it in single quotes.",
        )
    return unquote_string_literal(literal)


def _check_usable_in_url(table: Table, key: RowKey, where: str = "") -> None:
    """An alternate key value holding a character of _URL_KEY_UNUSABLE cannot address a row in a
    URL (it still may be stored, written by POST, found by $filter and addressed by id)."""
    if key.is_id(table):
        return
    for column, value in zip(key.columns, key.values):
        unusable = _URL_KEY_UNUSABLE.search(value) if value is not None else None
        if unusable is not None:
            raise DataverseError(
                400,
                INVALID_ARGUMENT,
                f"{where}The key value '{value}' of '{column}' holds the character "
                f"'{unusable[0]}', which cannot be used in an alternate key in a URL (none of "
                f"/ < > * % & : \\ ? + can): address the {table.logical_name} by its id, or by a "
                "key without them.",
            )


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


def _encode_cookie(cookie: Mapping[str, Any]) -> str:
    text = json.dumps(cookie, separators=(",", ":"))
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def _decode_cookie(token: str) -> dict:
    try:
        cookie = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    except ValueError:
        cookie = None
    if not isinstance(cookie, dict):
        raise _bad_cookie()
    return cookie


def _row_cookie(cookie: dict, table: Table) -> dict:
    """The last row of the previous page of a query."""
    if not isinstance(cookie.get(table.primary_key), str):
        raise _bad_cookie()
    return cookie


def _tracking_cookie(cookie: dict) -> tuple[str, dict]:
    """The delta token the last page will hand out, and where the next page of changes starts."""
    token, row_id, deleted = cookie.get("$deltatoken"), cookie.get("row"), cookie.get("deleted")
    if isinstance(token, str) and len(cookie) == 2:
        if isinstance(row_id, str):
            return token, {"row": row_id}
        if isinstance(deleted, int) and not isinstance(deleted, bool):
            return token, {"deleted": deleted}
    raise _bad_cookie()


def _bad_cookie() -> DataverseError:
    return DataverseError(400, BAD_QUERY, "The $skiptoken is not a valid paging cookie.")


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


def _changes_response(
    request: Request,
    state: DataverseState,
    table: Table,
    params: dict[str, str],
    cookie: dict | None,
    preferences: Mapping[str, str],
) -> JSONResponse:
    """A change tracking read: the first one (every row) or one through a delta link (the rows
    changed and deleted since), paged alike; the last page carries the next delta link, whose
    version is the one current when the read's first page was served."""
    refused = sorted(set(params) - {"$select", "$deltatoken"})
    if refused:
        raise DataverseError(
            400,
            BAD_QUERY,
            f"The query option {refused[0]} cannot be used with change tracking "
            "(Prefer: odata.track-changes).",
        )
    since = state.token_version(params["$deltatoken"]) if "$deltatoken" in params else None
    if cookie is None:
        next_token, cursor = state.delta_token(), None
    else:
        next_token, cursor = _tracking_cookie(cookie)
        state.token_version(next_token, check_expiry=False)
    select = params.get("$select")
    page_size = _page_size(preferences)
    page = state.changes(table, select, since, cursor, page_size or MAX_PAGE_SIZE)
    root = _service_root(request)
    context = f"{root}/$metadata#{table.entity_set}" + (f"({select})" if select else "")
    deleted_context = f"{root}/$metadata#{table.entity_set}/$deletedEntity"
    deleted = [
        {"@odata.context": deleted_context, "id": row_id, "reason": "deleted"}
        for row_id in page.deleted
    ]
    body: dict[str, Any] = {
        "@odata.context": context + ("/$delta" if since is not None else ""),
        "value": [*page.rows, *deleted],
    }
    if page.cursor is not None:
        cookie_text = _encode_cookie({"$deltatoken": next_token, **page.cursor})
        body["@odata.nextLink"] = _next_link(request, cookie_text)
    else:
        query = [f"$select={quote(select, safe=',')}"] if select else []
        query.append(f"$deltatoken={quote(next_token, safe='')}")
        body["@odata.deltaLink"] = f"{root}/{table.entity_set}?{'&'.join(query)}"
    applied = ["odata.track-changes"] if "odata.track-changes" in preferences else []
    applied += [f"odata.maxpagesize={page_size}"] if page_size else []
    headers = {"Preference-Applied": ", ".join(applied)} if applied else None
    return JSONResponse(body, headers=headers)


def _entity_id(request: Request, table: Table, row: dict, key: RowKey | None = None) -> dict[str, str]:
    """The row's URL: by the alternate key when the request addressed it by that key (as Dataverse
    answers an upsert by key), else by id. Key literals are quoted and percent-encoded."""
    if key is None or key.is_id(table):
        return {"OData-EntityId": f"{_service_root(request)}/{table.entity_set}({row[table.primary_key]})"}
    parts = [
        f"{column}={value if column in table.key_lookups else _url_literal(value)}"
        for column, value in zip(key.columns, key.values)
        if value is not None  # an empty company part is left out of the URL, as it was addressed
    ]
    return {"OData-EntityId": f"{_service_root(request)}/{table.entity_set}({','.join(parts)})"}


def _url_literal(value: str) -> str:
    """A string key value as a URL writes it: quotes doubled inside quotes, percent-encoded."""
    doubled = value.replace("'", "''")
    return f"'{quote(doubled, safe='')}'"


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


def _count_response(
    state: DataverseState, target: _Resource, params: dict[str, str], user_id: str
) -> PlainTextResponse:
    """`<set>/$count`: the number of rows (matching its $filter) as plain text. A row has no count."""
    if target.key is not None:
        raise DataverseError(
            400,
            BAD_QUERY,
            f"The request URI is not valid. $count cannot be applied to the segment "
            f"'{target.table.entity_set}' since $count can only follow an entity set, a collection "
            "navigation property, a structural property of collection type, an operation returning "
            "collection type or an operation import returning collection type.",
        )
    refused = sorted(set(params) - {"$filter"})
    if refused:
        raise DataverseError(
            400, BAD_QUERY, f"The query parameter {refused[0]} is not supported with $count."
        )
    page = state.query(target.table, {**params, "$count": "true"}, user_id, 1, None)
    return PlainTextResponse(str(page.count))


def _checked_select(request: Request, state: DataverseState, table: Table) -> str | None:
    """A write's `$select` (for `return=representation`), checked before the write: a wrong one
    refuses the request, and nothing is written."""
    select = request.query_params.get("$select")
    if select is not None:
        _project([], table, state.read_columns(table), select)
    return select


def _representation(
    request: Request,
    state: DataverseState,
    table: Table,
    row: dict,
    select: str | None,
    status: int,
    headers: dict[str, str],
) -> JSONResponse:
    """A written row as `Prefer: return=representation` answers it: projected by `$select`, with
    the annotations asked for; 201 created, 200 updated."""
    represented = state.get(table, _id_key_of(table, row[table.primary_key]), {"$select": select} if select else {})
    applied = ["return=representation"]
    annotations = _included_annotations(request)
    if annotations:
        represented = state.annotated(table, represented, annotations.wanted)
        applied.append(annotations.applied)
    context = f"{_service_root(request)}/$metadata#{table.entity_set}" + (f"({select})" if select else "")
    body = {"@odata.context": f"{context}/$entity", **represented}
    return JSONResponse(body, status_code=status, headers={**headers, **_applied(applied)})


class _Annotations(NamedTuple):
    applied: str  # the Preference-Applied value
    wanted: Callable[[str], bool]  # whether an annotation of that name is included


def _included_annotations(request: Request) -> _Annotations | None:
    """The `odata.include-annotations` preference: names or patterns (`*`, `Microsoft.Dynamics.CRM.*`),
    a leading `-` excluding; None if absent."""
    match = _INCLUDE_ANNOTATIONS.search(",".join(request.headers.getlist("prefer")))
    if match is None:
        return None
    text = match[1] if match[1] is not None else match[2]
    patterns = [pattern.strip() for pattern in text.split(",") if pattern.strip()]
    included = [pattern for pattern in patterns if not pattern.startswith("-")]
    excluded = [pattern[1:] for pattern in patterns if pattern.startswith("-")]

    def wanted(name: str) -> bool:
        return any(fnmatchcase(name, pattern) for pattern in included) and not any(
            fnmatchcase(name, pattern) for pattern in excluded
        )

    return _Annotations(f'odata.include-annotations="{text}"', wanted)


def _applied(preferences: list[str]) -> dict[str, str] | None:
    return {"Preference-Applied": ", ".join(preferences)} if preferences else None


def _etag_matches(condition: str | None, etag: str) -> bool:
    """Whether an If-None-Match names the row's current etag (or is `*`)."""
    if condition is None:
        return False
    return any(tag.strip() in ("*", etag) for tag in condition.split(","))


def _unauthorized(reason: str, challenge: str) -> DataverseError:
    return DataverseError(401, UNAUTHORIZED, f"Unauthorized: {reason}.", {"WWW-Authenticate": challenge})


def fault_response(fault: Fault, challenge: str) -> JSONResponse:
    """An injected status fault (faults.FaultInjection), answered as the Web API answers service
    protection limits, outages and refused tokens (`challenge`: the WWW-Authenticate of a 401)."""
    if fault.status == 401:
        error = _unauthorized("the bearer token was refused (a fault injected through the fakes' /_admin/faults)", challenge)
    elif fault.status == 429:
        error = DataverseError(429, REQUESTS_LIMIT, "Number of requests exceeded the limit of 6000 over time window of 300 seconds.")
    elif fault.status >= 500:
        error = DataverseError(fault.status, UNEXPECTED, "An unexpected error occurred.")
    else:
        error = DataverseError(fault.status, INVALID_ARGUMENT, "The request failed (a fault injected through the fakes' /_admin/faults).")
    body = {"error": {"code": error.code, "message": error.message}}
    headers = {**(error.headers or {}), **fault.headers(), "OData-Version": "4.0", **dataverse_request_id()}
    return JSONResponse(body, status_code=error.status, headers=headers)


def create_app(
    state: DataverseState,
    issuer: TokenIssuer,
    audience: str,
    clients: Mapping[str, ClientRegistration],
    security: TenantSecurity | None = None,
) -> FastAPI:
    """The Web API at `<audience>/api/data/v9.2`, accepting tokens whose audience is `audience`;
    `security`: who has an application user and which privileges (default: as `clients` say)."""
    security = security or TenantSecurity(clients)
    state.register_users(clients.values())
    challenge = issuer.www_authenticate(audience)
    app = FastAPI(title="Fake Dataverse Web API", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(DataverseError)
    async def dataverse_error(request: Request, error: DataverseError) -> JSONResponse:
        body = {"error": {"code": error.code, "message": error.message}}
        return JSONResponse(body, status_code=error.status, headers=error.headers)

    @app.exception_handler(ODataQueryError)
    async def query_error(request: Request, error: ODataQueryError) -> JSONResponse:
        if isinstance(error, UnknownProperty):
            error = _unknown_property(_parse_resource(request).table, error.name)
        else:
            error = DataverseError(400, BAD_QUERY, str(error))
        return await dataverse_error(request, error)

    def stamp(scope: Scope) -> dict[str, str]:
        """Count the request (a `$batch` once, not its parts); every answer names its request id
        (a batch part by `REQ_ID` only, as in Dataverse's batch answers)."""
        ids = dataverse_request_id()
        if scope.get(BATCH_PART):
            del ids["x-ms-service-request-id"]
        else:
            state.count_request()
        return {"OData-Version": "4.0", **ids}

    app.add_middleware(StampedAnswers, path_prefix=API_ROOT + "/", stamp=stamp)

    async def caller(request: Request) -> str:
        """The calling application user's systemuserid, once its security roles allow the request."""
        try:
            claims = issuer.verify(request.headers.get("authorization"), audience)
        except InvalidToken as error:
            raise _unauthorized(error.reason, challenge) from None
        if not security.has_user(DATAVERSE, claims.client_id):
            raise DataverseError(403, NOT_A_MEMBER, "The user is not a member of the organization.")
        try:
            security.require(DATAVERSE, claims.client_id, await dataverse_privileges_needed(request, state))
        except PrivilegeMissing as missing:
            message = missing_privilege_message(missing, claims.app_user_id, state.business_unit_id)
            raise DataverseError(403, PRIVILEGE_DENIED, message) from None
        return claims.app_user_id

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

    @app.get(API_ROOT + "/systemusers({user_id})/Microsoft.Dynamics.CRM.RetrieveUserPrivileges()")
    async def retrieve_user_privileges(request: Request, user_id: str, _: str = Depends(caller)) -> JSONResponse:
        client_id = next((client.client_id for client in clients.values()
                          if client.app_user_id == user_id.lower() and security.has_user(DATAVERSE, client.client_id)), None)  # fmt: skip
        if client_id is None:
            raise DataverseError(404, NOT_FOUND, f"systemuser With Id = {user_id} Does Not Exist")
        metadata = f"{_service_root(request)}/$metadata#Microsoft.Dynamics.CRM.RetrieveUserPrivilegesResponse"
        privileges = security.user_privileges(client_id, state.business_unit_id)
        return JSONResponse({"@odata.context": metadata, "RolePrivileges": privileges})

    @app.post(API_ROOT + "/WinOpportunity")
    async def win_opportunity(request: Request, user_id: str = Depends(caller)) -> Response:
        state.close_opportunity(await _json_body(request), user_id, won=True)
        return Response(status_code=204)

    @app.post(API_ROOT + "/LoseOpportunity")
    async def lose_opportunity(request: Request, user_id: str = Depends(caller)) -> Response:
        state.close_opportunity(await _json_body(request), user_id, won=False)
        return Response(status_code=204)

    @app.post(API_ROOT + "/$batch")
    async def batch(request: Request, _caller: str = Depends(caller)) -> Response:
        """One request carrying many (dataverse_batch); it needs a valid token itself."""
        try:
            return run_batch(app, request, await request.body(), API_ROOT, state.transaction)
        except BatchError as error:
            raise DataverseError(400, INVALID_ARGUMENT, str(error)) from None

    app.include_router(metadata.create_dataverse_router(API_ROOT, state.model, caller))

    # The routes below match any resource path; _parse_resource reads it from the raw path.
    @app.get(f"{API_ROOT}/{{resource:{RESOURCE_CONVERTOR}}}")
    async def read(request: Request, user_id: str = Depends(caller)) -> Response:
        target = _parse_resource(request)
        params = dict(request.query_params)
        if target.action == _COUNT:
            return _count_response(state, target, params, user_id)
        if target.action is not None:
            raise _resource_not_found(target.action)
        metadata = f"{_service_root(request)}/$metadata#{target.table.entity_set}"
        annotations = _included_annotations(request)
        applied = [annotations.applied] if annotations else []
        if target.key is not None:
            row = state.get(target.table, target.key, params)
            if _etag_matches(request.headers.get("if-none-match"), row["@odata.etag"]):
                return Response(status_code=304, headers={"ETag": row["@odata.etag"]})
            if annotations:
                row = state.annotated(target.table, row, annotations.wanted)
            return JSONResponse({"@odata.context": f"{metadata}/$entity", **row}, headers=_applied(applied))
        preferences = _preferences(request)
        token = params.pop("$skiptoken", None)
        cookie = _decode_cookie(token) if token is not None else None
        if (
            "odata.track-changes" in preferences
            or "$deltatoken" in params
            or (cookie is not None and "$deltatoken" in cookie)
        ):
            return _changes_response(request, state, target.table, params, cookie, preferences)
        page_size = _page_size(preferences)
        after = _row_cookie(cookie, target.table) if cookie is not None else None
        page = state.query(target.table, params, user_id, page_size or MAX_PAGE_SIZE, after)
        selected = params.get("$select")
        context = metadata + (f"({selected})" if selected else "")
        body: dict[str, Any] = {"@odata.context": context}
        if page.count is not None:
            body["@odata.count"] = page.count
        body["value"] = page.rows
        if annotations:
            body["value"] = [state.annotated(target.table, row, annotations.wanted) for row in page.rows]
        if page.last is not None:
            body["@odata.nextLink"] = _next_link(request, _encode_cookie(page.last))
        applied += [f"odata.maxpagesize={page_size}"] if page_size else []
        return JSONResponse(body, headers=_applied(applied))

    @app.post(f"{API_ROOT}/{{resource:{RESOURCE_CONVERTOR}}}")
    async def create_or_act(request: Request, user_id: str = Depends(caller)) -> Response:
        target = _parse_resource(request)
        operation = _BULK_OPERATIONS.get(target.action or "")
        if operation is not None and target.key is None:
            _require_writable(target.table)
            targets = (await _json_body(request)).get("Targets")
            ids = state.write_multiple(target.table, operation, targets, user_id)
            if operation != "create":  # UpdateMultiple and UpsertMultiple answer no content
                return Response(status_code=204)
            response_type = "Microsoft.Dynamics.CRM.CreateMultipleResponse"
            metadata = f"{_service_root(request)}/$metadata#{response_type}"
            return JSONResponse({"@odata.context": metadata, "Ids": ids})
        if target.action is not None:
            if target.table is not LEADS or target.key is None or target.action != _QUALIFY_LEAD:
                raise _resource_not_found(target.action)
            created = state.qualify_lead(target.key, await _json_body(request), user_id)
            metadata = f"{_service_root(request)}/$metadata#crmbaseentity"
            return JSONResponse({"@odata.context": metadata, "value": created})
        if target.key is not None:
            raise _method_not_allowed("POST")
        _require_writable(target.table)
        select = _checked_select(request, state, target.table)
        row = state.create(target.table, await _json_body(request), user_id)
        headers = _entity_id(request, target.table, row)
        if _preferences(request).get("return") != "representation":
            return Response(status_code=204, headers=headers)
        return _representation(request, state, target.table, row, select, 201, headers)

    @app.patch(f"{API_ROOT}/{{resource:{RESOURCE_CONVERTOR}}}")
    async def update(request: Request, user_id: str = Depends(caller)) -> Response:
        target = _parse_resource(request)
        if target.key is None or target.action is not None:
            raise _method_not_allowed("PATCH")
        _require_writable(target.table)
        select = _checked_select(request, state, target.table)
        existed = state.exists(target.table, target.key)
        row = state.upsert(
            target.table,
            target.key,
            await _json_body(request),
            user_id,
            request.headers.get("if-match"),
            request.headers.get("if-none-match"),
        )
        headers = _entity_id(request, target.table, row, target.key)
        if _preferences(request).get("return") != "representation":
            return Response(status_code=204, headers=headers)
        return _representation(request, state, target.table, row, select, 200 if existed else 201, headers)

    @app.delete(f"{API_ROOT}/{{resource:{RESOURCE_CONVERTOR}}}")
    async def delete(request: Request, user_id: str = Depends(caller)) -> Response:
        target = _parse_resource(request)
        if target.key is None or target.action is not None:
            raise _method_not_allowed("DELETE")
        _require_writable(target.table)
        state.delete(target.table, target.key)
        return Response(status_code=204)

    return app
