"""The outcome reconciliation: sellers' decisions in Sales become customers, hierarchies and
approvals or rejections in Commerce. Each write is preceded by a read of the target, so a rerun,
a backfill or an overlapping run finds the work done and writes nothing."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Collection

import pandas as pd

from . import bulk, drift, rules
from .batch import BatchRequest, BatchResponse
from .commerce import CommerceClient
from .errors import D365Error, DecisionConflict
from .per_record import Action, for_each_prospect, keep
from .prospects import customer_accounts, prospect_hierarchy_id, prospect_key
from .sales import (ACCOUNT_COLUMNS, CONTACT_COLUMNS, DRIFT_LEAD_COLUMNS, LEAD_OUTCOME_COLUMNS, OPPORTUNITY_COLUMNS,
                    SalesClient)  # fmt: skip
from .store import StateStore

log = logging.getLogger(__name__)


def read_outcomes(
    sales: SalesClient, store: StateStore, run_id: str, keys: Collection[tuple[str, str]] | None = None
) -> dict:
    """Brings the store up to date with what sellers did to tracked leads and opportunities.

    With change tracking, only what changed since the last run is read (the delta links live in the
    store, saved after the changes they cover); otherwise every decided lead is read each night.
    With `keys` (a targeted rerun), the leads and opportunities of those prospects are read by id,
    and the delta links are left for the next full run."""
    if keys is not None:
        return _read_outcomes_of(sales, store, keys, run_id)
    if not sales.change_tracking:
        return _read_all_outcomes(sales, store, run_id)
    counts: Counter[str] = Counter()
    for entity_set, what, columns, id_column, rule in (
        ("leads", "lead", LEAD_OUTCOME_COLUMNS, "lead_ids", rules.lead_outcomes),
        ("opportunities", "opportunity", OPPORTUNITY_COLUMNS, "opportunity_ids", rules.opportunity_outcomes),
    ):
        link = store.delta_link(entity_set)
        feed = sales.changes(entity_set, columns, link)
        for page in feed.pages:
            changed = pd.DataFrame(page, columns=list(columns))
            ids = changed[columns[0]].str.lower()
            tracked = store.frame(columns=rules.RULE_COLUMNS, **{id_column: list(ids)})
            counts[f"{entity_set}_read"] += len(changed)
            counts[f"{entity_set}_changes"] += store.apply_changes(rule(tracked, changed), run_id)
            counts[f"{entity_set}_changed_after_decision"] += _record_changed_after_decision(
                store, what, rules.changed_after_decision(tracked, changed, what), run_id)  # fmt: skip
        counts[f"{entity_set}_deleted"] += _record_deleted(store, what, id_column, feed.deleted, run_id)
        counts[f"{entity_set}_full_reads"] += int(feed.expired or link is None)
        store.set_delta_link(entity_set, feed.delta_link, run_id)
    return {"step": "read outcomes", "legal_entity": "*", **counts}


def _read_outcomes_of(sales: SalesClient, store: StateStore, keys: Collection[tuple[str, str]], run_id: str) -> dict:
    """The outcomes of the named prospects only: their leads, then their opportunities (which the
    leads may just have named), read by id. A tracked lead or opportunity that Sales no longer has is
    deleted, as change tracking would have said."""
    counts: Counter[str] = Counter()
    for entity_set, what, columns, id_column, rule in (
        ("leads", "lead", LEAD_OUTCOME_COLUMNS, "lead_id", rules.lead_outcomes),
        ("opportunities", "opportunity", OPPORTUNITY_COLUMNS, "opportunity_id", rules.opportunity_outcomes),
    ):
        tracked = store.frame(columns=rules.RULE_COLUMNS, keys=keys)
        ids = sorted({value.lower() for value in tracked[id_column].dropna()})
        read = pd.DataFrame(sales.get_by_ids(entity_set, columns[0], ids, columns), columns=list(columns))
        counts[f"{entity_set}_read"] += len(read)
        counts[f"{entity_set}_changes"] += store.apply_changes(rule(tracked, read), run_id)
        counts[f"{entity_set}_changed_after_decision"] += _record_changed_after_decision(
            store, what, rules.changed_after_decision(tracked, read, what), run_id)  # fmt: skip
        gone = sorted(set(ids) - set(read[columns[0]].str.lower()))
        counts[f"{entity_set}_deleted"] += _record_deleted(store, what, f"{id_column}s", gone, run_id)
    return {"step": "read outcomes", "legal_entity": "*", **counts}


def check_named_drift(
    commerce: CommerceClient, sales: SalesClient, store: StateStore, keys: Collection[tuple[str, str]], run_id: str
) -> tuple[dict, pd.DataFrame]:
    """The drift check of a targeted rerun: the named prospects read by key in Commerce and their
    leads in Sales, judged as `drift.check_drift` judges all of them."""
    keys = sorted(keys)
    found = [(key, commerce.get_prospect(*key)) for key in keys]
    prospects = pd.DataFrame([{"legal_entity": key[0], "prospect_id": key[1], "status": row["B2BProspectStatus"]}
                              for key, row in found if row is not None and row.get("IsB2BProspect", "Yes") == "Yes"],
                             columns=["legal_entity", "prospect_id", "status"])  # fmt: skip
    leads = pd.DataFrame([lead for key in keys if (lead := sales.get_lead(prospect_key(*key))) is not None],
                         columns=list(DRIFT_LEAD_COLUMNS))  # fmt: skip
    tracked = store.frame(columns=["stage", "decision"], keys=keys)
    invalid = tracked.loc[tracked["stage"] == "invalid", ["legal_entity", "prospect_id"]].itertuples(index=False, name=None)
    findings = drift.find_drift(prospects, leads, invalid)
    store.record_drift(findings, run_id)
    anomalies = drift.find_anomalies(prospects, tracked)
    if anomalies:
        store.record_anomalies(anomalies, run_id)
    summary = {"step": "drift check", "legal_entity": "*", "prospects": len(prospects), "leads": len(leads),
               **findings["kind"].value_counts().to_dict(), "anomalies": len(anomalies)}  # fmt: skip
    return summary, findings


def _record_deleted(store: StateStore, what: str, id_column: str, deleted: list[str], run_id: str) -> int:
    """A lead or opportunity deleted before its prospect was decided: an anomaly, kept and shown."""
    tracked = store.frame(columns=rules.RULE_COLUMNS, **{id_column: deleted})
    undecided = tracked[tracked["decision"].isna()]
    found = [((row["legal_entity"], row["prospect_id"]), f"{what}_deleted",
              f"the {what} of prospect {row['legal_entity']}/{row['prospect_id']} was deleted in Sales before a "
              "decision; recreate it, or decide the prospect in Commerce by hand")
             for row in undecided.to_dict("records")]  # fmt: skip
    store.update_many([(key, {}, keep({"legal_entity": key[0], "prospect_id": key[1]}, f"conflict: {detail}"))
                       for key, _, detail in found], run_id)  # fmt: skip
    if found:
        store.record_anomalies(found, run_id)
    return len(found)


def _record_changed_after_decision(store: StateStore, what: str, changed: pd.DataFrame, run_id: str) -> int:
    """A lead or opportunity whose state moved after its prospect was decided (reopened, won after
    a rejection...): an anomaly; the decision in Commerce stays as it is."""
    found = [((row["legal_entity"], row["prospect_id"]),
              f"{what}_reopened" if row["now"] == "open" else f"{what}_changed_after_decision",
              f"the {what} of prospect {row['legal_entity']}/{row['prospect_id']} is {row['now']} in Sales (it was "
              f"{row['was']}), but the prospect was already {row['decision']} in Commerce, which is left as it is; "
              f"next step: decide with the seller, and change the prospect in Commerce by hand if needed")
             for row in changed.to_dict("records")]  # fmt: skip
    if found:
        store.record_anomalies(found, run_id)
    return len(found)


def _read_all_outcomes(sales: SalesClient, store: StateStore, run_id: str) -> dict:
    leads = pd.DataFrame(
        [row for page in sales.iter_decided_lead_pages() for row in page], columns=list(LEAD_OUTCOME_COLUMNS)
    )
    lead_changes = store.apply_changes(rules.lead_outcomes(store.frame(columns=rules.RULE_COLUMNS), leads), run_id)
    tracked = store.frame(columns=rules.RULE_COLUMNS)
    open_ids = tracked.loc[tracked["decision"].isna() & tracked["opportunity_id"].notna(), "opportunity_id"]
    opportunities = pd.DataFrame(
        sales.get_by_ids("opportunities", "opportunityid", open_ids, OPPORTUNITY_COLUMNS),
        columns=list(OPPORTUNITY_COLUMNS),
    )
    opportunity_changes = store.apply_changes(rules.opportunity_outcomes(tracked, opportunities), run_id)
    return {"step": "read outcomes", "legal_entity": "*", "leads_read": len(leads),
            "leads_changes": lead_changes, "opportunities_changes": opportunity_changes}  # fmt: skip


def write_customers(
    commerce: CommerceClient,
    sales: SalesClient,
    store: StateStore,
    legal_entity: str,
    run_id: str,
    customer_group: str | None = None,
    first_id: str | None = None,
    last_id: str | None = None,
) -> dict:
    """Qualified leads: the account becomes an Organization customer, the contact a Person customer,
    and the account gets the customer account as its number (dual-write's mapping)."""
    todo = store.work("customers", legal_entity, first_id, last_id)
    accounts = {row["accountid"]: row for row in sales.get_by_ids("accounts", "accountid",
                                                                  todo["account_id"].dropna(), ACCOUNT_COLUMNS)}  # fmt: skip
    contacts = {row["contactid"]: row for row in sales.get_by_ids("contacts", "contactid",
                                                                  todo["contact_id"].dropna(), CONTACT_COLUMNS)}  # fmt: skip
    common = {"CustomerGroupId": customer_group} if customer_group else {}

    def customers_of(row: dict) -> tuple[dict, dict, dict]:
        """(organization, person, account) of a prospect, or a conflict when Sales lost one."""
        record = f"prospect {row['legal_entity']}/{row['prospect_id']}"
        account, contact = accounts.get(row["account_id"]), contacts.get(row["contact_id"])
        if account is None or contact is None:
            missing = "account" if account is None else "contact"
            raise DecisionConflict(f"{missing}_deleted", f"{record}: the qualified lead's {missing} no longer exists "
                                   "in Sales; recreate it, or create the customer in Commerce by hand")  # fmt: skip
        org_account, person_account = customer_accounts(row["prospect_id"])
        currency = {"SalesCurrencyCode": row["prospect"]["CurrencyCode"]} if row["prospect"].get("CurrencyCode") else {}
        names = {field: contact[column] for field, column in (("PersonFirstName", "firstname"),
                                                              ("PersonLastName", "lastname")) if contact[column]}  # fmt: skip
        organization = {"dataAreaId": row["legal_entity"], "CustomerAccount": org_account,
                        "PartyType": "Organization", "OrganizationName": account["name"], **common, **currency}  # fmt: skip
        person = {"dataAreaId": row["legal_entity"], "CustomerAccount": person_account, "PartyType": "Person",
                  "PrimaryContactEmail": contact["emailaddress1"], **names, **common, **currency}  # fmt: skip
        return organization, person, account

    def facts(organization: dict, person: dict) -> dict:
        return {"org_customer_account": organization["CustomerAccount"], "org_party_number": organization["PartyNumber"],
                "person_customer_account": person["CustomerAccount"], "person_party_number": person["PartyNumber"]}  # fmt: skip

    def create_one(row: dict) -> tuple[str, dict]:
        organization, person, account = customers_of(row)
        organization, person = _ensure_customer(commerce, organization), _ensure_customer(commerce, person)
        if account.get("accountnumber") != organization["CustomerAccount"]:
            sales.set_account_number(account["accountid"], organization["CustomerAccount"])
        return "created", facts(organization, person)

    if not commerce.bulk:
        return for_each_prospect("write customers", legal_entity, todo, store, run_id, create_one)

    def plan(row: dict) -> list[BatchRequest]:
        organization, person, _ = customers_of(row)
        return [commerce.create_request("CustomersV3", organization), commerce.create_request("CustomersV3", person)]

    def record(row: dict, answers: list[BatchResponse]) -> dict:
        return facts(answers[0].body, answers[1].body)

    done, counts = _in_changesets(commerce, "write customers", legal_entity, todo, store, run_id, plan, record, create_one)
    numbered = [{"accountid": accounts[row["account_id"]]["accountid"], "accountnumber": fact["org_customer_account"]}
                for row, fact in done if accounts[row["account_id"]].get("accountnumber") != fact["org_customer_account"]]  # fmt: skip
    for outcome in bulk.write(numbered, sales.targets_per_request,
                              lambda rows: sales.update_many("accounts", "accountid", rows)):  # fmt: skip
        if isinstance(outcome, bulk.Refused):  # kept on the account; the customers stay recorded
            log.warning("account %s keeps no customer account number: %s", outcome.item["accountid"], outcome.error)
            counts["account_numbers_failed"] += 1
    return {"step": "write customers", "legal_entity": legal_entity, **counts}


def _in_changesets(
    commerce: CommerceClient,
    step: str,
    legal_entity: str,
    todo: pd.DataFrame,
    store: StateStore,
    run_id: str,
    plan: Callable[[dict], list[BatchRequest] | dict],
    record: Callable[[dict, list[BatchResponse]], dict],
    one: Action,
) -> tuple[list[tuple[dict, dict]], Counter[str]]:
    """One atomic changeset per prospect, many per `$batch`. `plan` gives a prospect's writes (or,
    when nothing needs writing, its facts); `record` turns the answers into facts. A changeset
    refused as a whole goes through `one` (reads first, adopts what exists, else keeps the error)."""
    counts: Counter[str] = Counter()
    planned, updates, done, conflicts = [], [], [], []
    for row in todo.to_dict("records"):
        key = (row["legal_entity"], row["prospect_id"])
        try:
            writes = plan(row)
        except DecisionConflict as conflict:
            updates.append((key, {}, keep(row, f"conflict: {conflict}")))
            conflicts.append((key, conflict.kind, str(conflict)))
            continue
        if isinstance(writes, dict):
            updates.append((key, writes, None))
            done.append((row, writes))
            counts["already done"] += 1
        else:
            planned.append((row, writes))
    answers = commerce.run_changesets([writes for _, writes in planned], operation=step) if planned else []
    refused = []
    for (row, _), answer in zip(planned, answers):
        if all(part.ok for part in answer):
            fact = record(row, answer)
            updates.append(((row["legal_entity"], row["prospect_id"]), fact, None))
            done.append((row, fact))
            counts["written"] += 1
        else:
            refused.append(row)
    store.update_many(updates, run_id)
    if conflicts:
        store.record_anomalies(conflicts, run_id)
        counts["conflicts"] += len(conflicts)
    if refused:  # rare: done by an earlier, interrupted run, or a record HQ refuses; judged one by one
        retried = for_each_prospect(step, legal_entity, pd.DataFrame(refused), store, run_id, one)
        counts.update({f"{name} one by one": value for name, value in retried.items()
                       if name not in ("step", "legal_entity")})  # fmt: skip
    return done, counts


def _ensure(read: Callable[[], dict | None], create: Callable[[], dict]) -> dict:
    """A keyed row: read, else create. A create refused because the row exists (an earlier attempt
    whose answer was lost, or a concurrent run) is adopted after a fresh read."""
    found = read()
    if found is not None:
        return found
    try:
        return create()
    except D365Error as error:
        if error.is_record_error and (found := read()) is not None:
            return found
        raise


def _ensure_customer(commerce: CommerceClient, customer: dict) -> dict:
    legal_entity, account = customer["dataAreaId"], customer["CustomerAccount"]
    return _ensure(lambda: commerce.get_customer(legal_entity, account), lambda: commerce.create_customer(customer))


def _decide(commerce: CommerceClient, legal_entity: str, prospect_id: str, status: str) -> None:
    """Moves a Pending prospect to `status` (HQ then sends the email) unless it is already there.

    A prospect decided otherwise in HQ is a conflict: reported, never flipped.
    """
    for attempt in range(2):
        prospect = commerce.get_prospect(legal_entity, prospect_id)
        if _judge(prospect, legal_entity, prospect_id, status):
            return
        try:
            commerce.set_prospect_status(legal_entity, prospect_id, status, prospect["@odata.etag"])
            return
        except D365Error as error:  # changed under us: read again once, then judge
            if error.status not in (400, 412) or attempt:
                raise


def _judge(prospect: dict | None, legal_entity: str, prospect_id: str, status: str) -> bool:
    """True when the prospect already has `status`; False when it is Pending (to be decided);
    a conflict when it is gone or decided otherwise."""
    record = f"prospect {legal_entity}/{prospect_id}"
    if prospect is None:
        raise DecisionConflict("prospect_deleted", f"{record} no longer exists in Commerce; Sales decided {status}")
    current = prospect["B2BProspectStatus"]
    if current != status and current != "Pending":
        raise DecisionConflict("decided_in_commerce",
                               f"{record} is {current} in Commerce but Sales decided {status}; left as it is")  # fmt: skip
    return current == status


def _current_prospects(commerce: CommerceClient, legal_entity: str, todo: pd.DataFrame) -> dict[str, dict]:
    """The chunk's prospects as HQ has them now (status and ETag): one ranged read of pages rather
    than a request per prospect. HQ's collation may order ids unlike Python, so any prospect the
    range missed is read by its key (None when it is gone)."""
    wanted = set(todo["prospect_id"])
    id_range = (min(wanted), max(wanted))
    found = {row["ProspectId"]: row for page in commerce.iter_prospect_pages(legal_entity, None, id_range)
             for row in page if row["ProspectId"] in wanted}  # fmt: skip
    return found | {prospect_id: commerce.get_prospect(legal_entity, prospect_id) for prospect_id in wanted - set(found)}


def approve_won(
    commerce: CommerceClient, store: StateStore, legal_entity: str, run_id: str,
    first_id: str | None = None, last_id: str | None = None,
) -> dict:  # fmt: skip
    """Won opportunities: the customer hierarchy with the contact as Admin, then the approval; in
    bulk mode all three in one atomic changeset, so HQ never emails a partner without a hierarchy."""
    todo = store.work("approve", legal_entity, first_id, last_id)

    def approve_one(row: dict) -> tuple[str, dict]:
        hierarchy_id = prospect_hierarchy_id(row["legal_entity"], row["prospect_id"])
        _ensure(lambda: commerce.get_hierarchy(hierarchy_id), lambda: commerce.create_hierarchy(_hierarchy(row, hierarchy_id)))
        _ensure(lambda: commerce.get_hierarchy_node(hierarchy_id, row["person_party_number"]),
                lambda: commerce.create_hierarchy_node(_admin_node(row, hierarchy_id)))  # fmt: skip
        _decide(commerce, row["legal_entity"], row["prospect_id"], "Approved")
        return "approved", {"hierarchy_id": hierarchy_id, "decision": rules.Stage.APPROVED.value}

    if not commerce.bulk:
        return for_each_prospect("approve", legal_entity, todo, store, run_id, approve_one)
    current = _current_prospects(commerce, legal_entity, todo) if len(todo) else {}

    def plan(row: dict) -> list[BatchRequest] | dict:
        hierarchy_id = prospect_hierarchy_id(row["legal_entity"], row["prospect_id"])
        prospect = current.get(row["prospect_id"])
        if _judge(prospect, row["legal_entity"], row["prospect_id"], "Approved"):
            return {"hierarchy_id": hierarchy_id, "decision": rules.Stage.APPROVED.value}
        return [
            commerce.create_request("CustomerHiearchies", _hierarchy(row, hierarchy_id)),
            commerce.create_request("CustomerHierarchyNodes", _admin_node(row, hierarchy_id)),
            commerce.status_request(row["legal_entity"], row["prospect_id"], "Approved", prospect["@odata.etag"]),
        ]

    def record(row: dict, answers: list[BatchResponse]) -> dict:
        return {"hierarchy_id": answers[0].body["CustomerHierarchyId"], "decision": rules.Stage.APPROVED.value}

    _, counts = _in_changesets(commerce, "approve", legal_entity, todo, store, run_id, plan, record, approve_one)
    return {"step": "approve", "legal_entity": legal_entity, **counts}


def _hierarchy(row: dict, hierarchy_id: str) -> dict:
    channel = row["prospect"].get("RetailChannelOperatingUnitPartyNumber")
    return {"CustomerHierarchyId": hierarchy_id, "Name": row["prospect"]["CompanyName"], "Purpose": "B2BOrganization",
            "OrganizationPartyNumber": row["org_party_number"], **({"SellerChannel": channel} if channel else {})}  # fmt: skip


def _admin_node(row: dict, hierarchy_id: str) -> dict:
    return {"CustomerHierarchyId": hierarchy_id, "NodePartyNumber": row["person_party_number"], "Role": "Admin",
            "NodeType": "Customer"}  # fmt: skip


def reject_lost(
    commerce: CommerceClient, store: StateStore, legal_entity: str, run_id: str,
    first_id: str | None = None, last_id: str | None = None,
) -> dict:  # fmt: skip
    """Disqualified leads and lost opportunities: the rejection."""
    todo = store.work("reject", legal_entity, first_id, last_id)
    decided = {"decision": rules.Stage.REJECTED.value}

    def reject_one(row: dict) -> tuple[str, dict]:
        _decide(commerce, row["legal_entity"], row["prospect_id"], "Rejected")
        return "rejected", decided

    if not commerce.bulk:
        return for_each_prospect("reject", legal_entity, todo, store, run_id, reject_one)
    current = _current_prospects(commerce, legal_entity, todo) if len(todo) else {}

    def plan(row: dict) -> list[BatchRequest] | dict:
        prospect = current.get(row["prospect_id"])
        if _judge(prospect, row["legal_entity"], row["prospect_id"], "Rejected"):
            return decided
        return [commerce.status_request(row["legal_entity"], row["prospect_id"], "Rejected", prospect["@odata.etag"])]

    _, counts = _in_changesets(commerce, "reject", legal_entity, todo, store, run_id, plan,
                               lambda row, answers: decided, reject_one)  # fmt: skip
    return {"step": "reject", "legal_entity": legal_entity, **counts}
