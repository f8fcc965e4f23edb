"""Dry runs (DAG param `dry_run`): the steps run as they always do, reading both systems, but every
write to Commerce or Sales is planned instead of sent.

`DryRunCommerce` and `DryRunSales` are the clients with their write methods replaced: each write is
recorded in a `Plan` (system, operation, legal entity, prospect, what) and answered as the service
would answer it (a created customer gets a planned party number, a lead its derived id), so that the
steps after it plan on that answer. A write is planned only where the real one would land: a create
whose key already exists is refused, as the service refuses it, and the step adopts what exists.
Their OData client refuses any request but a read, so a write no method here plans can never go out.
The state store of a dry run is `store.DryRunStore`.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import unquote

import pandas as pd

from b2b_onboarding.clients import commerce as commerce_module
from b2b_onboarding.clients import sales as sales_module
from b2b_onboarding.clients.batch import BatchRequest, BatchResponse
from b2b_onboarding.clients.commerce import CommerceClient
from b2b_onboarding.clients.odata import ODataClient
from b2b_onboarding.clients.sales import SalesClient, lead_id_of
from b2b_onboarding.domain.prospects import prospect_key
from b2b_onboarding.store.state import PLAN_COLUMNS

COMMERCE = commerce_module.SYSTEM
SALES = sales_module.SYSTEM
# Stands in for the party number HQ would give a customer this run would create.
PLANNED_PARTY_PREFIX = "planned:"


class Plan:
    """The writes a dry run would make, in the order it would make them. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rows: list[dict] = []

    def add(self, system: str, operation: str, legal_entity: str | None, prospect_id: str | None, what: str) -> None:
        with self._lock:
            self._rows.append({"system": system, "operation": operation, "legal_entity": legal_entity,
                               "prospect_id": prospect_id, "what": what})  # fmt: skip

    def __len__(self) -> int:
        return len(self._rows)

    def frame(self) -> pd.DataFrame:
        with self._lock:
            return pd.DataFrame(self._rows, columns=list(PLAN_COLUMNS), dtype=object)


class DryRunRefused(Exception):
    """A write the dry run finds the service would refuse (its key exists already)."""


class ReadOnlyOData:
    """An OData client that sends reads and refuses everything else: the dry run's last guard."""

    def __init__(self, odata: ODataClient) -> None:
        self._odata = odata

    def request(self, method: str, url: str, **kwargs: Any) -> Any:
        if method.upper() != "GET":
            raise RuntimeError(f"dry run: {self._odata.system} {method} {url} would write; a dry run sends only reads")
        return self._odata.request(method, url, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._odata, name)

    def __enter__(self) -> ReadOnlyOData:
        self._odata.__enter__()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._odata.__exit__(*exc_info)


def _prospect_of_hierarchy(hierarchy_id: str, legal_entity: str | None) -> tuple[str | None, str]:
    """(legal entity, prospect id) a hierarchy id was derived from (`prospects.prospect_hierarchy_id`)."""
    if legal_entity and hierarchy_id.startswith(f"{legal_entity.upper()}-"):
        return legal_entity, hierarchy_id[len(legal_entity) + 1 :]
    prefix, _, prospect_id = hierarchy_id.partition("-")
    return prefix.lower(), prospect_id


_PROSPECT_KEY = re.compile(r"Prospects\(dataAreaId='(?P<le>[^']*)',ProspectId='(?P<id>[^']*)'\)")


def _prospect_of_url(url: str) -> tuple[str | None, str | None]:
    """The key of a `Prospects(...)` URL (its values percent-encoded, quotes doubled: `odata.key_segment`)."""
    found = _PROSPECT_KEY.search(url)
    if not found:
        return None, None
    return tuple(unquote(found[name]).replace("''", "'") for name in ("le", "id"))  # type: ignore[return-value]


def _customer_text(customer: dict) -> str:
    name = customer.get("OrganizationName") or " ".join(
        part for part in (customer.get("PersonFirstName"), customer.get("PersonLastName")) if part)  # fmt: skip
    email = f", {customer['PrimaryContactEmail']}" if customer.get("PrimaryContactEmail") else ""
    return f"customer {customer['dataAreaId']}/{customer['CustomerAccount']} ({customer['PartyType']}: {name}{email})"


class DryRunCommerce(CommerceClient):
    """Commerce HQ for a dry run: reads as ever, writes planned."""

    def __init__(self, real: CommerceClient, plan: Plan, legal_entity: str | None = None) -> None:
        super().__init__(ReadOnlyOData(real.odata), bulk=real.bulk, changesets_per_batch=real.changesets_per_batch,
                         max_concurrency=real.max_concurrency)  # type: ignore[arg-type]  # fmt: skip
        self.plan = plan
        self.legal_entity = legal_entity

    # --- one by one (and the parts of each changeset) -------------------------------------------------

    def create_customer(self, customer: dict, prospect: tuple[str, str] | None = None) -> dict:
        # HQ's number sequence would number a customer without an account: a stand-in names it.
        account = customer.get("CustomerAccount") or f"({customer['PartyType']} of {prospect[1] if prospect else '?'})"
        customer = {**customer, "CustomerAccount": account}
        self.plan.add(COMMERCE, f"create {customer['PartyType']} customer", customer["dataAreaId"],
                      prospect[1] if prospect else None, _customer_text(customer))  # fmt: skip
        return {**customer, "PartyNumber": PLANNED_PARTY_PREFIX + account}

    def create_hierarchy(self, hierarchy: dict) -> dict:
        legal_entity, prospect_id = _prospect_of_hierarchy(hierarchy["CustomerHierarchyId"], self.legal_entity)
        self.plan.add(COMMERCE, "create customer hierarchy", legal_entity, prospect_id,
                      f"hierarchy {hierarchy['CustomerHierarchyId']} ({hierarchy.get('Purpose')}: "
                      f"{hierarchy.get('Name')}, organization {hierarchy.get('OrganizationPartyNumber')})")  # fmt: skip
        return dict(hierarchy)

    def create_hierarchy_node(self, node: dict, prospect: tuple[str, str] | None = None) -> dict:
        legal_entity, prospect_id = prospect or _prospect_of_hierarchy(node["CustomerHierarchyId"], self.legal_entity)
        self.plan.add(COMMERCE, f"add {node['Role']} node to customer hierarchy", legal_entity, prospect_id,
                      f"party {node['NodePartyNumber']} as {node['Role']} of hierarchy {node['CustomerHierarchyId']}")  # fmt: skip
        return dict(node)

    def set_prospect_status(self, legal_entity: str, prospect_id: str, status: str, etag: str) -> None:
        verb = {"Approved": "approve", "Rejected": "reject"}.get(status, f"set status {status} of")
        self.plan.add(COMMERCE, f"{verb} prospect", legal_entity, prospect_id,
                      f"prospect {legal_entity}/{prospect_id}: Pending → {status} (HQ emails the partner)")  # fmt: skip

    # --- in changesets ---------------------------------------------------------------------------------

    def run_changesets(
        self, changesets: Sequence[Sequence[BatchRequest]], operation: str, repeatable: bool = True
    ) -> list[list[BatchResponse]]:
        """Each changeset as HQ would answer it: applied whole (its writes planned), or refused whole
        when one of its creates names a key that exists (the step then adopts it one by one)."""
        with ThreadPoolExecutor(max_workers=self.max_concurrency) as pool:
            return list(pool.map(self._changeset, changesets))

    def _changeset(self, changeset: Sequence[BatchRequest]) -> list[BatchResponse]:
        try:
            for request in changeset:
                self._check(request)
        except DryRunRefused as refused:
            return [BatchResponse(400, {"error": {"code": "", "message": f"dry run: {refused}"}}, "1")]
        return [self._answer(request, str(index)) for index, request in enumerate(changeset, start=1)]

    def _check(self, request: BatchRequest) -> None:
        entity_set, body = request.url.split("?", 1)[0].split("(", 1)[0], dict(request.body or {})
        if request.method == "POST" and entity_set == "CustomersV3":
            if body.get("CustomerAccount") and self.get_customer(body["dataAreaId"], body["CustomerAccount"]) is not None:
                raise DryRunRefused(f"customer {body['dataAreaId']}/{body['CustomerAccount']} exists")
        elif request.method == "POST" and entity_set == "CustomerHiearchies":
            if self.get_hierarchy(body["CustomerHierarchyId"]) is not None:
                raise DryRunRefused(f"hierarchy {body['CustomerHierarchyId']} exists")
        elif request.method == "POST" and entity_set == "CustomerHierarchyNodes":
            if not body["NodePartyNumber"].startswith(PLANNED_PARTY_PREFIX) and self.get_hierarchy_node(
                    body["CustomerHierarchyId"], body["NodePartyNumber"]) is not None:  # fmt: skip
                raise DryRunRefused(f"node {body['NodePartyNumber']} of hierarchy {body['CustomerHierarchyId']} exists")
        elif not (request.method == "PATCH" and entity_set == "Prospects"):
            raise RuntimeError(f"dry run: no plan for {request.method} {request.url}")

    def _answer(self, request: BatchRequest, content_id: str) -> BatchResponse:
        entity_set, body = request.url.split("?", 1)[0].split("(", 1)[0], dict(request.body or {})
        if entity_set == "CustomersV3":
            return BatchResponse(201, self.create_customer(body, request.prospect), content_id)
        if entity_set == "CustomerHiearchies":
            return BatchResponse(201, self.create_hierarchy(body), content_id)
        if entity_set == "CustomerHierarchyNodes":
            return BatchResponse(201, self.create_hierarchy_node(body, request.prospect), content_id)
        legal_entity, prospect_id = _prospect_of_url(request.url)
        self.set_prospect_status(legal_entity or "", prospect_id or "", body["B2BProspectStatus"], "")
        return BatchResponse(204, None, content_id)


class DryRunSales(SalesClient):
    """Dataverse for a dry run: reads as ever, writes planned. `legal_entity` names the prospects of
    the accounts whose numbers a task would set (a task works in one legal entity)."""

    def __init__(self, real: SalesClient, plan: Plan, legal_entity: str | None = None) -> None:
        super().__init__(ReadOnlyOData(real.odata), page_size=real.page_size, bulk=real.bulk,  # type: ignore[arg-type]
                         change_tracking=real.change_tracking, targets_per_request=real.targets_per_request,
                         max_concurrency=real.max_concurrency)  # fmt: skip
        self.plan = plan
        self.legal_entity = legal_entity

    def _plan_lead(self, legal_entity: str, prospect_id: str, lead: dict) -> str:
        name = " ".join(part for part in (lead.get("firstname"), lead.get("lastname")) if part)
        self.plan.add(SALES, "create lead", legal_entity, prospect_id,
                      f"lead {prospect_key(legal_entity, prospect_id)} ({name}, {lead.get('companyname')}, "
                      f"{lead.get('emailaddress1')}) in All Commerce B2B leads")  # fmt: skip
        return lead_id_of(legal_entity, prospect_id)

    def upsert_leads(self, legal_entity: str, leads: Sequence[tuple[str, dict]]) -> list[str]:
        return [self._plan_lead(legal_entity, prospect_id, lead) for prospect_id, lead in leads]

    def create_lead(self, legal_entity: str, prospect_id: str, lead: dict) -> tuple[str, dict | None]:
        existing = self.get_leads(legal_entity, prospect_id)
        if existing:  # the real create is refused and adopts it: no write
            return existing[0]["leadid"].lower(), existing[0]
        return self._plan_lead(legal_entity, prospect_id, lead), None

    def update_many(self, entity_set: str, id_column: str, rows: Sequence[dict]) -> None:
        for row in rows:
            if entity_set == "accounts" and "accountnumber" in row:
                self.set_account_number(row[id_column], row["accountnumber"])
            else:
                self.plan.add(SALES, f"update {entity_set}", self.legal_entity, None, f"{id_column} {row[id_column]}: "
                              + ", ".join(f"{name} = {value}" for name, value in row.items() if name != id_column))  # fmt: skip

    def set_account_number(self, account_id: str, account_number: str) -> None:
        self.plan.add(SALES, "set account number", self.legal_entity, None,
                      f"account {account_id}: accountnumber = {account_number} (the Commerce customer account)")  # fmt: skip
