"""The outcome reconciliation: sellers' decisions in Sales become customers, hierarchies and
approvals or rejections in Commerce. Each write is preceded by a read of the target, so a rerun,
a backfill or an overlapping run finds the work done and writes nothing."""

from __future__ import annotations

import pandas as pd

from . import rules
from .commerce import CommerceClient
from .errors import D365Error, DecisionConflict
from .per_record import for_each_prospect
from .prospects import customer_accounts
from .sales import ACCOUNT_COLUMNS, CONTACT_COLUMNS, LEAD_OUTCOME_COLUMNS, OPPORTUNITY_COLUMNS, SalesClient
from .store import StateStore


def read_outcomes(sales: SalesClient, store: StateStore, run_id: str) -> dict:
    """Brings the store up to date with the state of every tracked lead and its opportunity."""
    leads = pd.DataFrame(
        [row for page in sales.iter_decided_lead_pages() for row in page], columns=list(LEAD_OUTCOME_COLUMNS)
    )
    lead_changes = store.apply_changes(rules.lead_outcomes(store.frame(), leads), run_id)

    tracked = store.frame()
    open_ids = tracked.loc[tracked["decision"].isna() & tracked["opportunity_id"].notna(), "opportunity_id"]
    opportunities = pd.DataFrame(
        sales.get_by_ids("opportunities", "opportunityid", open_ids, OPPORTUNITY_COLUMNS),
        columns=list(OPPORTUNITY_COLUMNS),
    )
    opportunity_changes = store.apply_changes(rules.opportunity_outcomes(tracked, opportunities), run_id)
    return {"step": "read outcomes", "legal_entity": "*", "decided_leads": len(leads),
            "lead_changes": lead_changes, "opportunity_changes": opportunity_changes}  # fmt: skip


def _ensure_customer(commerce: CommerceClient, customer: dict) -> dict:
    """The customer under its derived account: read, else create; a concurrent create is adopted."""
    legal_entity, account = customer["dataAreaId"], customer["CustomerAccount"]
    found = commerce.get_customer(legal_entity, account)
    if found is not None:
        return found
    try:
        return commerce.create_customer(customer)
    except D365Error as error:
        if error.status == 400 and (found := commerce.get_customer(legal_entity, account)) is not None:
            return found
        raise


def write_customers(
    commerce: CommerceClient,
    sales: SalesClient,
    store: StateStore,
    legal_entity: str,
    run_id: str,
    customer_group: str | None = None,
) -> dict:
    """Qualified leads: the account becomes an Organization customer, the contact a Person customer."""
    todo = rules.needing_customers(store.frame(legal_entity))
    accounts = {row["accountid"]: row for row in sales.get_by_ids("accounts", "accountid",
                                                                  todo["account_id"].dropna(), ACCOUNT_COLUMNS)}  # fmt: skip
    contacts = {row["contactid"]: row for row in sales.get_by_ids("contacts", "contactid",
                                                                  todo["contact_id"].dropna(), CONTACT_COLUMNS)}  # fmt: skip
    common = {"CustomerGroupId": customer_group} if customer_group else {}

    def create(row: dict) -> tuple[str, dict]:
        record = f"prospect {row['legal_entity']}/{row['prospect_id']}"
        account, contact = accounts.get(row["account_id"]), contacts.get(row["contact_id"])
        if account is None or contact is None:
            missing = "account" if account is None else "contact"
            raise DecisionConflict(f"{record}: the qualified lead's {missing} no longer exists in Sales")
        org_account, person_account = customer_accounts(row["prospect_id"])
        currency = {"SalesCurrencyCode": row["prospect"]["CurrencyCode"]} if row["prospect"].get("CurrencyCode") else {}
        organization = _ensure_customer(commerce, {
            "dataAreaId": row["legal_entity"], "CustomerAccount": org_account, "PartyType": "Organization",
            "OrganizationName": account["name"], **common, **currency,
        })  # fmt: skip
        names = {field: contact[column] for field, column in (("PersonFirstName", "firstname"),
                                                              ("PersonLastName", "lastname")) if contact[column]}  # fmt: skip
        person = _ensure_customer(commerce, {
            "dataAreaId": row["legal_entity"], "CustomerAccount": person_account, "PartyType": "Person",
            "PrimaryContactEmail": contact["emailaddress1"], **names, **common, **currency,
        })  # fmt: skip
        if account.get("accountnumber") != org_account:
            sales.set_account_number(account["accountid"], org_account)
        return "created", {
            "org_customer_account": org_account,
            "org_party_number": organization["PartyNumber"],
            "person_customer_account": person_account,
            "person_party_number": person["PartyNumber"],
        }

    return for_each_prospect("write customers", legal_entity, todo, store, run_id, create)


def _decide(commerce: CommerceClient, legal_entity: str, prospect_id: str, status: str) -> None:
    """Moves a Pending prospect to `status` (HQ then sends the email) unless it is already there.

    A prospect decided otherwise in HQ is a conflict: reported, never flipped.
    """
    record = f"prospect {legal_entity}/{prospect_id}"
    for attempt in range(2):
        prospect = commerce.get_prospect(legal_entity, prospect_id)
        if prospect is None:
            raise DecisionConflict(f"{record} no longer exists in Commerce; Sales decided {status}")
        current = prospect["B2BProspectStatus"]
        if current == status:
            return
        if current != "Pending":
            raise DecisionConflict(f"{record} is {current} in Commerce but Sales decided {status}; left as it is")
        try:
            commerce.set_prospect_status(legal_entity, prospect_id, status, prospect["@odata.etag"])
            return
        except D365Error as error:  # changed under us: read again once, then judge
            if error.status not in (400, 412) or attempt:
                raise


def approve_won(commerce: CommerceClient, store: StateStore, legal_entity: str, run_id: str) -> dict:
    """Won opportunities: the customer hierarchy with the contact as Admin, then the approval."""

    def approve(row: dict) -> tuple[str, dict]:
        hierarchy = commerce.find_b2b_hierarchy(row["org_party_number"])
        if hierarchy is None:
            channel = row["prospect"].get("RetailChannelOperatingUnitPartyNumber")
            hierarchy = commerce.create_hierarchy({
                "Name": row["prospect"]["CompanyName"], "Purpose": "B2BOrganization",
                "OrganizationPartyNumber": row["org_party_number"], **({"SellerChannel": channel} if channel else {}),
            })  # fmt: skip
        hierarchy_id = hierarchy["CustomerHierarchyId"]
        if commerce.get_hierarchy_node(hierarchy_id, row["person_party_number"]) is None:
            commerce.create_hierarchy_node({
                "CustomerHierarchyId": hierarchy_id, "NodePartyNumber": row["person_party_number"],
                "Role": "Admin", "NodeType": "Customer",
            })  # fmt: skip
        _decide(commerce, row["legal_entity"], row["prospect_id"], "Approved")
        return "approved", {"hierarchy_id": hierarchy_id, "decision": rules.Stage.APPROVED.value}

    return for_each_prospect("approve", legal_entity, rules.to_approve(store.frame(legal_entity)), store, run_id,
                             approve)  # fmt: skip


def reject_lost(commerce: CommerceClient, store: StateStore, legal_entity: str, run_id: str) -> dict:
    """Disqualified leads and lost opportunities: the rejection."""

    def reject(row: dict) -> tuple[str, dict]:
        _decide(commerce, row["legal_entity"], row["prospect_id"], "Rejected")
        return "rejected", {"decision": rules.Stage.REJECTED.value}

    return for_each_prospect("reject", legal_entity, rules.to_reject(store.frame(legal_entity)), store, run_id,
                             reject)  # fmt: skip
