"""Dynamics 365 Sales (Dataverse Web API): the operations of the onboarding flow."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable, Iterator

from .errors import D365Error
from .odata import ODataClient, key_segment
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

_ENTITY_ID = re.compile(r"\(([0-9a-fA-F-]{36})\)$")
# Ids per `or` filter: keeps the URL far below the service's length limit.
IDS_PER_QUERY = 50


class SalesClient:
    def __init__(self, odata: ODataClient, page_size: int = 5000) -> None:
        self.odata = odata
        self._paging = {"Prefer": f"odata.maxpagesize={page_size}"}

    @classmethod
    def connect(cls, settings: ServiceSettings) -> SalesClient:
        odata = ODataClient.connect(settings, system=SYSTEM, root_path="/api/data/v9.2", headers=WEB_API_HEADERS)
        return cls(odata, page_size=settings.page_size)

    def whoami(self) -> dict:
        return self.odata.get("WhoAmI", operation="WhoAmI")

    def create_lead(self, prospect_key: str, lead: dict) -> tuple[str, bool]:
        """Creates the lead of a prospect unless one exists; returns (leadid, created).

        An upsert by the alternate key, sent create-only (`If-None-Match: *`) so that a lead a
        seller already works on is adopted as it is, never overwritten.
        """
        record = f"lead of prospect {prospect_key}"
        response = self.odata.request(
            "PATCH",
            key_segment("leads", msdyn_prospectid=prospect_key),
            operation="create lead",
            record=record,
            json=lead,
            headers={"If-None-Match": "*"},
            accept=frozenset({412}),
        )
        if response.status_code == 412:
            existing = self.get_lead(prospect_key)
            if existing is None:  # deleted between the two calls: the next run creates it
                raise D365Error(
                    system=SYSTEM, operation="create lead", status=412, record=record,
                    message="the lead existed, then vanished before it could be read",
                )  # fmt: skip
            return existing["leadid"], False
        match = _ENTITY_ID.search(response.headers.get("OData-EntityId", ""))
        if not match:
            raise D365Error(
                system=SYSTEM, operation="create lead", status=response.status_code, record=record,
                message=f"no lead id in OData-EntityId {response.headers.get('OData-EntityId')!r}",
            )  # fmt: skip
        return match.group(1).lower(), True

    def get_lead(self, prospect_key: str) -> dict | None:
        return self.odata.get(
            key_segment("leads", msdyn_prospectid=prospect_key),
            operation="read lead",
            record=f"lead of prospect {prospect_key}",
            params={"$select": ",".join(LEAD_OUTCOME_COLUMNS)},
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
        """Rows of one table by primary key, a bounded `or` filter per request."""
        unique = sorted({str(uuid.UUID(value)) for value in ids})  # a GUID literal cannot widen a filter
        rows: list[dict] = []
        for start in range(0, len(unique), IDS_PER_QUERY):
            chunk = unique[start : start + IDS_PER_QUERY]
            params = {"$filter": " or ".join(f"{id_column} eq {guid}" for guid in chunk), "$select": ",".join(columns)}
            for page in self.odata.iter_pages(entity_set, operation=f"read {entity_set}", params=params,
                                              headers=self._paging):  # fmt: skip
                rows.extend(page)
        return rows

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

