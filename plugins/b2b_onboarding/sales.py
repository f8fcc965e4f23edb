"""Dynamics 365 Sales (Dataverse Web API): the operations of the onboarding flow."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from .errors import D365Error
from .odata import ODataClient, literal
from .settings import ServiceSettings

SYSTEM = "Dataverse (Sales)"
WEB_API_HEADERS = {"OData-Version": "4.0", "OData-MaxVersion": "4.0"}

LEAD_OUTCOME_COLUMNS = (
    "leadid", "msdyn_prospectid", "statecode", "statuscode",
    "_qualifyingopportunityid_value", "_parentaccountid_value", "_parentcontactid_value",
)  # fmt: skip
OPPORTUNITY_COLUMNS = ("opportunityid", "statecode", "statuscode", "_originatingleadid_value")
ACCOUNT_COLUMNS = ("accountid", "name", "accountnumber", "emailaddress1")
CONTACT_COLUMNS = ("contactid", "firstname", "lastname", "emailaddress1")

# Dataverse's answer to a delta link older than the organization keeps change history for.
EXPIRED_DELTA_TOKEN = "0x80044352"
DRIFT_LEAD_COLUMNS = ("leadid", "msdyn_prospectid", "statecode", "msdyn_b2bprospectstatus")

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


def lead_id_of(prospect_key: str) -> str:
    """The lead id of a prospect, the same on every run and every worker."""
    return str(uuid.uuid5(_LEAD_IDS, prospect_key))


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

    def create_lead(self, prospect_key: str, lead: dict) -> tuple[str, bool]:
        """Creates the lead of a prospect unless one exists; returns (leadid, created).

        Created at the lead id derived from the prospect key (as `upsert_leads` does) and sent
        create-only (`If-None-Match: *`): a lead that exists, at that id or under that prospect key,
        answers 412 and is adopted as it is, never overwritten. The prospect key never goes in the
        URL: Dataverse cannot address an alternate key holding `:`, `/`, `#`, `%`... in a URL."""
        record = f"lead of prospect {prospect_key}"
        lead_id = lead_id_of(prospect_key)
        response = self.odata.request(
            "PATCH", f"leads({lead_id})", operation="create lead", record=record,
            json={"msdyn_prospectid": prospect_key, **lead}, headers={"If-None-Match": "*"}, accept=frozenset({412}),
        )  # fmt: skip
        if response.status_code != 412:
            return lead_id, True
        existing = self.get_lead(prospect_key)
        if existing is None:  # deleted between the two calls: the next run creates it
            raise D365Error(
                system=SYSTEM, operation="create lead", status=412, record=record,
                message="the lead existed, then vanished before it could be read",
            )  # fmt: skip
        return existing["leadid"].lower(), False

    def get_lead(self, prospect_key: str) -> dict | None:
        params = {"$filter": f"msdyn_prospectid eq {literal(prospect_key)}", "$select": ",".join(LEAD_OUTCOME_COLUMNS)}
        rows = [row for page in self.odata.iter_pages("leads", operation="read lead", params=params) for row in page]
        return rows[0] if rows else None

    def upsert_leads(self, leads: Sequence[tuple[str, dict]]) -> list[str]:
        """One UpsertMultiple of (prospect key, lead) pairs, all or nothing; the lead ids, in order.

        UpsertMultiple answers 204 with no ids, so each lead's id is derived from its prospect key
        (`lead_id_of`): a retried or overlapping upsert names the same row, never a second one."""
        targets = [{"@odata.type": "Microsoft.Dynamics.CRM.lead", "leadid": lead_id_of(key), "msdyn_prospectid": key,
                    **lead} for key, lead in leads]  # fmt: skip
        self.odata.request(
            "POST", "leads/Microsoft.Dynamics.CRM.UpsertMultiple", operation="upsert leads",
            record=f"{len(leads)} leads ({leads[0][0]} … {leads[-1][0]})", json={"Targets": targets},
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

    def leads_between(self, first_key: str, last_key: str) -> dict[str, str]:
        """Existing Commerce B2B leads whose prospect key lies in [first_key, last_key]: key → lead id.

        One ranged read per bulk write tells which prospects already have a lead, so the upsert
        creates only the others and never overwrites a lead a seller works on. Only a run overlapping
        in the moment between this read and its write can upsert the same rows again, with the same
        contents (README, Backfills)."""
        params = {
            "$filter": f"msdyn_prospectid ge {literal(first_key)} and msdyn_prospectid le {literal(last_key)}",
            "$select": "leadid,msdyn_prospectid",
        }
        return {
            row["msdyn_prospectid"]: row["leadid"].lower()
            for page in self.odata.iter_pages("leads", operation="read existing leads", params=params,
                                              headers=self._paging)  # fmt: skip
            for row in page
        }

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

