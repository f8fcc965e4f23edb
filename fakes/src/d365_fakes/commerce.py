"""Fake Commerce headquarters: the Finance and Operations OData service under `/data`.

`CommerceState` holds the four entity sets the B2B flow uses (in-memory tables), the emails HQ
sends when a prospect is approved or rejected, and request/write counts. `create_app` serves them
the way F&O does: bearer-token auth per request, companies (`dataAreaId`, `cross-company=true`),
keys in the URL, `$filter` and friends, server-driven paging and F&O's error bodies.

Facts follow CONTRACT.md, "Commerce HQ OData". Field and enum type names are those of the real
`$metadata` (`PartyType` on CustomersV3 is a string there, not an enum).
"""

from __future__ import annotations

import base64
import bisect
import contextlib
import email.message
import email.parser
import http.client
import io
import itertools
import json
import operator
import re
import threading
import uuid
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from http import HTTPStatus
from typing import Any
from urllib.parse import quote, unquote_to_bytes, urlencode, urlsplit

from fastapi import FastAPI, Request
from fastapi.responses import Response

from d365_fakes import metadata, model
from d365_fakes.clients import ClientRegistration
from d365_fakes.faults import Fault
from d365_fakes.limits import fno_activity_id
from d365_fakes.model import ENUMS, NAMESPACE
from d365_fakes.odata_query import (
    Bounds,
    Dialect,
    ODataQueryError,
    ValueIndex,
    apply_query,
    index_plan,
    lookup_limit,
    page_of,
    unquote_string_literal,
)
from d365_fakes.routing import RESOURCE_CONVERTOR, StampedAnswers, part_scope
from d365_fakes.security import COMMERCE, PrivilegeMissing, TenantSecurity, hq_privilege
from d365_fakes.tokens import InvalidToken, TokenIssuer

WRITE_EXCEPTION = "Microsoft.Dynamics.Platform.Integration.Services.OData.AxODataWriteException"
QUERY_EXCEPTION = "Microsoft.OData.ODataException"
CONTENT_TYPE = "application/json; odata.metadata=minimal; odata.streaming=true; IEEE754Compatible=false; charset=utf-8"

PARTY_TYPES = ("Organization", "Person")
APPROVED_TEMPLATE = "B2B prospect approved"
REJECTED_TEMPLATE = "B2B prospect rejected"

# The entity sets, as the table model (model.py) describes them.
EntitySet = model.EntityType
ENTITY_SETS = model.COMMERCE_ENTITY_TYPES
PROSPECTS, CUSTOMERS, HIERARCHIES, NODES = model.PROSPECTS, model.CUSTOMERS, model.HIERARCHIES, model.NODES
LEGAL_ENTITIES, CUSTOMER_GROUPS = model.LEGAL_ENTITIES, model.CUSTOMER_GROUPS


class ODataError(Exception):
    """An F&O error answer: HTTP status, the real message (innererror) and its exception type."""

    def __init__(self, status: int, message: str, inner_type: str = WRITE_EXCEPTION, outer_message: str = "An error has occurred."):
        super().__init__(message)
        self.status = status
        self.message = message
        self.inner_type = inner_type
        self.outer_message = outer_message

    def body(self) -> dict:
        return {"error": {"code": "", "message": self.outer_message,
                          "innererror": {"message": self.message, "type": self.inner_type, "stacktrace": ""}}}


class NotFound(ODataError):
    def __init__(self, url: str):
        super().__init__(
            404,
            "No routing convention was found to select an action for the OData path with template '~/entityset/key'.",
            "",
            f"No HTTP resource was found that matches the request URI '{url}'.",
        )


def _bad_request(message: str) -> ODataError:
    return ODataError(400, message)


def _bad_query(message: str) -> ODataError:
    return ODataError(400, message, QUERY_EXCEPTION)


def _key_tuple(entity: EntitySet, values: Mapping[str, Any]) -> tuple[str, ...]:
    # Keys compare case-insensitively, as under F&O's SQL collation.
    return tuple(str(values[name]).casefold() for name in entity.keys)


def _same(a: Any, b: Any) -> bool:
    return a.casefold() == b.casefold() if isinstance(a, str) and isinstance(b, str) else a == b


def _check_value(entity: EntitySet, name: str, value: Any) -> Any:
    """The value to store for `name`, or 400 naming the field."""
    kind = entity.types[name]
    if kind in ENUMS:
        if value in ENUMS[kind]:
            return value
        raise _bad_request(
            f"The value '{value}' of property '{name}' is not a member of enum type '{NAMESPACE}.{kind}' "
            f"(members: {', '.join(ENUMS[kind])})."
        )
    if kind == "string" and value is None:  # F&O strings are never null: null is stored as empty
        return ""
    if (kind == "string" and isinstance(value, str)) or (kind == "int" and type(value) is int):
        return value
    raise _bad_request(f"The value {json.dumps(value)} of property '{name}' is not a valid {kind}.")


def _check_limits(entity: EntitySet, fields: Mapping[str, Any]) -> None:
    """What F&O validates on an OData write beyond the types: each string within its field's
    length (the field's extended data type)."""
    for name, value in fields.items():
        limit = entity.by_name[name].max_length
        if isinstance(value, str) and limit is not None and len(value) > limit:
            raise _bad_request(
                f"Write failed for table row of type '{entity.type_name}'. Infolog: Error: The value of field "
                f"'{name}' is {len(value)} characters long; the field holds at most {limit} characters."
            )


def _require_mandatory(entity: EntitySet, fields: Mapping[str, Any]) -> None:
    """The mandatory fields of a new row must be filled in (F&O's infolog message); its keys are
    checked once HQ has assigned those it numbers (`_require_keys`)."""
    for prop in entity.properties:
        if prop.mandatory and not fields.get(prop.name):
            raise _bad_request(f"Field '{prop.name}' must be filled in.")


def _checked_fields(entity: EntitySet, body: Mapping[str, Any]) -> dict[str, Any]:
    """The body's fields, validated; annotations such as @odata.etag are ignored."""
    checked = {}
    for name, value in body.items():
        if name.startswith("@"):
            continue
        if name not in entity.types:
            raise ODataError(
                400,
                f"The property '{name}' does not exist on type '{NAMESPACE}.{entity.type_name}'. "
                "Make sure to only use property names that are defined by the type.",
                QUERY_EXCEPTION,
            )
        checked[name] = _check_value(entity, name, value)
    return checked


# Fields whose values HQ draws from number sequences; a value a caller chose is skipped.
# Entity set -> (field, whether its sequence is per company). Customer accounts come from a
# company-scoped sequence (each legal entity has its own C000001); party numbers belong to the
# global address book, one sequence for all companies.
_NUMBERED: dict[str, tuple[tuple[str, bool], ...]] = {
    PROSPECTS.name: (("ProspectId", False),),
    CUSTOMERS.name: (("CustomerAccount", True), ("PartyNumber", False)),
    HIERARCHIES.name: (("CustomerHierarchyId", False),),
}
# Lookups the business rules need, kept as each write lands so that a write costs O(1), not a scan:
# index name -> (entity set, the row's entry in the index or None).
_UNIQUE_INDEXES: dict[str, tuple[str, Callable[[Mapping[str, Any]], Hashable | None]]] = {
    "party": (CUSTOMERS.name, lambda row: row["PartyNumber"].casefold() or None),
    "person_email": (
        CUSTOMERS.name,
        lambda row: (row["dataAreaId"].casefold(), row["PrimaryContactEmail"].casefold())
        if row["PartyType"] == "Person" and row["PrimaryContactEmail"] else None,
    ),
    "admin": (
        NODES.name,
        lambda row: row["CustomerHierarchyId"].casefold() if row["Role"] == "Admin" and not row["VersionRemoved"] else None,
    ),
}
_Key = tuple[str, ...]


class CommerceState:
    """In-memory Commerce HQ: tables, the email outbox, counts. Safe to share between threads.

    A stored row is never changed in place (an update stores a new dict), so readers may hold rows
    without copying them; treat the rows this class hands out as read-only.
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self.model = model.CommerceModel()  # the tenant's entity sets, as $metadata serves them
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self._tables: dict[str, dict[_Key, dict[str, Any]]] = {name: {} for name in ENTITY_SETS}
            self._order: dict[str, list[_Key]] = {name: [] for name in ENTITY_SETS}  # keys, sorted
            # field -> rows holding each value: casefolded value, or (company, value) for a
            # per-company sequence
            self._taken: dict[str, dict[Hashable, int]] = {
                field: {} for fields in _NUMBERED.values() for field, _ in fields
            }
            self._indexes: dict[str, dict[Hashable, _Key]] = {name: {} for name in _UNIQUE_INDEXES}
            # entity set -> field -> its rows by value, for `$filter` lookups (each made on first use)
            self._value_indexes: dict[str, dict[str, ValueIndex]] = {name: {} for name in ENTITY_SETS}
            self._journal: dict[tuple[str, _Key], dict[str, Any] | None] | None = None
            self._outbox: list[dict[str, Any]] = []
            self._requests = 0
            self._writes = {name: 0 for name, entity in ENTITY_SETS.items() if not entity.read_only}
            self._sequences: dict[tuple[str, str], itertools.count] = {}  # (field, company or "")
            self._versions = itertools.count(1)
            self.model.reset()
            self.add_legal_entities(model.DEFAULT_LEGAL_ENTITIES)

    def add_legal_entities(self, codes: Iterable[str]) -> None:
        """A LegalEntities row per company code not there yet (the id in lower case, as F&O's
        dataAreaId), each with F&O's demo customer groups."""
        with self._lock:
            for code in codes:
                code = code.lower()
                key = (code,)
                if key in self._tables[LEGAL_ENTITIES.name]:
                    continue
                name = model.DEFAULT_LEGAL_ENTITIES.get(code, code.upper())
                self._store(LEGAL_ENTITIES, key, {"LegalEntityId": code, "Name": name, "@odata.etag": self._new_etag()})
                for group, description in model.DEMO_CUSTOMER_GROUPS:
                    row = {"dataAreaId": code, "CustomerGroupId": group, "Description": description}
                    self._store(CUSTOMER_GROUPS, _key_tuple(CUSTOMER_GROUPS, row), row | {"@odata.etag": self._new_etag()})

    @property
    def outbox(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(email) for email in self._outbox]

    def counts(self) -> dict[str, Any]:
        with self._lock:
            return {"requests": self._requests, "writes": dict(self._writes)}

    def seed_prospects(self, rows: Iterable[Mapping[str, Any]]) -> int:
        """Add prospects as the P-0001 job would (B2B, Pending unless given). All or nothing."""
        with self._lock:
            prepared: dict[_Key, dict[str, Any]] = {}
            for index, given in enumerate(rows):
                if not isinstance(given, Mapping):
                    raise ValueError(f"prospects[{index}] must be an object with Prospects fields")
                prospect_id = given.get("ProspectId")
                for required in PROSPECTS.keys:
                    if not given.get(required):
                        raise ValueError(f"prospects[{index}] (ProspectId {prospect_id!r}): {required} is required")
                row = PROSPECTS.default_row() | {"IsB2BProspect": "Yes", "B2BProspectStatus": "Pending"}
                try:
                    row.update(_checked_fields(PROSPECTS, given))
                except ODataError as error:
                    raise ValueError(f"prospects[{index}] (ProspectId {prospect_id!r}): {error.message}") from None
                row["dataAreaId"] = row["dataAreaId"].lower()
                key = _key_tuple(PROSPECTS, row)
                if key in prepared or key in self._tables[PROSPECTS.name]:
                    raise ValueError(f"prospects[{index}] (ProspectId {prospect_id!r}): ProspectId already exists in {row['dataAreaId']}")
                row["@odata.etag"] = self._new_etag()
                prepared[key] = row
            for key, row in prepared.items():
                self._store(PROSPECTS, key, row)
            self.add_legal_entities(sorted({row["dataAreaId"] for row in prepared.values()}))
            return len(prepared)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """All or nothing: the writes made inside take effect together, or, when the block raises,
        not at all (the rows, the emails queued and the write counts are put back).

        Holds the lock throughout, so no other request sees half of it. Does not nest.
        """
        with self._lock:
            if self._journal is not None:
                raise RuntimeError("a transaction is already open")
            self._journal = {}
            outbox_length, writes = len(self._outbox), dict(self._writes)
            try:
                yield
            except BaseException:
                journal, self._journal = self._journal, None
                for (name, key), row in journal.items():
                    self._store(ENTITY_SETS[name], key, row)
                del self._outbox[outbox_length:]
                self._writes = writes
                raise
            finally:
                self._journal = None

    # --- used by the OData app -------------------------------------------------------------------

    def count_request(self) -> None:
        with self._lock:
            self._requests += 1

    def tenant_entity(self, entity: EntitySet) -> EntitySet:
        """The entity set as this tenant has it (the admin surface may have removed fields)."""
        return self.model.entity_types[entity.name]

    def visible_rows(self, entity: EntitySet, company: str, cross_company: bool) -> list[dict[str, Any]]:
        """The rows the caller may see, in key order (F&O's default, stable order). Read-only.
        A company-independent set (no dataAreaId: LegalEntities) is seen from every company."""
        with self._lock:
            table = self._tables[entity.name]
            if cross_company or "dataAreaId" not in entity.types:
                rows = [table[key] for key in self._order[entity.name]]
            else:
                company = company.casefold()
                rows = [row for key in self._order[entity.name] if (row := table[key])["dataAreaId"].casefold() == company]
            return self._as_tenant_has_them(entity, rows)

    def filter_candidates(
        self, entity: EntitySet, company: str, cross_company: bool, filter_text: str
    ) -> list[dict[str, Any]] | None:
        """Of `visible_rows`, those the `$filter` may accept (it still has to run on them), found
        through value indexes rather than a scan; None when only a scan can tell."""
        with self._lock:
            tenant = self.tenant_entity(entity)

            def index(field: str) -> ValueIndex:
                return self._value_index(entity, field)

            plan = index_plan(filter_text, Dialect.FINANCE_OPERATIONS, index, fields=tenant.types,
                              enum_map=tenant.enum_map)  # fmt: skip
            if plan is None:
                return None
            table = self._tables[entity.name]
            in_range = self._keys_in_range(entity, plan.bounds)
            limit = lookup_limit(len(table))
            keys = plan.narrowest(index, limit if in_range is None else min(limit, len(in_range) - 1))
            if keys is not None:
                ordered = sorted(keys)  # `_order` is the keys sorted
            elif in_range is not None:
                ordered = in_range
            else:
                return None
            rows = [table[key] for key in ordered]
            if not cross_company and "dataAreaId" in entity.types:
                company = company.casefold()
                rows = [row for row in rows if row["dataAreaId"].casefold() == company]
            return self._as_tenant_has_them(entity, rows)

    def get(self, entity: EntitySet, key: Mapping[str, str], company: str, cross_company: bool, url: str) -> dict[str, Any]:
        """The row (read-only), or NotFound."""
        with self._lock:
            return self._as_tenant_has_them(entity, [self._find(entity, key, company, cross_company, url)])[0]

    def create(self, entity: EntitySet, body: Mapping[str, Any], company: str) -> dict[str, Any]:
        """The new row (read-only)."""
        with self._lock:
            _refuse_read_only(entity, "POST")
            tenant = self.tenant_entity(entity)
            fields = _checked_fields(tenant, body)
            _check_limits(tenant, fields)
            _require_mandatory(tenant, fields)
            row = entity.default_row() | fields
            if "dataAreaId" in entity.keys:
                row["dataAreaId"] = (row["dataAreaId"] or company).lower()
            _CREATE_RULES[entity.name](self, row, company)
            _require_keys(entity, row)
            key = _key_tuple(entity, row)
            if key in self._tables[entity.name]:
                described = ", ".join(f"{name}: {row[name]}" for name in entity.keys)
                raise _bad_request(f"Cannot create a record in {entity.table}. {described}. The record already exists.")
            row["@odata.etag"] = self._new_etag()
            self._store(entity, key, row)
            self._writes[entity.name] += 1
            return row

    def update(self, entity: EntitySet, key: Mapping[str, str], body: Mapping[str, Any], company: str,
               cross_company: bool, if_match: str | None, url: str) -> None:
        with self._lock:
            _refuse_read_only(entity, "PATCH")
            row = self._find(entity, key, company, cross_company, url)
            _check_if_match(row, if_match)
            tenant = self.tenant_entity(entity)
            changes = _checked_fields(tenant, body)
            _check_limits(tenant, changes)
            for name, value in changes.items():
                if entity.by_name[name].mandatory and not value:
                    raise _bad_request(f"Field '{name}' must be filled in.")
            for name in (*entity.keys, *entity.server_assigned, *entity.fixed):
                if name in changes and not _same(changes[name], row[name]):
                    raise _bad_request(f"The field '{name}' of {entity.name} cannot be changed.")
            rule = _UPDATE_RULES.get(entity.name)
            email = rule(self, row, changes) if rule else None
            self._store(entity, _key_tuple(entity, row), row | changes | {"@odata.etag": self._new_etag()})
            if email:
                self._outbox.append(email)
            self._writes[entity.name] += 1

    def delete(self, entity: EntitySet, key: Mapping[str, str], company: str, cross_company: bool,
               if_match: str | None, url: str) -> None:
        with self._lock:
            _refuse_read_only(entity, "DELETE")
            row = self._find(entity, key, company, cross_company, url)
            _check_if_match(row, if_match)
            self._store(entity, _key_tuple(entity, row), None)
            self._writes[entity.name] += 1

    # --- internals -------------------------------------------------------------------------------

    def _as_tenant_has_them(self, entity: EntitySet, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Rows without the fields the tenant's entity set lacks (stored rows keep every field)."""
        tenant = self.tenant_entity(entity)
        if len(tenant.properties) == len(entity.properties):
            return rows
        return [{name: value for name, value in row.items() if name in tenant.types or name.startswith("@")} for row in rows]

    def _find(self, entity: EntitySet, key: Mapping[str, str], company: str, cross_company: bool, url: str) -> dict[str, Any]:
        row = self._tables[entity.name].get(_key_tuple(entity, key))
        if row is None or not _visible(row, company, cross_company):
            raise NotFound(url)
        return row

    def _store(self, entity: EntitySet, key: _Key, row: dict[str, Any] | None) -> None:
        """The one way rows change: put `row` at `key` (None: delete), keeping the key order, the
        indexes and an open transaction's journal right."""
        table = self._tables[entity.name]
        old = table.get(key)
        if self._journal is not None:
            self._journal.setdefault((entity.name, key), old)
        if old is not None:
            self._unindex(entity, key, old)
        if row is None:
            del table[key]
            order = self._order[entity.name]
            del order[bisect.bisect_left(order, key)]
            return
        table[key] = row
        if old is None:
            bisect.insort(self._order[entity.name], key)
        for field, per_company in _NUMBERED.get(entity.name, ()):
            taken = self._taken[field]
            value = _taken_entry(row, field, per_company)
            taken[value] = taken.get(value, 0) + 1
        for name, (entity_name, entry_of) in _UNIQUE_INDEXES.items():
            if entity_name == entity.name and (entry := entry_of(row)) is not None:
                self._indexes[name][entry] = key
        for field, index in self._value_indexes[entity.name].items():
            index.add(row.get(field), key)

    def _unindex(self, entity: EntitySet, key: _Key, row: Mapping[str, Any]) -> None:
        for field, per_company in _NUMBERED.get(entity.name, ()):
            taken = self._taken[field]
            value = _taken_entry(row, field, per_company)
            taken[value] -= 1
            if not taken[value]:
                del taken[value]
        for name, (entity_name, entry_of) in _UNIQUE_INDEXES.items():
            entry = entry_of(row) if entity_name == entity.name else None
            if entry is not None and self._indexes[name].get(entry) == key:
                del self._indexes[name][entry]
        for field, index in self._value_indexes[entity.name].items():
            index.remove(row.get(field), key)

    def _keys_in_range(self, entity: EntitySet, bounds: Mapping[str, Bounds]) -> list[_Key] | None:
        """The keys, in order, whose parts lie within `bounds`: found by bisecting the sorted keys
        on the leading key parts the bounds pin to one value and on the next one; None when the
        first key part is unbounded."""
        order = self._order[entity.name]
        start, end = 0, len(order)
        narrowed = False
        for position, field in enumerate(entity.keys):
            low, high = bounds.get(field, (None, None))
            if low is None and high is None:
                break
            part = operator.itemgetter(position)  # within [start, end) the earlier parts are equal
            if low is not None:
                start = bisect.bisect_left(order, low, start, end, key=part)
            if high is not None:
                end = bisect.bisect_right(order, high, start, end, key=part)
            narrowed = True
            if low != high:
                break
        return order[start:end] if narrowed else None

    def _value_index(self, entity: EntitySet, field: str) -> ValueIndex:
        indexes = self._value_indexes[entity.name]
        if field not in indexes:
            indexes[field] = ValueIndex.of(self._tables[entity.name], field)
        return indexes[field]

    def _indexed(self, index: str, entry: Hashable) -> dict[str, Any] | None:
        key = self._indexes[index].get(entry)
        return None if key is None else self._tables[_UNIQUE_INDEXES[index][0]][key]

    def _new_etag(self) -> str:
        # Opaque to clients, like F&O's base64 of the record version.
        version = base64.b64encode(f"'1,{next(self._versions)}'".encode()).decode()
        return f'W/"{version}"'

    def _next_number(self, field: str, template: str, company: str | None = None) -> str:
        """The next free value of the field's number sequence, the company's own when `company` is
        given (values a caller chose, in that company, are skipped). A sequence only moves forward,
        so each taken value is skipped at most once: O(1) amortised."""
        scope = company.casefold() if company is not None else ""
        counter = self._sequences.setdefault((field, scope), itertools.count(1))
        taken = self._taken[field]
        while True:
            value = template.format(next(counter))
            if (value.casefold() if company is None else (scope, value.casefold())) not in taken:
                return value

    # Create rules: fill what HQ assigns, enforce the business rules, raise 400s.

    def _create_prospect(self, row: dict[str, Any], company: str) -> None:
        if not row["ProspectId"]:
            row["ProspectId"] = self._next_number("ProspectId", "P-{:06d}")

    def _create_customer(self, row: dict[str, Any], company: str) -> None:
        if not row["CustomerAccount"]:
            # Each company's sequence has its own format, as tenants set them up (demo data: US-001,
            # DE-001): the company's id, upper case, before the number.
            prefix = row["dataAreaId"].upper().replace("{", "{{").replace("}", "}}")
            row["CustomerAccount"] = self._next_number("CustomerAccount", prefix + "-{:06d}", row["dataAreaId"])
        row["PartyNumber"] = self._next_number("PartyNumber", "{:09d}")
        self._check_customer(row)

    def _create_hierarchy(self, row: dict[str, Any], company: str) -> None:
        # Created in the company the payload names, else in the caller's default company (F&O's
        # rule for any company-specific record; dataAreaId is not a key of this entity).
        row["dataAreaId"] = (row["dataAreaId"] or company).lower()
        row["CurrentVersion"] = 1
        if not row["CustomerHierarchyId"]:
            row["CustomerHierarchyId"] = self._next_number("CustomerHierarchyId", "CH-{:06d}")
        self._check_hierarchy_organization(row)

    def _create_node(self, row: dict[str, Any], company: str) -> None:
        _require_keys(NODES, row)
        hierarchy = self._tables[HIERARCHIES.name].get(_key_tuple(HIERARCHIES, row))
        if hierarchy is None:
            raise _bad_request(f"Customer hierarchy '{row['CustomerHierarchyId']}' does not exist.")
        # A node lives in its hierarchy's company; a payload naming another company is refused.
        if row["dataAreaId"] and not _same(row["dataAreaId"], hierarchy["dataAreaId"]):
            raise _bad_request(
                f"Customer hierarchy {hierarchy['CustomerHierarchyId']} belongs to company {hierarchy['dataAreaId']}; "
                f"its nodes cannot be created in company {row['dataAreaId'].lower()}."
            )
        row["dataAreaId"] = hierarchy["dataAreaId"]
        row["VersionAdded"] = hierarchy["CurrentVersion"]
        party = row["NodePartyNumber"]
        customer = self._indexed("party", party.casefold())
        if customer is None:
            raise _bad_request(f"NodePartyNumber '{party}' is not the party of a customer.")
        _check_same_company("NodePartyNumber", party, customer, hierarchy)
        self._check_single_admin(row)

    # Update rules: check the row as it would be after the PATCH; may return the email HQ sends.

    def _update_prospect(self, row: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any] | None:
        current, wanted = row["B2BProspectStatus"], changes.get("B2BProspectStatus")
        if wanted is None or current == wanted == "Pending":
            return None
        # The approval (or rejection) call: HQ's Convert > Approve / Reject, done once.
        if current != "Pending" or wanted not in ("Approved", "Rejected"):
            raise _bad_request(
                f"Prospect {row['ProspectId']} in company {row['dataAreaId']} has B2B prospect status {current}; "
                "the status can only change from Pending to Approved or Rejected."
            )
        return _decision_email(row | changes, wanted)

    def _update_customer(self, row: dict[str, Any], changes: dict[str, Any]) -> None:
        self._check_customer(row | changes)

    def _update_hierarchy(self, row: dict[str, Any], changes: dict[str, Any]) -> None:
        if "OrganizationPartyNumber" in changes:
            self._check_hierarchy_organization(row | changes)

    def _update_node(self, row: dict[str, Any], changes: dict[str, Any]) -> None:
        self._check_single_admin(row | changes)

    def _check_customer(self, row: dict[str, Any]) -> None:
        party_type = row["PartyType"]
        if party_type not in PARTY_TYPES:
            raise _bad_request(f"PartyType '{party_type}' is not valid; use Organization or Person.")
        if party_type == "Organization" and not row["OrganizationName"]:
            raise _bad_request("OrganizationName must be filled in for a customer of party type Organization.")
        if party_type == "Person" and not (row["PersonFirstName"] or row["PersonLastName"]):
            # A person's name may be a single word (a last name alone); it may not be empty.
            raise _bad_request("PersonFirstName or PersonLastName must be filled in for a customer of party type Person.")
        group = row["CustomerGroupId"]
        if group and (row["dataAreaId"].casefold(), group.casefold()) not in self._tables[CUSTOMER_GROUPS.name]:
            # F&O's foreign-key validation of CustTable.CustGroup (CONTRACT.md, "Commerce HQ OData").
            raise _bad_request(
                f"Write failed for table row of type '{CUSTOMERS.type_name}'. Infolog: Error: The value '{group}' in "
                "field 'Customer group' is not found in the relating table 'Customer groups'."
            )
        entry = _UNIQUE_INDEXES["person_email"][1](row)
        other = None if entry is None else self._indexed("person_email", entry)
        if other is not None and _key_tuple(CUSTOMERS, other) != _key_tuple(CUSTOMERS, row):
            raise _bad_request(
                f"The email address {row['PrimaryContactEmail']} is already the primary contact email of customer "
                f"{other['CustomerAccount']} in company {other['dataAreaId']}."
            )

    def _check_hierarchy_organization(self, hierarchy: dict[str, Any]) -> None:
        """The hierarchy's organization: an Organization customer of the hierarchy's company."""
        party = hierarchy["OrganizationPartyNumber"]
        customer = self._indexed("party", party.casefold())
        if customer is None or customer["PartyType"] != "Organization":
            raise _bad_request(f"OrganizationPartyNumber '{party}' is not the party of an Organization customer.")
        _check_same_company("OrganizationPartyNumber", party, customer, hierarchy)

    def _check_single_admin(self, node: dict[str, Any]) -> None:
        entry = _UNIQUE_INDEXES["admin"][1](node)
        other = None if entry is None else self._indexed("admin", entry)
        if other is not None and _key_tuple(NODES, other) != _key_tuple(NODES, node):
            raise _bad_request(
                f"Customer hierarchy {node['CustomerHierarchyId']} already has an Admin "
                f"({other['NodePartyNumber']}); a hierarchy has only one Admin."
            )


def _check_same_company(field: str, party: str, customer: Mapping[str, Any], hierarchy: Mapping[str, Any]) -> None:
    """A hierarchy holds customers of its own company only."""
    if not _same(customer["dataAreaId"], hierarchy["dataAreaId"]):
        raise _bad_request(
            f"{field} '{party}' is the party of customer {customer['CustomerAccount']} in company "
            f"{customer['dataAreaId']}, not of a customer in company {hierarchy['dataAreaId']}, the company of "
            f"customer hierarchy {hierarchy['CustomerHierarchyId']}."
        )


_CREATE_RULES = {
    PROSPECTS.name: CommerceState._create_prospect,
    CUSTOMERS.name: CommerceState._create_customer,
    HIERARCHIES.name: CommerceState._create_hierarchy,
    NODES.name: CommerceState._create_node,
}
_UPDATE_RULES = {
    PROSPECTS.name: CommerceState._update_prospect,
    CUSTOMERS.name: CommerceState._update_customer,
    HIERARCHIES.name: CommerceState._update_hierarchy,
    NODES.name: CommerceState._update_node,
}


def _taken_entry(row: Mapping[str, Any], field: str, per_company: bool) -> Hashable:
    """The row's entry in `CommerceState._taken[field]`."""
    value = row[field].casefold()
    return (row["dataAreaId"].casefold(), value) if per_company else value


def _require_keys(entity: EntitySet, row: Mapping[str, Any]) -> None:
    for name in entity.keys:
        if not row[name]:
            raise _bad_request(f"Field '{name}' must be filled in.")


def _visible(row: Mapping[str, Any], company: str, cross_company: bool) -> bool:
    return cross_company or "dataAreaId" not in row or _same(row["dataAreaId"], company)


def _refuse_read_only(entity: EntitySet, method: str) -> None:
    """Choice: the fake's read-only sets (LegalEntities, CustomerGroups) answer a write as F&O
    answers a method a resource does not support."""
    if entity.read_only:
        raise ODataError(405, f"The HTTP method {method} is not supported for this resource.", QUERY_EXCEPTION)


def _check_if_match(row: Mapping[str, Any], if_match: str | None) -> None:
    if if_match is None or if_match.strip() == "*":
        return
    if row["@odata.etag"] not in (tag.strip() for tag in if_match.split(",")):
        raise ODataError(412, "The record has been changed by another user since it was read (If-Match does not match its ETag).")


def _decision_email(prospect: Mapping[str, Any], status: str) -> dict[str, Any]:
    first_name, _, last_name = " ".join(prospect["ProspectName"].split()).partition(" ")
    fields = {"firstname": first_name, "lastname": last_name, "company": prospect["CompanyName"]}
    if status == "Approved":
        fields |= {
            "email": prospect["PrimaryEmailAddress"],
            "zipcode": prospect["AddressZipCode"],
            "comments": prospect["Note"],
            "storename": prospect["RetailChannelOperatingUnitPartyNumber"],
        }
    return {
        "template": APPROVED_TEMPLATE if status == "Approved" else REJECTED_TEMPLATE,
        "to": prospect["PrimaryEmailAddress"],
        "dataAreaId": prospect["dataAreaId"],
        "ProspectId": prospect["ProspectId"],
        "fields": fields,
        "sent_at": datetime.now(timezone.utc).isoformat(),
    }


# --- HTTP ----------------------------------------------------------------------------------------

_RESOURCE = re.compile(r"(?P<entity_set>\w+)(?:\((?P<key>.*)\))?", re.DOTALL)
_KEY_PART = re.compile(r"\s*(?:(?P<name>\w+)\s*=\s*)?(?P<value>'(?:[^']|'')*')\s*(?P<end>,|\Z)")
_MAX_PAGE_SIZE_PREFERENCE = re.compile(r"odata\.maxpagesize\s*=\s*(\d+)", re.IGNORECASE)
_KEY_SAFE = "'=,"  # left readable in Location URLs; everything else in a key is percent-encoded
_COLLECTION_ONLY_OPTIONS = ("$filter", "$orderby", "$count", "$skip", "$top")


@dataclass
class _Call:
    """What one request asks for, once authenticated."""

    request: Request
    company: str
    entity: EntitySet
    key: dict[str, str] | None

    @property
    def cross_company(self) -> bool:
        return self.request.query_params.get("cross-company", "").lower() == "true"

    @property
    def root(self) -> str:
        return str(self.request.base_url).rstrip("/") + "/data"

    def context(self, selected: tuple[str, ...] | None, suffix: str = "") -> str:
        projection = f"({','.join(selected)})" if selected else ""
        return f"{self.root}/$metadata#{self.entity.name}{projection}{suffix}"

    def entity_url(self, row: Mapping[str, Any]) -> str:
        key = ",".join(f"{name}={_string_literal(row[name])}" for name in self.entity.keys)
        return f"{self.root}/{self.entity.name}({quote(key, safe=_KEY_SAFE)})"


def _string_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _parse_key(entity: EntitySet, text: str) -> dict[str, str]:
    """`dataAreaId='usrt',ProspectId='P-1'` (the path already percent-decoded) -> field values."""
    values: dict[str, str] = {}
    position = 0
    while position < len(text):
        match = _KEY_PART.match(text, position)
        if match is None:
            raise _bad_query(f"The key '{text}' in the request URI is not valid for resource '{entity.name}'.")
        name = match["name"] or (entity.keys[0] if len(entity.keys) == 1 else None)
        if name not in entity.keys or name in values:
            raise _bad_query(f"The key '{text}' in the request URI is not valid for resource '{entity.name}'.")
        values[name] = unquote_string_literal(match["value"])
        position = match.end()
        if match["end"] == "," and position == len(text):
            raise _bad_query(f"The key '{text}' in the request URI is not valid for resource '{entity.name}'.")
    missing = [name for name in entity.keys if name not in values]
    if missing:
        raise _bad_query(
            f"The number of keys specified in the URI does not match number of key properties for the resource "
            f"'{NAMESPACE}.{entity.type_name}': {', '.join(missing)} missing."
        )
    return values


def _json_response(body: dict, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    return Response(json.dumps(body, ensure_ascii=False), status, {"OData-Version": "4.0", **(headers or {})},
                    media_type=CONTENT_TYPE)


def _page_size(request: Request, server_page_size: int) -> tuple[int, dict[str, str]]:
    """The page size for this request, and the Preference-Applied header if `Prefer` set it."""
    preference = _MAX_PAGE_SIZE_PREFERENCE.search(request.headers.get("prefer", ""))
    if preference and int(preference.group(1)) > 0:
        size = min(int(preference.group(1)), server_page_size)
        return size, {"Preference-Applied": f"odata.maxpagesize={size}"}
    return server_page_size, {}


def _read_collection(call: _Call, state: CommerceState, server_page_size: int) -> Response:
    options = dict(call.request.query_params)
    rows = None
    if "$filter" in options:
        rows = state.filter_candidates(call.entity, call.company, call.cross_company, options["$filter"])
    if rows is None:
        rows = state.visible_rows(call.entity, call.company, call.cross_company)
    # $select is applied to the page sent only, not to every matching row of a large table.
    selection = {"$select": options.pop("$select")} if "$select" in options else {}
    page_size, preference_applied = _page_size(call.request, server_page_size)
    entity = state.tenant_entity(call.entity)
    try:
        result = apply_query(rows, options, Dialect.FINANCE_OPERATIONS, entity.types, entity.enum_map)
        page, next_position = page_of(result.rows, page_size)
        projected = apply_query(page, selection, Dialect.FINANCE_OPERATIONS, entity.types, entity.enum_map)
    except ODataQueryError as error:
        raise _bad_query(str(error)) from None
    page = projected.rows
    body: dict[str, Any] = {"@odata.context": call.context(projected.selected)}
    if result.count is not None:
        body["@odata.count"] = result.count
    body["value"] = page
    if next_position is not None:
        body["@odata.nextLink"] = _next_link(call.request, result.skip + next_position,
                                             None if result.top is None else result.top - next_position)
    return _json_response(body, headers=preference_applied)


def _next_link(request: Request, skip: int, top: int | None) -> str:
    """The request's own URL with `$skip` (and `$top`, if given) moved past the rows already sent."""
    params = [(name, value) for name, value in request.query_params.multi_items() if name not in ("$skip", "$top")]
    params.append(("$skip", str(skip)))
    if top is not None:
        params.append(("$top", str(top)))
    return str(request.url.replace(query=urlencode(params, quote_via=quote, safe="$',()")))


def _read_entity(call: _Call, state: CommerceState) -> Response:
    params = call.request.query_params
    for option in _COLLECTION_ONLY_OPTIONS:
        if option in params:
            raise _bad_query(
                "The query specified in the URI is not valid. The requested resource is not a collection. Query options "
                "$filter, $orderby, $count, $skip, and $top can be applied only on collections."
            )
    row = state.get(call.entity, call.key, call.company, call.cross_company, str(call.request.url))
    entity = state.tenant_entity(call.entity)
    try:
        result = apply_query([row], params, Dialect.FINANCE_OPERATIONS, entity.types, entity.enum_map)
    except ODataQueryError as error:
        raise _bad_query(str(error)) from None
    return _json_response({"@odata.context": call.context(result.selected, "/$entity"), **result.rows[0]})


def _resource_path(request: Request) -> str:
    """What follows `/data/`, percent-decoded exactly once.

    Read from the raw path: key values may hold `/`, `%` and the like, and some servers (Starlette's
    test client among them) decode `scope["path"]` more than once.
    """
    raw_path = request.scope.get("raw_path")
    path = unquote_to_bytes(raw_path).decode("utf-8", "replace") if raw_path else request.scope["path"]
    return path.partition("/data/")[2]


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        parsed = json.loads(body or b"null")
    except (ValueError, UnicodeDecodeError):
        parsed = None
    if not isinstance(parsed, dict):
        raise _bad_query("The request body must be a JSON object with the entity's properties.")
    return parsed


_HQ_ACCESS_BY_METHOD = {"GET": "Read", "POST": "Create", "PATCH": "Update", "DELETE": "Delete"}


def _require_privilege(security: TenantSecurity, client: ClientRegistration, entity: EntitySet, method: str) -> None:
    """403 unless the app's HQ roles grant the method's access level on the data entity (Choice:
    F&O's answer shape with the access and entity named; CONTRACT.md, Security)."""
    access = _HQ_ACCESS_BY_METHOD.get(method)
    if access is None:
        return  # the dispatch answers 405
    try:
        security.require(COMMERCE, client.client_id, [hq_privilege(access, entity.name)])
    except PrivilegeMissing as missing:
        raise ODataError(
            403,
            f"Access denied: the user of application {client.client_id} has no {access} access to data entity "
            f"{entity.name} ({entity.type_name}): no security role of the user grants privilege {missing.privilege}.",
            "System.UnauthorizedAccessException",
            "Access denied.",
        ) from None


def _unauthorized(reason: str, challenge: str) -> Response:
    error = ODataError(401, reason, "System.UnauthorizedAccessException", "Authorization has been denied for this request.")
    return _json_response(error.body(), 401, {"WWW-Authenticate": challenge})


def fault_response(fault: Fault, challenge: str) -> Response:
    """An injected status fault (faults.FaultInjection), answered as F&O answers throttling,
    outages and refused tokens (`challenge`: the WWW-Authenticate of a 401)."""
    if fault.status == 401:
        return _unauthorized("The bearer token was refused (a fault injected through the fakes' /_admin/faults).", challenge)
    if fault.status == 429:
        message = "The request was throttled. Retry after the number of seconds in the Retry-After header."
    elif fault.status >= 500:
        message = "The service is temporarily unavailable. Try again later."
    else:
        message = "The request failed (a fault injected through the fakes' /_admin/faults)."
    return _json_response(ODataError(fault.status, message, "").body(), fault.status, fault.headers() | fno_activity_id())


# --- $batch ---------------------------------------------------------------------------------------

MAX_BATCH_REQUESTS = 1000
_CRLF = b"\r\n"
_CONTENT_ID_REFERENCE = re.compile(r"\$([^/?]+)")
# Header names as F&O spells them in a part (Starlette keeps them lower-case).
_HEADER_NAMES = {b"etag": b"ETag", b"odata-version": b"OData-Version", b"odata-entityid": b"OData-EntityId"}


@dataclass(frozen=True)
class _BatchItem:
    """One request of a `$batch`, as its `application/http` part wrote it."""

    method: str
    url: str  # relative to /data/, absolute, or `$<Content-ID>` of an earlier request of the changeset
    headers: tuple[tuple[str, str], ...]
    body: bytes
    content_id: str | None


_Changeset = tuple[_BatchItem, ...]


class _ChangesetFailed(Exception):
    """Raised inside a changeset's transaction to undo it; carries the answer of the failed request."""

    def __init__(self, item: _BatchItem, response: Response):
        super().__init__(item.url)
        self.item = item
        self.response = response


def _bad_batch(message: str) -> ODataError:
    return _bad_query(f"The $batch request is not valid: {message}")


def _parse_batch(content_type: str, body: bytes) -> list[_BatchItem | _Changeset]:
    """The parts of a `$batch` body, in order: single requests and changesets. 400 if malformed.

    A body in the plain shape clients write is split here directly; anything else (a malformed
    body, a refused one, or a rare but valid shape) is read by the stdlib's MIME parser, whose
    answers (and refusals) are the reference, and which costs far more per part."""
    parts = _split_batch(content_type, body)
    return _parse_batch_with_email(content_type, body) if parts is None else parts


# `multipart/mixed; boundary=<token or quoted token>` and nothing else: the one shape read without
# the stdlib (a boundary of RFC 2046's characters but for space, `<`, `>` and `=`, which the stdlib
# parameter parsing treats specially).
_BOUNDARY = r"[\w'()+,\-./:?]+"
_MULTIPART_MIXED = re.compile(
    rf'\s*multipart/mixed\s*;\s*boundary\s*=\s*(?:"({_BOUNDARY})"|({_BOUNDARY}))\s*', re.ASCII | re.IGNORECASE
)
# A header line the stdlib reads as one header: a name of printable ASCII but `:`, then the value.
_PLAIN_HEADER = re.compile(rb"[\x21-\x39\x3b-\x7e]+:[^\r\n]*")
_ENCODED_TRANSFER = ("quoted-printable", "base64", "x-uuencode", "uuencode", "uue", "x-uue")
_MAX_HEADER_LINE, _MAX_HEADERS = 65536, 100  # http.client's limits


def _split_batch(content_type: str, body: bytes) -> list[_BatchItem | _Changeset] | None:
    """What `_parse_batch_with_email` answers for `body`, when the body is in the plain shape and
    well formed; None for any other body."""
    boundary = _multipart_boundary(content_type)
    raw_parts = None if boundary is None else _split_multipart(body, boundary)
    if raw_parts is None:
        return None
    parts: list[_BatchItem | _Changeset] = []
    total = 0
    for raw in raw_parts:
        part = _split_mime_part(raw)
        if part is None:
            return None
        headers, payload = part
        part_type = _content_type_of(headers)
        if part_type == "multipart/mixed":
            if headers.get("content-transfer-encoding", "8bit").lower() not in ("7bit", "8bit", "binary"):
                return None
            inner_boundary = _multipart_boundary(headers["content-type"])
            inner_parts = None if inner_boundary is None else _split_multipart(payload, inner_boundary)
            if inner_parts is None:
                return None
            changeset = []
            for inner_raw in inner_parts:
                inner = _split_mime_part(inner_raw)
                item = None if inner is None else _http_item(*inner, in_changeset=True)
                if item is None:
                    return None
                changeset.append(item)
            content_ids = [item.content_id for item in changeset if item.content_id is not None]
            if len(set(content_ids)) != len(content_ids):
                return None
            parts.append(tuple(changeset))
            total += len(changeset)
        else:
            item = _http_item(headers, payload, in_changeset=False)
            if item is None:
                return None
            parts.append(item)
            total += 1
        if total > MAX_BATCH_REQUESTS:
            return None
    return parts


def _multipart_boundary(content_type: str) -> bytes | None:
    match = _MULTIPART_MIXED.fullmatch(content_type)
    return None if match is None else (match[1] or match[2]).encode("ascii")


def _split_multipart(body: bytes, boundary: bytes) -> list[bytes] | None:
    """The parts of a multipart body that opens with its first delimiter line, separates parts with
    CRLF-delimiter-CRLF and closes with CRLF-delimiter-`--` then nothing or a CRLF-led epilogue;
    None unless the delimiter occurs nowhere else (a line the stdlib would read differently)."""
    delimiter = b"--" + boundary
    if not body.startswith(delimiter + _CRLF):
        return None
    parts = []
    start = len(delimiter) + 2
    while True:
        end = body.find(_CRLF + delimiter, start)
        if end < 0:
            return None
        parts.append(body[start:end])
        after = end + 2 + len(delimiter)
        if body.startswith(_CRLF, after):
            start = after + 2
        elif body.startswith(b"--", after) and (len(body) == after + 2 or body.startswith(_CRLF, after + 2)):
            break
        else:
            return None
    return parts if body.count(delimiter) == len(parts) + 1 else None


def _split_mime_part(raw: bytes) -> tuple[dict[str, str], bytes] | None:
    """A part's MIME headers (names lower-cased, the first of each name) and its payload, when
    every header line is plain ASCII `Name: value`; None otherwise."""
    end = raw.find(_CRLF * 2)
    head = raw[:end]
    if end < 0 or not head.isascii():
        return None
    headers: dict[str, str] = {}
    for line in head.split(_CRLF):
        if not _PLAIN_HEADER.fullmatch(line):
            return None
        name, _, value = line.decode("ascii").partition(":")
        headers.setdefault(name.lower(), value.lstrip(" \t"))
    return headers, raw[end + 4 :]


def _content_type_of(headers: Mapping[str, str]) -> str:
    """The stdlib's `get_content_type` of a part (`text/plain` for none or a malformed one)."""
    if "content-type" not in headers:
        return "text/plain"
    content_type = headers["content-type"].partition(";")[0].strip().lower()
    return content_type if content_type.count("/") == 1 else "text/plain"


def _http_item(headers: Mapping[str, str], payload: bytes, in_changeset: bool) -> _BatchItem | None:
    """The request an `application/http` part holds, when it is well formed and allowed where it
    is; None otherwise."""
    if _content_type_of(headers) != "application/http":
        return None
    if headers.get("content-transfer-encoding", "").lower() in _ENCODED_TRANSFER:
        return None
    stream = io.BytesIO(payload)
    request_line = stream.readline()
    while request_line in (b"\r\n", b"\n"):
        request_line = stream.readline()
    words = request_line.decode("utf-8", "replace").split()
    if len(words) != 3 or not words[2].startswith("HTTP/"):
        return None
    method = words[0].upper()
    if in_changeset and method == "GET":
        return None
    request_headers = []
    while True:
        line = stream.readline(_MAX_HEADER_LINE + 1)
        if line in (b"\r\n", b"\n", b""):
            break
        if len(line) > _MAX_HEADER_LINE or len(request_headers) == _MAX_HEADERS - 1 or not line.endswith(_CRLF):
            return None
        line = line[:-2]
        if not _PLAIN_HEADER.fullmatch(line):
            return None
        name, _, value = line.decode("latin-1").partition(":")
        request_headers.append((name, value.lstrip(" \t")))
    content_id = headers.get("content-id")
    content_id = content_id.strip() if content_id else None
    return _BatchItem(method, words[1], tuple(request_headers), stream.read(), content_id)


def _parse_batch_with_email(content_type: str, body: bytes) -> list[_BatchItem | _Changeset]:
    """`_parse_batch` by the stdlib MIME parser, which notes (rather than raises) defects."""
    message = email.parser.BytesParser().parsebytes(b"Content-Type: " + content_type.encode("latin-1") + _CRLF * 2 + body)
    if message.get_content_type() != "multipart/mixed" or not message.get_boundary():
        raise _bad_batch("the Content-Type must be multipart/mixed with a boundary.")
    parts: list[_BatchItem | _Changeset] = []
    total = 0
    for part in _mime_parts(message):
        if part.get_content_type() == "multipart/mixed":
            changeset = tuple(_batch_item(inner, in_changeset=True) for inner in _mime_parts(part))
            content_ids = [item.content_id for item in changeset if item.content_id is not None]
            if len(set(content_ids)) != len(content_ids):
                raise _bad_batch("a Content-ID is used twice in one changeset.")
            parts.append(changeset)
            total += len(changeset)
        else:
            parts.append(_batch_item(part, in_changeset=False))
            total += 1
        if total > MAX_BATCH_REQUESTS:
            raise _bad_batch(f"it holds more than {MAX_BATCH_REQUESTS} requests.")
    return parts


def _mime_parts(message: email.message.Message) -> list[email.message.Message]:
    if message.defects or not message.is_multipart() or not message.get_boundary():
        raise _bad_batch(f"the multipart body is malformed ({', '.join(type(d).__name__ for d in message.defects) or 'no parts'}).")
    return message.get_payload()


def _batch_item(part: email.message.Message, in_changeset: bool) -> _BatchItem:
    """An `application/http` part: request line, headers, blank line, body."""
    if part.get_content_type() != "application/http":
        nested = in_changeset and part.get_content_type() == "multipart/mixed"
        raise _bad_batch("changesets cannot be nested." if nested else
                         f"a part has Content-Type {part.get_content_type()}; expected application/http.")
    stream = io.BytesIO(part.get_payload(decode=True) or b"")
    request_line = stream.readline()
    while request_line in (b"\r\n", b"\n"):
        request_line = stream.readline()
    words = request_line.decode("utf-8", "replace").split()
    if len(words) != 3 or not words[2].startswith("HTTP/"):
        raise _bad_batch(f"{request_line.decode('utf-8', 'replace').strip()!r} is not a request line (METHOD URL HTTP/1.1).")
    method = words[0].upper()
    if in_changeset and method == "GET":
        raise _bad_batch(f"GET {words[1]} is inside a changeset; changesets hold only POST, PATCH and DELETE requests.")
    try:
        headers = http.client.parse_headers(stream)
    except http.client.HTTPException as error:
        raise _bad_batch(f"the headers of {method} {words[1]} are malformed ({type(error).__name__}).") from None
    content_id = part.get("Content-ID")
    return _BatchItem(method, words[1], tuple(headers.items()), stream.read(), content_id.strip() if content_id else None)


def _inner_request(outer: Request, item: _BatchItem, locations: Mapping[str, str]) -> Request:
    """The request a batch part describes, as if it had come on its own (same host, its own URL,
    method and headers), so that the ordinary dispatch serves it."""
    url = item.url
    reference = _CONTENT_ID_REFERENCE.match(url)
    if reference and reference[1] in locations:
        url = locations[reference[1]] + url[reference.end():]
    target = urlsplit(url)
    if target.scheme or url.startswith("/"):
        if not target.path.startswith("/data/"):
            raise NotFound(url)
        path = target.path
    else:
        path = "/data/" + target.path
    headers = [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in item.headers]
    if not any(name == b"host" for name, _ in headers):
        headers += [(name, value) for name, value in outer.scope["headers"] if name == b"host"]
    return Request(part_scope(outer.scope, item.method, path, target.query, headers))


def _prefers_continue_on_error(prefer: str) -> bool:
    for preference in prefer.split(","):
        name, _, value = preference.partition("=")
        if name.strip().lower() in ("odata.continue-on-error", "continue-on-error"):
            return value.strip().lower() != "false"
    return False


def _http_part(response: Response, content_id: str | None) -> bytes:
    """An `application/http` part holding `response`."""
    head = [b"Content-Type: application/http", b"Content-Transfer-Encoding: binary"]
    if content_id is not None:
        head.append(b"Content-ID: " + content_id.encode("latin-1"))
    status = f"HTTP/1.1 {response.status_code} {HTTPStatus(response.status_code).phrase}".encode()
    headers = [_HEADER_NAMES.get(name, name.title()) + b": " + value for name, value in response.raw_headers]
    return _CRLF.join([*head, b"", status, *headers, b"", response.body])


def _multipart(boundary: str, parts: Iterable[bytes]) -> bytes:
    delimiter = b"--" + boundary.encode()
    return b"".join(delimiter + _CRLF + part + _CRLF for part in parts) + delimiter + b"--" + _CRLF


def _changeset_part(parts: Iterable[bytes]) -> bytes:
    boundary = f"changesetresponse_{uuid.uuid4()}"
    return f"Content-Type: multipart/mixed; boundary={boundary}".encode() + _CRLF * 2 + _multipart(boundary, parts)


def create_app(
    state: CommerceState,
    issuer: TokenIssuer,
    audience: str,
    clients: Mapping[str, ClientRegistration],
    page_size: int = 10000,
    security: TenantSecurity | None = None,
) -> FastAPI:
    """The Commerce HQ OData service; `audience` is its base URL (the token resource); `security`:
    which apps HQ knows and what their roles allow (default: as `clients` say)."""
    security = security or TenantSecurity(clients)
    app = FastAPI(title="Fake Commerce headquarters (F&O OData)", openapi_url=None, docs_url=None, redoc_url=None)
    app.add_middleware(StampedAnswers, path_prefix="/data/", stamp=lambda _scope: fno_activity_id())
    challenge = issuer.www_authenticate(audience)

    def admit(request: Request) -> ClientRegistration | Response:
        """Count the request; then a 401, or the calling app."""
        state.count_request()
        try:
            claims = issuer.verify(request.headers.get("authorization"), audience)
        except InvalidToken as error:
            return _unauthorized(error.reason, challenge)
        client = clients.get(claims.client_id)
        if client is None or not security.has_user(COMMERCE, claims.client_id):
            return _unauthorized(f"The application {claims.client_id} is not registered in Microsoft Entra applications.", challenge)
        return client

    @app.get("/data/$metadata")
    async def csdl(request: Request) -> Response:
        client = admit(request)
        return client if isinstance(client, Response) else metadata.commerce_csdl_response(state.model.entity_types)

    @app.post("/data/$batch")
    async def batch(request: Request) -> Response:
        """OData v4 `$batch`: one request (for the counts and the limits) carrying many."""
        client = admit(request)
        if isinstance(client, Response):
            return client
        try:
            parts = _parse_batch(request.headers.get("content-type", ""), await request.body())
        except ODataError as error:
            return _json_response(error.body(), error.status)
        continue_on_error = _prefers_continue_on_error(request.headers.get("prefer", ""))
        answers = []
        for part in parts:
            if isinstance(part, tuple):
                answer, failed = run_changeset(request, part, client)
            else:
                response = run(request, part, client, {})
                answer, failed = _http_part(response, part.content_id), response.status_code >= 400
            answers.append(answer)
            if failed and not continue_on_error:
                break  # OData: without continue-on-error, processing stops at the first failure
        boundary = f"batchresponse_{uuid.uuid4()}"
        headers = {"OData-Version": "4.0"}
        if continue_on_error:
            headers["Preference-Applied"] = "odata.continue-on-error"
        return Response(_multipart(boundary, answers), 200, headers, media_type=f"multipart/mixed; boundary={boundary}")

    def run_changeset(outer: Request, changeset: _Changeset, client: ClientRegistration) -> tuple[bytes, bool]:
        """All of the changeset's answers, or (undone) the answer of the request that failed."""
        answered: list[bytes] = []
        locations: dict[str, str] = {}  # Content-ID -> Location, for `$<Content-ID>` URLs
        try:
            with state.transaction():
                for item in changeset:
                    response = run(outer, item, client, locations)
                    if response.status_code >= 400:
                        raise _ChangesetFailed(item, response)
                    answered.append(_http_part(response, item.content_id))
                    if item.content_id is not None and "location" in response.headers:
                        locations[item.content_id] = response.headers["location"]
        except _ChangesetFailed as failure:
            return _http_part(failure.response, failure.item.content_id), True
        return _changeset_part(answered), False

    def run(outer: Request, item: _BatchItem, client: ClientRegistration, locations: Mapping[str, str]) -> Response:
        """A batch part, served as the same request on its own would be (same caller and company)."""
        try:
            inner = _inner_request(outer, item, locations)
            return dispatch(inner, _resource_path(inner), item.body, client)
        except ODataError as error:
            return _json_response(error.body(), error.status)

    @app.api_route(f"/data/{{resource:{RESOURCE_CONVERTOR}}}", methods=["GET", "POST", "PATCH", "DELETE"])
    async def data(request: Request) -> Response:
        client = admit(request)
        if isinstance(client, Response):
            return client
        body = await request.body()
        try:
            return dispatch(request, _resource_path(request), body, client)
        except ODataError as error:
            return _json_response(error.body(), error.status)

    def dispatch(request: Request, resource: str, body: bytes, client: ClientRegistration) -> Response:
        company = client.default_company
        match = _RESOURCE.fullmatch(resource)
        entity = ENTITY_SETS.get(match["entity_set"]) if match else None
        if entity is None:
            raise NotFound(str(request.url))
        _require_privilege(security, client, entity, request.method)
        key = _parse_key(entity, match["key"]) if match["key"] is not None else None
        call = _Call(request, company, entity, key)
        method = request.method
        if key is None and method == "GET":
            return _read_collection(call, state, page_size)
        if key is None and method == "POST":
            row = state.create(entity, _json_object(body), company)
            context = {"@odata.context": call.context(None, "/$entity")}
            return _json_response(context | row, 201, {"Location": call.entity_url(row), "ETag": row["@odata.etag"]})
        if key is not None and method == "GET":
            return _read_entity(call, state)
        if key is not None and method == "PATCH":
            state.update(entity, key, _json_object(body), company, call.cross_company,
                         request.headers.get("if-match"), str(request.url))
            return Response(status_code=204, headers={"OData-Version": "4.0"})
        if key is not None and method == "DELETE":
            state.delete(entity, key, company, call.cross_company, request.headers.get("if-match"), str(request.url))
            return Response(status_code=204, headers={"OData-Version": "4.0"})
        raise ODataError(405, f"The HTTP method {method} is not supported for this resource.", QUERY_EXCEPTION)

    return app
