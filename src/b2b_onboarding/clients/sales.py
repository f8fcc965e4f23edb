"""Dynamics 365 Sales (Dataverse Web API): the operations of the onboarding flow."""

from __future__ import annotations

import itertools
import threading
import uuid
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from b2b_onboarding.clients.odata import ODataClient, literal
from b2b_onboarding.clients.settings import ServiceSettings
from b2b_onboarding.domain.prospects import MAPPED_LEAD_COLUMNS, key_fold, prospect_key
from b2b_onboarding.domain.tenant import TableModel, parse_lead_model
from b2b_onboarding.errors import ConfigurationError, D365Error

SYSTEM = "Dataverse (Sales)"
WEB_API_HEADERS = {"OData-Version": "4.0", "OData-MaxVersion": "4.0"}

LEAD_OUTCOME_COLUMNS = (
    "leadid", "msdyn_prospectid", "statecode", "statuscode",
    "_qualifyingopportunityid_value", "_parentaccountid_value", "_parentcontactid_value",
)  # fmt: skip
# What the sync reads of a lead that may already exist: its key, tag, state and mapped columns.
EXISTING_LEAD_COLUMNS = (*LEAD_OUTCOME_COLUMNS, "_msdyn_company_value", "msdyn_b2bcommerceprospect",
                         *MAPPED_LEAD_COLUMNS)  # fmt: skip
OPPORTUNITY_COLUMNS = ("opportunityid", "statecode", "statuscode", "_originatingleadid_value")
ACCOUNT_COLUMNS = ("accountid", "name", "accountnumber", "emailaddress1")
CONTACT_COLUMNS = ("contactid", "firstname", "lastname", "emailaddress1")

# Dataverse's answer to a delta link older than the organization keeps change history for.
EXPIRED_DELTA_TOKEN = "0x80044352"
# Dataverse's answer to a create whose alternate key values another row already holds.
DUPLICATE_KEY = "0x80040237"
DRIFT_LEAD_COLUMNS = ("leadid", "msdyn_prospectid", "_msdyn_company_value", "statecode", "msdyn_b2bprospectstatus")

# Ids per `or` filter: keeps the URL far below the service's length limit.
IDS_PER_QUERY = 100
# Targets per UpsertMultiple/UpdateMultiple unless the connection says otherwise (Microsoft: start near 1,000).
DEFAULT_TARGETS_PER_REQUEST = 1000
_TYPES = {"leads": "lead", "accounts": "account", "opportunities": "opportunity", "contacts": "contact"}


@dataclass
class ChangeFeed:
    """Rows changed since a delta link (all rows when there is none), page by page; once consumed,
    `delta_link` holds the link for the next read and `deleted` the ids of rows deleted since."""

    pages: Iterator[list[dict]]
    delta_link: str | None = None
    deleted: list[str] = field(default_factory=list)
    expired: bool = False


# Namespace of the lead ids this integration derives from prospect keys.
_LEAD_IDS = uuid.UUID("5d0c6a9e-3f8b-4f6e-9a43-7b2f0e1c8d54")


def _guid(entity_set: str, value: object) -> str:
    try:
        return str(uuid.UUID(str(value)))
    except ValueError:
        raise ValueError(f"{entity_set}: {value!r} is not a GUID, so it cannot be read by id") from None


def lead_id_of(legal_entity: str, prospect_id: str) -> str:
    """The lead id of a prospect, the same on every run and every worker (and as earlier versions
    derived it, so that their leads are the same rows)."""
    return str(uuid.uuid5(_LEAD_IDS, prospect_key(legal_entity, prospect_id)))


def lead_prospect(lead: dict, company_codes: dict[str, str]) -> tuple[str, str] | None:
    """The (legal entity, prospect id) a lead's key names, folded as Dataverse compares keys: the
    composite key (`msdyn_prospectid` and the `msdyn_company` of dual-write's company-specific tables),
    or the `<legal entity>:<prospect id>` that earlier versions wrote without a company. None when
    the lead names no prospect. `company_codes`: cdm_companyid → company code."""
    prospect_id = lead.get("msdyn_prospectid")
    if not isinstance(prospect_id, str) or not prospect_id:
        return None
    company = lead.get("_msdyn_company_value")
    if isinstance(company, str) and company:  # a frame's missing value is NaN, not None
        code = company_codes.get(company.lower())
        return (key_fold(code), key_fold(prospect_id)) if code else None
    legal_entity, separator, bare = prospect_id.partition(":")
    return (key_fold(legal_entity), key_fold(bare)) if separator and bare else None


class SalesClient:
    def __init__(
        self, odata: ODataClient, page_size: int = 5000, bulk: bool = True, change_tracking: bool = True,
        targets_per_request: int = DEFAULT_TARGETS_PER_REQUEST, max_concurrency: int = 1,
    ) -> None:  # fmt: skip
        self.odata = odata
        self.page_size = page_size
        self.bulk = bulk
        self.change_tracking = change_tracking
        self.targets_per_request = targets_per_request
        self.max_concurrency = max_concurrency
        self._paging = {"Prefer": f"odata.maxpagesize={page_size}"}
        self._companies: dict[str, str] | None = None
        self._companies_lock = threading.Lock()  # the threads of one bulk write ask at once: one read

    @classmethod
    def connect(cls, settings: ServiceSettings) -> SalesClient:
        odata = ODataClient.connect(settings, system=SYSTEM, root_path="/api/data/v9.2", headers=WEB_API_HEADERS)
        return cls(
            odata, page_size=settings.page_size, bulk=settings.bulk, change_tracking=settings.change_tracking,
            targets_per_request=settings.batch_size or DEFAULT_TARGETS_PER_REQUEST,
            max_concurrency=settings.max_concurrency,
        )  # fmt: skip

    def whoami(self) -> dict:
        return self.odata.get("WhoAmI", operation="WhoAmI")

    def lead_model(self) -> TableModel:
        """The lead table as the tenant defines it, from three EntityDefinitions requests: its columns
        (type, required level) and alternate keys (with their index status), its text columns'
        MaxLength, its choices' options."""
        definition = f"EntityDefinitions(LogicalName={literal('lead')})"
        operation, record = "read table definition (EntityDefinitions)", "table lead"

        def read(path: str, params: dict) -> dict:
            return self.odata.request("GET", path, operation=operation, record=record, params=params).json()

        return parse_lead_model(
            self.odata.system,
            read(definition, {"$select": "LogicalName,EntitySetName,PrimaryIdAttribute,MetadataId",
                              "$expand": "Attributes($select=LogicalName,AttributeType,RequiredLevel),"
                                         "Keys($select=LogicalName,KeyAttributes,EntityKeyIndexStatus)"}),
            read(f"{definition}/Attributes/Microsoft.Dynamics.CRM.StringAttributeMetadata",
                 {"$select": "LogicalName,MaxLength"}),
            read(f"{definition}/Attributes/Microsoft.Dynamics.CRM.PicklistAttributeMetadata",
                 {"$select": "LogicalName", "$expand": "OptionSet($select=Options)"}),
        )  # fmt: skip

    def system_user(self, user_id: str) -> dict | None:
        """A systemuser's name, application id (an application user's app registration) and whether
        it is disabled; None when there is none."""
        return self.odata.get(f"systemusers({_guid('systemusers', user_id)})", operation="read application user",
                              record=f"systemuser {user_id}", params={"$select": "fullname,applicationid,isdisabled"})  # fmt: skip

    def user_privileges(self, user_id: str) -> list[str]:
        """The names of the privileges a user's security roles give it (RetrieveUserPrivileges)."""
        body = self.odata.get(f"systemusers({_guid('systemusers', user_id)})/Microsoft.Dynamics.CRM.RetrieveUserPrivileges()",
                              operation="read privileges", record=f"systemuser {user_id}") or {}  # fmt: skip
        return [str(row["PrivilegeName"]) for row in body.get("RolePrivileges", [])]

    def saved_views(self, name: str, table: str) -> list[dict]:
        """The system views (savedqueries) of a table with this name."""
        params = {"$filter": f"name eq {literal(name)} and returnedtypecode eq {literal(table)}",
                  "$select": "savedqueryid,name"}  # fmt: skip
        return [row for page in self.odata.iter_pages("savedqueries", operation="read views", params=params) for row in page]

    def company_codes(self) -> dict[str, str]:
        """cdm_companyid → company code (lowercase) of every legal entity dual-write's "Legal entities
        (cdm_companies)" map holds in Dataverse; read once per client, whatever its threads."""
        with self._companies_lock:
            if self._companies is None:
                params = {"$select": "cdm_companyid,cdm_companycode"}
                self._companies = {
                    str(row["cdm_companyid"]).lower(): str(row["cdm_companycode"]).lower()
                    for page in self.odata.iter_pages("cdm_companies", operation="read legal entities (cdm_companies)",
                                                      params=params, headers=self._paging)  # fmt: skip
                    for row in page if row.get("cdm_companycode")
                }
            return self._companies

    def company_id(self, legal_entity: str) -> str:
        """The cdm_companyid of a legal entity: the company part of a lead's key."""
        for company_id, code in self.company_codes().items():
            if code == legal_entity.lower():
                return company_id
        raise ConfigurationError(
            f"{SYSTEM}: legal entity {legal_entity!r} has no row in cdm_companies, so its leads cannot be keyed by "
            "company. Next step: add the legal entity to Dataverse (dual-write's \"Legal entities (cdm_companies)\" "
            "map, or a cdm_company row with that company code), or remove it from the connection's legal_entities."
        )

    def _keyed(self, legal_entity: str, prospect_id: str, lead: dict) -> dict:
        """A lead's body with its key: the prospect id and the company, as dual-write keys a
        company-specific table (so that dual-write's leads and ours are the same kind of row)."""
        return {"msdyn_prospectid": prospect_id,
                "msdyn_company@odata.bind": f"/cdm_companies({self.company_id(legal_entity)})", **lead}  # fmt: skip

    def create_lead(self, legal_entity: str, prospect_id: str, lead: dict) -> tuple[str, dict | None]:
        """Creates the lead of a prospect unless one exists; returns (leadid, None) for a lead created,
        (leadid, the lead as read) for one that existed.

        Created at the lead id derived from the prospect (as `upsert_leads` does) and sent create-only
        (`If-None-Match: *`): a lead that exists, at that id or under that key, is refused and adopted
        as it is, never overwritten. The key never goes in the URL: Dataverse cannot address an
        alternate key whose value holds `:`, `/`, `%`, `?`... in a URL."""
        record = f"lead of prospect {legal_entity}/{prospect_id}"
        lead_id = lead_id_of(legal_entity, prospect_id)
        try:
            response = self.odata.request(
                "PATCH", f"leads({lead_id})", operation="create lead", record=record,
                json=self._keyed(legal_entity, prospect_id, lead), headers={"If-None-Match": "*"},
                accept=frozenset({412}),
            )  # fmt: skip
        except D365Error as error:
            if error.code != DUPLICATE_KEY:
                raise
        else:
            if response.status_code != 412:
                return lead_id, None
        existing = self.get_leads(legal_entity, prospect_id)
        if len(existing) != 1:  # deleted between the two calls, or ambiguous: the next run judges again
            raise D365Error(
                system=SYSTEM, operation="create lead", status=412, code=DUPLICATE_KEY, record=record,
                message=f"a lead with this key exists, but {len(existing)} leads were found for it",
                connection=self.odata.connection,
            )  # fmt: skip
        return existing[0]["leadid"].lower(), existing[0]

    def get_leads(self, legal_entity: str, prospect_id: str) -> list[dict]:
        """The leads of one prospect, under either form of key (`lead_prospect`)."""
        keyed = (f"(msdyn_prospectid eq {literal(prospect_id)} and _msdyn_company_value eq "
                 f"{self.company_id(legal_entity)}) or msdyn_prospectid eq {literal(prospect_key(legal_entity, prospect_id))}")  # fmt: skip
        params = {"$filter": keyed, "$select": ",".join(EXISTING_LEAD_COLUMNS)}
        wanted = (key_fold(legal_entity), key_fold(prospect_id))
        return [row for page in self.odata.iter_pages("leads", operation="read lead", params=params) for row in page
                if lead_prospect(row, self.company_codes()) == wanted]  # fmt: skip

    def upsert_leads(self, legal_entity: str, leads: Sequence[tuple[str, dict]]) -> list[str]:
        """One UpsertMultiple of (prospect id, lead) pairs of a legal entity, all or nothing; the lead
        ids, in order.

        UpsertMultiple answers 204 with no ids, so each lead's id is derived from its prospect
        (`lead_id_of`): a retried or overlapping upsert names the same row, never a second one."""
        targets = [{"@odata.type": "Microsoft.Dynamics.CRM.lead", "leadid": lead_id_of(legal_entity, prospect_id),
                    **self._keyed(legal_entity, prospect_id, lead)} for prospect_id, lead in leads]  # fmt: skip
        self.odata.request(
            "POST", "leads/Microsoft.Dynamics.CRM.UpsertMultiple", operation="upsert leads",
            record=f"{len(leads)} leads ({legal_entity}/{leads[0][0]} … {legal_entity}/{leads[-1][0]})",
            json={"Targets": targets},
            repeatable=True,  # upserts by derived lead id: a repeat writes the same rows
        )  # fmt: skip
        return [target["leadid"] for target in targets]

    def update_many(self, entity_set: str, id_column: str, rows: Sequence[dict]) -> None:
        """One UpdateMultiple of rows that carry their primary key, all or nothing (update-only)."""
        type_name = f"Microsoft.Dynamics.CRM.{_TYPES[entity_set]}"
        targets = [{"@odata.type": type_name, **row, id_column: str(uuid.UUID(row[id_column]))} for row in rows]
        self.odata.request(
            "POST", f"{entity_set}/Microsoft.Dynamics.CRM.UpdateMultiple", operation=f"update {entity_set}",
            record=f"{len(rows)} {entity_set}", json={"Targets": targets},
            repeatable=True,  # sets the same values again
        )  # fmt: skip

    def leads_between(self, legal_entity: str, first_id: str, last_id: str) -> dict[str, list[dict]]:
        """Existing leads of the legal entity's prospects whose ids lie in [first_id, last_id], under
        either form of key, whoever wrote them (this product, dual-write, a seller): folded prospect id
        (`key_fold`) → its leads (EXISTING_LEAD_COLUMNS).

        One ranged read per bulk write tells which prospects already have a lead, so the upsert
        creates only the others and never overwrites a lead a seller works on. Overlapping runs do
        not both get here for one prospect: the flow claims a batch's prospects first (flow/claims.py)."""
        company = self.company_id(legal_entity)
        older = (prospect_key(legal_entity, first_id), prospect_key(legal_entity, last_id))
        params = {
            "$filter": f"(_msdyn_company_value eq {company} and msdyn_prospectid ge {literal(first_id)} and "
                       f"msdyn_prospectid le {literal(last_id)}) or (msdyn_prospectid ge {literal(older[0])} and "
                       f"msdyn_prospectid le {literal(older[1])})",
            "$select": ",".join(EXISTING_LEAD_COLUMNS),
        }  # fmt: skip
        found: dict[str, list[dict]] = {}
        for page in self.odata.iter_pages("leads", operation="read existing leads", params=params, headers=self._paging):
            for row in page:
                named = lead_prospect(row, self.company_codes())
                if named is not None and named[0] == key_fold(legal_entity):
                    found.setdefault(named[1], []).append(row)
        return found

    def opportunities_of_leads(self, lead_ids: Iterable[str]) -> list[dict]:
        """Every opportunity made from these leads (`originatingleadid`), a bounded `or` filter a request."""
        unique = sorted({_guid("leads", value) for value in lead_ids})
        select = ",".join(OPPORTUNITY_COLUMNS)

        def read(chunk: Sequence[str]) -> list[dict]:
            params = {"$filter": " or ".join(f"_originatingleadid_value eq {guid}" for guid in chunk), "$select": select}
            return [row for page in self.odata.iter_pages("opportunities", operation="read opportunities of leads",
                                                          params=params, headers=self._paging) for row in page]  # fmt: skip

        chunks = [unique[start : start + IDS_PER_QUERY] for start in range(0, len(unique), IDS_PER_QUERY)]
        with ThreadPoolExecutor(max_workers=self.max_concurrency) as pool:
            return [row for rows in pool.map(read, chunks) for row in rows]

    def changes(self, entity_set: str, columns: Iterable[str], delta_link: str | None) -> ChangeFeed:
        """Change tracking: every row on the first read, then only what changed since `delta_link`."""
        headers = {"Prefer": f"odata.track-changes,odata.maxpagesize={self.page_size}"}
        full_read = self.odata.iter_page_bodies(
            entity_set, operation=f"read all {entity_set} (change tracking)", headers=headers,
            params={"$select": ",".join(columns)},
        )  # fmt: skip
        feed = ChangeFeed(iter(()))
        bodies: Iterator[dict] = full_read
        if delta_link:
            changed = self.odata.iter_page_bodies(delta_link, operation=f"read {entity_set} changes", headers=headers)
            try:
                bodies = itertools.chain([next(changed)], changed)
            except D365Error as error:
                if error.code != EXPIRED_DELTA_TOKEN:
                    raise
                feed.expired = True  # too old: read everything again and start a new link

        def pages() -> Iterator[list[dict]]:
            for body in bodies:
                rows = []
                for row in body.get("value", []):
                    if str(row.get("@odata.context", "")).endswith("$deletedEntity"):
                        feed.deleted.append(str(row["id"]).lower())
                    else:
                        rows.append(row)
                yield rows
                feed.delta_link = body.get("@odata.deltaLink", feed.delta_link)

        feed.pages = pages()
        return feed

    def has_changes(self, entity_set: str, delta_link: str) -> bool:
        """Whether anything changed since `delta_link`: one request for at most one row or tombstone
        (`odata.maxpagesize=1`). An expired link counts as a change: only a full read can follow it."""
        operation, headers = f"look for {entity_set} changes", {"Prefer": "odata.track-changes,odata.maxpagesize=1"}
        try:
            body = self.odata.request("GET", delta_link, operation=operation, headers=headers).json()
        except D365Error as error:
            if error.code != EXPIRED_DELTA_TOKEN:
                raise
            return True
        return bool(body.get("value"))

    def iter_commerce_lead_pages(self) -> Iterator[list[dict]]:
        """Every Commerce B2B lead, whatever its state: the drift check's view of Sales."""
        return self.odata.iter_pages(
            "leads",
            operation="read all Commerce B2B leads",
            params={"$filter": "msdyn_b2bcommerceprospect eq true", "$select": ",".join(DRIFT_LEAD_COLUMNS)},
            headers=self._paging,
        )

    def iter_decided_lead_pages(self) -> Iterator[list[dict]]:
        """Commerce B2B leads that sellers qualified or disqualified."""
        return self.odata.iter_pages(
            "leads",
            operation="read decided Commerce B2B leads",
            params={
                "$filter": "msdyn_b2bcommerceprospect eq true and statecode ne 0",
                "$select": ",".join(LEAD_OUTCOME_COLUMNS),
            },
            headers=self._paging,
        )

    def get_by_ids(self, entity_set: str, id_column: str, ids: Iterable[str], columns: Iterable[str]) -> list[dict]:
        """Rows of one table by primary key, a bounded `or` filter per request, up to the client's
        concurrency in flight."""
        unique = sorted({_guid(entity_set, value) for value in ids})  # a GUID literal cannot widen a filter
        select = ",".join(columns)

        def read(chunk: Sequence[str]) -> list[dict]:
            params = {"$filter": " or ".join(f"{id_column} eq {guid}" for guid in chunk), "$select": select}
            return [row for page in self.odata.iter_pages(entity_set, operation=f"read {entity_set}", params=params,
                                                          headers=self._paging) for row in page]  # fmt: skip

        chunks = [unique[start : start + IDS_PER_QUERY] for start in range(0, len(unique), IDS_PER_QUERY)]
        with ThreadPoolExecutor(max_workers=self.max_concurrency) as pool:
            return [row for rows in pool.map(read, chunks) for row in rows]

    def set_account_number(self, account_id: str, account_number: str) -> None:
        """Dual-write's mapping: the account's `accountnumber` is the Commerce customer account."""
        self.odata.request(
            "PATCH",
            f"accounts({uuid.UUID(account_id)})",
            operation="set account number",
            record=f"account {account_id}",
            json={"accountnumber": account_number},
            headers={"If-Match": "*"},
        )

