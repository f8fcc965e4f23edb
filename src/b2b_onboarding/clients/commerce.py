"""Commerce headquarters (Finance and Operations OData): the operations of the onboarding flow."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlencode

import httpx

from b2b_onboarding.clients import batch
from b2b_onboarding.clients.batch import BatchRequest, BatchResponse
from b2b_onboarding.clients.odata import ODataClient, key_segment, literal, request_id_of
from b2b_onboarding.clients.settings import ServiceSettings
from b2b_onboarding.domain.tenant import TableModel, parse_commerce_model
from b2b_onboarding.errors import ConfigurationError, D365Error, via

SYSTEM = "Commerce headquarters"

PROSPECT_FIELDS = (
    "dataAreaId", "ProspectId", "ProspectName", "CompanyName", "PrimaryEmailAddress", "PrimaryPhoneNumber",
    "AddressStreet", "AddressCity", "AddressStateId", "AddressZipCode", "AddressCountryRegionISOCode",
    "CurrencyCode", "LanguageId", "Note", "RetailChannelOperatingUnitPartyNumber", "IsB2BProspect",
    "B2BProspectStatus",
)  # fmt: skip

# Every call reads and writes across legal entities; without this HQ shows only the caller's default.
_CROSS_COMPANY = {"cross-company": "true"}
# Changesets (one prospect's writes each) per `$batch` request unless the connection says otherwise.
DEFAULT_CHANGESETS_PER_BATCH = 100
# Values per `or` filter: keeps the URL far below the service's length limit.
VALUES_PER_QUERY = 40
CUSTOMER_FIELDS = ("dataAreaId", "CustomerAccount", "PartyType", "PartyNumber", "OrganizationName",
                   "PersonFirstName", "PersonLastName", "PrimaryContactEmail")  # fmt: skip
HIERARCHY_FIELDS = ("dataAreaId", "CustomerHierarchyId", "OrganizationPartyNumber", "Purpose")
NODE_FIELDS = ("dataAreaId", "CustomerHierarchyId", "NodePartyNumber", "Role", "VersionRemoved")
# HQ refuses a customer without a customer group of its legal entity (CustTable.CustGroup; "Customers
# V3 entity": CUSTOMERGROUPID "This field is required."): the Commerce connection's extra names it.
NO_CUSTOMER_GROUP = "no customer group configured: HQ requires one for every new customer"


def required_customer_group(group: str | None, connection: str | None) -> str:
    """The customer group of new customers (the Commerce connection's extra `customer_group`), or a
    ConfigurationError naming the connection to fix: without it every customer create would fail."""
    if not group:
        raise ConfigurationError(
            f"{via(SYSTEM, connection)}: {NO_CUSTOMER_GROUP}. Next step: set the connection's extra "
            '"customer_group" to a customer group of each legal entity (e.g. "10"), then clear the task.'
        )
    return group


def enum_literal(enum_name: str, member: str) -> str:
    return f"Microsoft.Dynamics.DataEntities.{enum_name}'{member}'"


def _in_url(entity_set_or_key: str) -> str:
    """A resource path with the cross-company option, as a `$batch` request line names it."""
    return f"{entity_set_or_key}?{urlencode(_CROSS_COMPANY)}"


def _refuse_wildcard(legal_entity: str) -> None:
    """In an F&O `eq` a `*` is a wildcard, and nothing escapes it: a legal entity holding one would read
    other legal entities' prospects."""
    if "*" in legal_entity:
        raise ValueError(f"legal entity {legal_entity!r}: a '*' would match other legal entities in Commerce; "
                         "fix the connection's extra legal_entities")  # fmt: skip


def batch_answers(response: httpx.Response, operation: str, connection: str | None) -> list[list[BatchResponse]]:
    """HQ's answers to a `$batch` request, per changeset; a D365Error naming the operation and the
    request when the answer cannot be read (a truncated or malformed multipart body)."""
    try:
        return batch.decode(response.headers.get("Content-Type", ""), response.content)
    except ValueError as error:
        raise D365Error(
            system=SYSTEM, operation=operation, status=response.status_code, connection=connection,
            message=f"the $batch answer was malformed: {error}",
            request_id=request_id_of(response),
        ) from error  # fmt: skip


class CommerceClient:
    def __init__(
        self, odata: ODataClient, bulk: bool = True, changesets_per_batch: int = DEFAULT_CHANGESETS_PER_BATCH,
        max_concurrency: int = 1,
    ) -> None:  # fmt: skip
        self.odata = odata
        self.bulk = bulk
        self.changesets_per_batch = changesets_per_batch
        self.max_concurrency = max_concurrency

    @classmethod
    def connect(cls, settings: ServiceSettings) -> CommerceClient:
        return cls(
            ODataClient.connect(settings, system=SYSTEM, root_path="/data"),
            bulk=settings.bulk,
            changesets_per_batch=settings.batch_size or DEFAULT_CHANGESETS_PER_BATCH,
            max_concurrency=settings.max_concurrency,
        )

    def first_prospect_answer(self) -> httpx.Response:
        """HQ's answer to a read of one prospect: 200, or 403 when the caller's roles do not grant it."""
        return self.odata.request("GET", "Prospects", operation="read Prospects", accept=frozenset({403}),
                                  params={**_CROSS_COMPANY, "$top": "1", "$select": "ProspectId"})  # fmt: skip

    def first_rows(self, entity_set: str) -> list[dict]:
        """At most one row of an entity set, of any company: whether the caller may read it."""
        return next(self.odata.iter_pages(entity_set, operation=f"read {entity_set}", params={**_CROSS_COMPANY, "$top": "1"}))

    def legal_entity(self, legal_entity: str) -> dict | None:
        """A legal entity (company) of HQ by its id, any case; None when there is none."""
        rows = next(self.odata.iter_pages("LegalEntities", operation="read legal entity",
                                          params={"$filter": f"LegalEntityId eq {literal(legal_entity)}"}))  # fmt: skip
        return next((row for row in rows if str(row.get("LegalEntityId", "")).lower() == legal_entity.lower()), None)

    def customer_group(self, legal_entity: str, group: str) -> dict | None:
        """A customer group of one legal entity; None when there is none."""
        params = {**_CROSS_COMPANY, "$filter": f"dataAreaId eq {literal(legal_entity)} and CustomerGroupId eq {literal(group)}"}
        rows = next(self.odata.iter_pages("CustomerGroups", operation="read customer group", params=params))
        return next((row for row in rows if str(row.get("CustomerGroupId", "")).lower() == group.lower()), None)

    def table_models(self) -> dict[str, TableModel]:
        """HQ's entity sets the flow uses (`tenant.COMMERCE_TABLES`), as its service document `$metadata`
        (CSDL XML) defines them: every property, its type and MaxLength, and the enums."""
        csdl = self.odata.request("GET", "$metadata", operation="read $metadata",
                                  headers={"Accept": "application/xml"}).content  # fmt: skip
        return parse_commerce_model(self.odata.system, csdl)

    def iter_prospect_pages(
        self, legal_entity: str, status: str | None = "Pending", id_range: tuple[str, str] | None = None
    ) -> Iterator[list[dict]]:
        """B2B prospects of one legal entity (of one status or all; of an id range or all), a server
        page at a time."""
        _refuse_wildcard(legal_entity)
        query = f"dataAreaId eq {literal(legal_entity)} and IsB2BProspect eq {enum_literal('NoYes', 'Yes')}"
        if status is not None:
            query += f" and B2BProspectStatus eq {enum_literal('RetailB2BProspectStatus', status)}"
        if id_range is not None:
            query += f" and ProspectId ge {literal(id_range[0])} and ProspectId le {literal(id_range[1])}"
        params = {**_CROSS_COMPANY, "$filter": query, "$select": ",".join(PROSPECT_FIELDS)}
        operation = f"read {status or 'all'} B2B prospects".replace("Pending", "pending")
        return self.odata.iter_pages("Prospects", operation=operation, params=params)

    def pending_prospect_versions(self, legal_entities: Sequence[str]) -> Iterator[list[dict]]:
        """The keys and `@odata.etag` of the Pending B2B prospects of these legal entities: one
        cross-company, keys-only request (more only when they fill more than one server page), a page
        of rows (`dataAreaId`, `ProspectId`, `@odata.etag`) at a time."""
        if not legal_entities:
            return iter(())
        for legal_entity in legal_entities:
            _refuse_wildcard(legal_entity)
        companies = " or ".join(f"dataAreaId eq {literal(legal_entity)}" for legal_entity in legal_entities)
        query = (f"({companies}) and IsB2BProspect eq {enum_literal('NoYes', 'Yes')} and "
                 f"B2BProspectStatus eq {enum_literal('RetailB2BProspectStatus', 'Pending')}")  # fmt: skip
        params = {**_CROSS_COMPANY, "$filter": query, "$select": "dataAreaId,ProspectId"}
        return self.odata.iter_pages("Prospects", operation="read versions of pending B2B prospects", params=params)

    def run_changesets(
        self, changesets: Sequence[Sequence[BatchRequest]], operation: str, repeatable: bool = True
    ) -> list[list[BatchResponse]]:
        """Sends changesets in `$batch` requests (several at once, up to the client's concurrency);
        every changeset is answered, applied whole or not at all. `repeatable`: every create in them
        names its key, so a repeat is refused as a duplicate (a create numbered by HQ is not)."""
        groups = [changesets[start : start + self.changesets_per_batch]
                  for start in range(0, len(changesets), self.changesets_per_batch)]  # fmt: skip

        def send(group: Sequence[Sequence[BatchRequest]]) -> list[list[BatchResponse]]:
            content_type, body = batch.encode(group)
            response = self.odata.request(
                "POST", "$batch", operation=operation, content=body,
                headers={"Content-Type": content_type, "Prefer": "odata.continue-on-error"},
                repeatable=repeatable,  # keyed creates are refused when repeated; updates carry If-Match
            )  # fmt: skip
            answers = batch_answers(response, operation, self.odata.connection)
            if len(answers) != len(group):
                raise D365Error(
                    system=SYSTEM, operation=operation, status=response.status_code,
                    message=f"$batch answered {len(answers)} of {len(group)} changesets", connection=self.odata.connection,
                    request_id=request_id_of(response),
                )  # fmt: skip
            return answers

        with ThreadPoolExecutor(max_workers=self.max_concurrency) as pool:
            return [answer for answers in pool.map(send, groups) for answer in answers]

    @staticmethod
    def create_request(entity_set: str, row: dict, prospect: tuple[str, str] | None = None) -> BatchRequest:
        return BatchRequest("POST", _in_url(entity_set), row, prospect=prospect)

    def rows_where(
        self, entity_set: str, field: str, values: Iterable[str], select: Sequence[str], legal_entity: str | None = None
    ) -> list[dict]:
        """Rows of any company (or of one) whose `field` equals one of `values` (as HQ compares:
        case-insensitively), a bounded `or` filter a request. A `*` is a wildcard in HQ's `eq` and
        nothing escapes it, so rows are matched again here, exactly but for case."""
        unique = sorted({value for value in values if value})
        wanted = {value.casefold() for value in unique}
        parts = [unique[start : start + VALUES_PER_QUERY] for start in range(0, len(unique), VALUES_PER_QUERY)]

        def read(part: Sequence[str]) -> list[dict]:
            query = "(" + " or ".join(f"{field} eq {literal(value)}" for value in part) + ")"
            if legal_entity is not None:
                query = f"dataAreaId eq {literal(legal_entity)} and {query}"
            params = {**_CROSS_COMPANY, "$filter": query, "$select": ",".join(select)}
            return [row for page in self.odata.iter_pages(entity_set, operation=f"read {entity_set} by {field}",
                                                          params=params) for row in page
                    if str(row.get(field) or "").casefold() in wanted]  # fmt: skip

        with ThreadPoolExecutor(max_workers=self.max_concurrency) as pool:
            return [row for rows in pool.map(read, parts) for row in rows]

    @staticmethod
    def status_request(legal_entity: str, prospect_id: str, status: str, etag: str) -> BatchRequest:
        """The approval or rejection of a prospect, guarded by the ETag it was read with."""
        key = key_segment("Prospects", dataAreaId=legal_entity, ProspectId=prospect_id)
        return BatchRequest("PATCH", _in_url(key), {"B2BProspectStatus": status}, {"If-Match": etag})

    def get_prospect(self, legal_entity: str, prospect_id: str) -> dict | None:
        return self.odata.get(
            key_segment("Prospects", dataAreaId=legal_entity, ProspectId=prospect_id),
            operation="read prospect",
            record=f"prospect {legal_entity}/{prospect_id}",
            params=_CROSS_COMPANY,
        )

    def set_prospect_status(self, legal_entity: str, prospect_id: str, status: str, etag: str) -> None:
        """Approve or reject; HQ sends the email. The ETag makes a concurrent change fail with 412."""
        self.odata.request(
            "PATCH",
            key_segment("Prospects", dataAreaId=legal_entity, ProspectId=prospect_id),
            operation=f"set prospect status to {status}",
            record=f"prospect {legal_entity}/{prospect_id}",
            params=_CROSS_COMPANY,
            json={"B2BProspectStatus": status},
            headers={"If-Match": etag},
        )

    def get_customer(self, legal_entity: str, customer_account: str) -> dict | None:
        return self.odata.get(
            key_segment("CustomersV3", dataAreaId=legal_entity, CustomerAccount=customer_account),
            operation="read customer",
            record=f"customer {legal_entity}/{customer_account}",
            params=_CROSS_COMPANY,
        )

    def create_customer(self, customer: dict, prospect: tuple[str, str] | None = None) -> dict:
        named = f"customer {customer['dataAreaId']}/{customer['CustomerAccount']}" if customer.get("CustomerAccount") else (
            f"{customer['PartyType']} customer of prospect {prospect[0]}/{prospect[1]}" if prospect else "customer")  # fmt: skip
        return self.odata.request(
            "POST",
            "CustomersV3",
            operation=f"create {customer['PartyType']} customer",
            record=named,
            params=_CROSS_COMPANY,
            json=customer,
            # A templated account is refused when repeated, and adopted; a numbered one is sent once.
            repeatable=bool(customer.get("CustomerAccount")),
        ).json()

    def get_hierarchy(self, hierarchy_id: str) -> dict | None:
        return self.odata.get(
            key_segment("CustomerHiearchies", CustomerHierarchyId=hierarchy_id),
            operation="read customer hierarchy",
            record=f"hierarchy {hierarchy_id}",
            params=_CROSS_COMPANY,
        )

    def create_hierarchy(self, hierarchy: dict) -> dict:
        return self.odata.request(
            "POST",
            "CustomerHiearchies",
            operation="create customer hierarchy",
            record=f"hierarchy {hierarchy['CustomerHierarchyId']}",
            params=_CROSS_COMPANY,
            json=hierarchy,
            repeatable=True,  # a derived key: a repeat is refused as a duplicate, and adopted
        ).json()

    def get_hierarchy_node(self, hierarchy_id: str, party_number: str) -> dict | None:
        return self.odata.get(
            key_segment("CustomerHierarchyNodes", CustomerHierarchyId=hierarchy_id, NodePartyNumber=party_number),
            operation="read customer hierarchy node",
            record=f"hierarchy {hierarchy_id} party {party_number}",
            params=_CROSS_COMPANY,
        )

    def create_hierarchy_node(self, node: dict) -> dict:
        return self.odata.request(
            "POST",
            "CustomerHierarchyNodes",
            operation=f"add {node['Role']} node to customer hierarchy",
            record=f"hierarchy {node['CustomerHierarchyId']} party {node['NodePartyNumber']}",
            params=_CROSS_COMPANY,
            json=node,
            repeatable=True,  # a derived key: a repeat is refused as a duplicate, and adopted
        ).json()
