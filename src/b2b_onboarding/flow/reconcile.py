"""The outcome reconciliation: sellers' decisions in Sales become customers, hierarchies and
approvals or rejections in Commerce. Each write is preceded by a read of the target, so a rerun,
a backfill or an overlapping run finds the work done and writes nothing."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Collection
from datetime import UTC, datetime

import pandas as pd

from b2b_onboarding.clients.batch import BatchRequest, BatchResponse
from b2b_onboarding.clients.commerce import (
    CUSTOMER_FIELDS,
    HIERARCHY_FIELDS,
    NODE_FIELDS,
    CommerceClient,
    required_customer_group,
)
from b2b_onboarding.clients.sales import (
    ACCOUNT_COLUMNS,
    CONTACT_COLUMNS,
    DRIFT_LEAD_COLUMNS,
    LEAD_OUTCOME_COLUMNS,
    OPPORTUNITY_COLUMNS,
    SalesClient,  # fmt: skip
)
from b2b_onboarding.domain import customers, rules
from b2b_onboarding.domain.prospects import customer_account, prospect_hierarchy_id
from b2b_onboarding.domain.tenant import DEFAULT_TENANT, Tenant
from b2b_onboarding.errors import D365Error, DecisionConflict
from b2b_onboarding.flow import bulk, drift
from b2b_onboarding.flow.per_record import Action, for_each_prospect, keep
from b2b_onboarding.store.state import StateStore

log = logging.getLogger(__name__)


# Days a lead may stay qualified with no opportunity before it is an anomaly, unless the run says otherwise.
DEFAULT_QUALIFIED_WITHOUT_OPPORTUNITY_DAYS = 2.0


def read_outcomes(
    sales: SalesClient, store: StateStore, run_id: str, keys: Collection[tuple[str, str]] | None = None,
    qualified_without_opportunity_days: float = DEFAULT_QUALIFIED_WITHOUT_OPPORTUNITY_DAYS,
) -> dict:  # fmt: skip
    """Brings the store up to date with what sellers did to tracked leads and all their opportunities.

    With change tracking, only what changed since the last run is read (the delta links live in the
    store, saved after the changes they cover); a full read (first run, or a link expired) is also
    compared with what the store tracks, so a lead or opportunity deleted meanwhile is reported as
    a tombstone would have been. Without change tracking every decided lead is read each night.
    Either way the opportunities of qualified leads still waiting for one are read by their
    originating lead (opportunities created after qualification, leads adopted already qualified),
    and a lead qualified longer than `qualified_without_opportunity_days` with none is an anomaly.
    With `keys` (a targeted rerun), the leads and opportunities of those prospects are read by id,
    and the delta links are left for the next full run."""
    if keys is not None:
        counts = _read_outcomes_of(sales, store, keys, run_id)
    elif not sales.change_tracking:
        counts = _read_all_outcomes(sales, store, run_id)
    else:
        counts = _read_changes(sales, store, run_id)
    tracked = rules.only(store.frame(columns=rules.RULE_COLUMNS), keys)
    waiting = tracked[(tracked["lead_state"] == "qualified") & tracked["decision"].isna() & tracked["opportunity_state"].isna()]
    counts["opportunities_changes"] += _refresh_opportunities(sales, store, waiting, run_id)
    counts["qualified_without_opportunity"] += _record_qualified_without_opportunity(
        store, rules.only(store.frame(columns=rules.RULE_COLUMNS), keys), qualified_without_opportunity_days, run_id)  # fmt: skip
    return {"step": "read outcomes", "legal_entity": "*", **counts}


def _read_changes(sales: SalesClient, store: StateStore, run_id: str) -> Counter[str]:
    counts: Counter[str] = Counter()
    link = store.delta_link("leads")
    feed = sales.changes("leads", LEAD_OUTCOME_COLUMNS, link)
    seen: set[str] = set()
    for page in feed.pages:
        changed = pd.DataFrame(page, columns=list(LEAD_OUTCOME_COLUMNS))
        ids = list(changed["leadid"].str.lower())
        seen.update(ids)
        counts["leads_read"] += len(changed)
        counts.update(_apply_lead_changes(store, store.frame(columns=rules.RULE_COLUMNS, lead_ids=ids), changed, run_id))
    full_read = feed.expired or link is None
    if full_read:
        tracked = store.frame(columns=rules.RULE_COLUMNS)
        tracked_ids = set(tracked.loc[tracked["decision"].isna() & tracked["lead_id"].notna(), "lead_id"])
    deleted = set(feed.deleted) | (_missing(sales, "leads", "leadid", tracked_ids - seen) if full_read else set())
    counts["leads_deleted"] += _record_deleted(store, "lead", "lead_ids", sorted(deleted), run_id)
    counts["leads_full_reads"] += int(full_read)
    store.set_delta_link("leads", feed.delta_link, run_id)

    link = store.delta_link("opportunities")
    feed = sales.changes("opportunities", OPPORTUNITY_COLUMNS, link)
    seen = set()
    for page in feed.pages:
        rows = pd.DataFrame(page, columns=list(OPPORTUNITY_COLUMNS))
        ids = list(rows["opportunityid"].str.lower())
        seen.update(ids)
        origins = [value.lower() for value in rows["_originatingleadid_value"] if isinstance(value, str)]
        tracked = pd.concat([store.frame(columns=rules.RULE_COLUMNS, lead_ids=origins),
                             store.frame(columns=rules.RULE_COLUMNS, opportunity_ids=ids)],
                            ignore_index=True).drop_duplicates(["legal_entity", "prospect_id"])  # fmt: skip
        counts["opportunities_read"] += len(rows)
        counts.update(_apply_opportunities(store, tracked, rows, run_id))
    full_read = feed.expired or link is None
    if full_read:
        undecided = store.frame(columns=rules.RULE_COLUMNS)
        undecided = undecided[undecided["decision"].isna()]
        kept = store.tracked_opportunities(keys=list(zip(undecided["legal_entity"], undecided["prospect_id"])))
        tracked_ids = set(kept["opportunity_id"])
    deleted = set(feed.deleted) | (_missing(sales, "opportunities", "opportunityid", tracked_ids - seen)
                                   if full_read else set())  # fmt: skip
    counts["opportunities_deleted"] += _record_deleted_opportunities(store, sorted(deleted), run_id)
    counts["opportunities_full_reads"] += int(full_read)
    store.set_delta_link("opportunities", feed.delta_link, run_id)
    return counts


def _missing(sales: SalesClient, entity_set: str, id_column: str, candidates: set[str]) -> set[str]:
    """Those of the tracked ids a full read did not return that are still gone when read by id (one
    made after the read began is not missing): deleted meanwhile."""
    if not candidates:
        return set()
    found = {row[id_column].lower() for row in sales.get_by_ids(entity_set, id_column, candidates, (id_column,))}
    return candidates - found


def _apply_lead_changes(store: StateStore, tracked: pd.DataFrame, leads: pd.DataFrame, run_id: str) -> Counter[str]:
    """Records what sellers did to these leads; notes when a lead was first seen qualified."""
    changes = rules.lead_outcomes(tracked, leads)
    qualified_at = dict(zip(zip(tracked["legal_entity"], tracked["prospect_id"]), tracked["qualified_at"]))
    now = datetime.now(UTC).isoformat()
    changes["qualified_at"] = [now if state == "qualified" and not qualified_at.get(key) else None
                               for key, state in zip(zip(changes["legal_entity"], changes["prospect_id"]),
                                                     changes["lead_state"])]  # fmt: skip
    counts: Counter[str] = Counter()
    counts["leads_changes"] += store.apply_changes(changes, run_id)
    counts["leads_changed_after_decision"] += _record_changed_after_decision(
        store, "lead", rules.leads_changed_after_decision(tracked, leads), run_id)  # fmt: skip
    return counts


def _apply_opportunities(store: StateStore, tracked: pd.DataFrame, rows: pd.DataFrame, run_id: str) -> Counter[str]:
    """Records opportunities (Sales rows) of tracked leads and the state that now counts for each of
    their prospects (`rules.opportunity_states`): any won, else any open, else all lost."""
    counts: Counter[str] = Counter()
    mapped = rules.opportunities_of_leads(tracked, rows)
    if mapped.empty:
        return counts
    keys = sorted(set(zip(mapped["legal_entity"], mapped["prospect_id"])))
    kept = store.tracked_opportunities(keys=keys)
    every = pd.concat([kept[~kept["opportunity_id"].isin(set(mapped["opportunity_id"]))], mapped], ignore_index=True)
    concerned = rules.only(tracked, keys)
    states = rules.opportunity_states(concerned, every)
    store.record_opportunities(mapped, run_id)
    counts["opportunities_changes"] += store.apply_changes(rules.opportunity_outcomes(concerned, states), run_id)
    counts["opportunities_changed_after_decision"] += _record_changed_after_decision(
        store, "opportunity", rules.opportunities_changed_after_decision(concerned, states), run_id)  # fmt: skip
    store.resolve_anomalies(keys, "qualified_without_opportunity")
    return counts


def _refresh_opportunities(sales: SalesClient, store: StateStore, tracked: pd.DataFrame, run_id: str) -> int:
    """Reads every opportunity made from these prospects' leads and records them."""
    if tracked.empty:
        return 0
    rows = pd.DataFrame(sales.opportunities_of_leads(tracked["lead_id"]), columns=list(OPPORTUNITY_COLUMNS))
    return _apply_opportunities(store, tracked, rows, run_id)["opportunities_changes"]


def _record_qualified_without_opportunity(store: StateStore, tracked: pd.DataFrame, days: float, run_id: str) -> int:
    waiting = rules.qualified_without_opportunity(tracked, datetime.now(UTC), days)
    found = [((row["legal_entity"], row["prospect_id"]), "qualified_without_opportunity",
              f"the lead of prospect {row['legal_entity']}/{row['prospect_id']} was qualified on {row['qualified_at'][:10]} "
              f"and has no opportunity after {days:g} days: nothing approves or rejects the prospect until it has one. "
              "Next step: ask the seller to create the opportunity from the lead (originating lead), or to "
              "disqualify the lead")
             for row in waiting.to_dict("records")]  # fmt: skip
    if found:
        store.record_anomalies(found, run_id)
    return len(found)


def _read_outcomes_of(sales: SalesClient, store: StateStore, keys: Collection[tuple[str, str]], run_id: str) -> Counter[str]:
    """The outcomes of the named prospects only: their leads, then every opportunity of those leads,
    read by id. A tracked lead or opportunity that Sales no longer has is deleted, as change tracking
    would have said."""
    counts: Counter[str] = Counter()
    keys = _tracked_keys(store, keys)
    tracked = store.frame(columns=rules.RULE_COLUMNS, keys=keys)
    ids = sorted({value.lower() for value in tracked["lead_id"].dropna()})
    read = pd.DataFrame(sales.get_by_ids("leads", "leadid", ids, LEAD_OUTCOME_COLUMNS), columns=list(LEAD_OUTCOME_COLUMNS))
    counts["leads_read"] += len(read)
    counts.update(_apply_lead_changes(store, tracked, read, run_id))
    counts["leads_deleted"] += _record_deleted(store, "lead", "lead_ids", sorted(set(ids) - set(read["leadid"].str.lower())),
                                               run_id)  # fmt: skip
    tracked = store.frame(columns=rules.RULE_COLUMNS, keys=keys)
    kept = set(store.tracked_opportunities(keys=keys)["opportunity_id"])
    rows = pd.DataFrame(sales.opportunities_of_leads(tracked["lead_id"].dropna()), columns=list(OPPORTUNITY_COLUMNS))
    named = sorted((kept | set(tracked["opportunity_id"].dropna())) - set(rows["opportunityid"].str.lower()))
    by_id = pd.DataFrame(sales.get_by_ids("opportunities", "opportunityid", named, OPPORTUNITY_COLUMNS),
                         columns=list(OPPORTUNITY_COLUMNS))  # fmt: skip
    rows = pd.concat([frame for frame in (rows, by_id) if len(frame)] or [rows], ignore_index=True)
    counts["opportunities_read"] += len(rows)
    counts.update(_apply_opportunities(store, tracked, rows, run_id))
    gone = sorted(set(named) - set(by_id["opportunityid"].str.lower()))
    counts["opportunities_deleted"] += _record_deleted_opportunities(store, gone, run_id)
    return counts


def check_named_drift(
    commerce: CommerceClient, sales: SalesClient, store: StateStore, keys: Collection[tuple[str, str]], run_id: str
) -> tuple[dict, pd.DataFrame]:
    """The drift check of a targeted rerun: the named prospects read by key in Commerce and their
    leads in Sales, judged as `drift.check_drift` judges all of them."""
    spelled = {(le.casefold(), pid.casefold()): (le, pid) for le, pid in [*keys, *_tracked_keys(store, keys)]}
    keys = sorted(spelled.values())
    found = [(key, commerce.get_prospect(*key)) for key in keys]
    prospects = pd.DataFrame([{"legal_entity": key[0], "prospect_id": key[1], "status": row["B2BProspectStatus"]}
                              for key, row in found if row is not None and row.get("IsB2BProspect", "Yes") == "Yes"],
                             columns=["legal_entity", "prospect_id", "status"])  # fmt: skip
    leads = pd.DataFrame([lead for key in keys for lead in sales.get_leads(*key)], columns=list(DRIFT_LEAD_COLUMNS))
    tracked = store.frame(columns=["stage", "decision", "lead_id"], keys=keys)
    findings = drift.find_drift(prospects, leads, tracked, sales.company_codes())
    store.record_drift(findings, run_id)
    anomalies = drift.find_anomalies(prospects, tracked)
    if anomalies:
        store.record_anomalies(anomalies, run_id)
    summary = {"step": "drift check", "legal_entity": "*", "prospects": len(prospects), "leads": len(leads),
               **findings["kind"].value_counts().to_dict(), "anomalies": len(anomalies)}  # fmt: skip
    return summary, findings


def _tracked_keys(store: StateStore, keys: Collection[tuple[str, str]]) -> list[tuple[str, str]]:
    """The named prospects as the store spells them (a run param may name them in another case)."""
    return list(rules.only(store.frame(columns=["stage"]), keys)[["legal_entity", "prospect_id"]].itertuples(
        index=False, name=None))  # fmt: skip


def _record_deleted(store: StateStore, what: str, id_column: str, deleted: list[str], run_id: str) -> int:
    """A lead or opportunity deleted before its prospect was decided: an anomaly, kept and shown."""
    return _report_deleted(store, store.frame(columns=rules.RULE_COLUMNS, **{id_column: deleted}), what, f"the {what}",
                           run_id)  # fmt: skip


def _report_deleted(store: StateStore, tracked: pd.DataFrame, what: str, subject: str, run_id: str) -> int:
    """Anomalies `<what>_deleted` for the undecided ones among `tracked`; each keeps it as its error."""
    undecided = tracked[tracked["decision"].isna()]
    found = [((row["legal_entity"], row["prospect_id"]), f"{what}_deleted",
              f"{subject} of prospect {row['legal_entity']}/{row['prospect_id']} was deleted in Sales before a "
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


def _record_deleted_opportunities(store: StateStore, deleted: list[str], run_id: str) -> int:
    """Opportunities deleted in Sales: forgotten; one of an undecided prospect is an anomaly."""
    if not deleted:
        return 0
    kept = store.tracked_opportunities(opportunity_ids=deleted)
    store.record_opportunities(kept.iloc[0:0], run_id, gone=deleted)
    named = store.frame(columns=rules.RULE_COLUMNS, opportunity_ids=deleted)
    keys = sorted(set(zip(kept["legal_entity"], kept["prospect_id"])) | set(zip(named["legal_entity"], named["prospect_id"])))
    return _report_deleted(store, store.frame(columns=rules.RULE_COLUMNS, keys=keys), "opportunity", "an opportunity",
                           run_id)  # fmt: skip


def _read_all_outcomes(sales: SalesClient, store: StateStore, run_id: str) -> Counter[str]:
    """Without change tracking: every decided Commerce B2B lead; their opportunities are read by
    `read_outcomes` (qualified leads still waiting for a decision) and here (those open)."""
    leads = pd.DataFrame(
        [row for page in sales.iter_decided_lead_pages() for row in page], columns=list(LEAD_OUTCOME_COLUMNS)
    )
    counts: Counter[str] = Counter({"leads_read": len(leads)})
    counts.update(_apply_lead_changes(store, store.frame(columns=rules.RULE_COLUMNS), leads, run_id))
    tracked = store.frame(columns=rules.RULE_COLUMNS)
    counts["opportunities_changes"] += _refresh_opportunities(
        sales, store, tracked[tracked["decision"].isna() & (tracked["opportunity_state"] == "open")], run_id)  # fmt: skip
    return counts


def write_customers(
    commerce: CommerceClient,
    sales: SalesClient,
    store: StateStore,
    legal_entity: str,
    run_id: str,
    customer_group: str | None,
    first_id: str | None = None,
    last_id: str | None = None,
    account_template: str | None = None,
    tenant: Tenant = DEFAULT_TENANT,
) -> dict:
    """Qualified leads: the account stands for an Organization customer and the contact for a Person
    customer of the prospect's legal entity, existing ones reused (`customers.choose`), missing ones
    created in one atomic changeset; an account without a number gets the organization's customer
    account (dual-write's mapping), and a number already set is never overwritten. The person's email
    is the prospect's as HQ has it now, so the approval email and the customer agree. Every new
    customer is of `customer_group` (HQ requires one): without it, a ConfigurationError before any call."""
    common = {"CustomerGroupId": required_customer_group(customer_group, commerce.odata.connection)}
    todo = store.work("customers", legal_entity, first_id, last_id)
    accounts = {row["accountid"].lower(): row for row in sales.get_by_ids("accounts", "accountid",
                                                                          todo["account_id"].dropna(), ACCOUNT_COLUMNS)}  # fmt: skip
    contacts = {row["contactid"].lower(): row for row in sales.get_by_ids("contacts", "contactid",
                                                                          todo["contact_id"].dropna(), CONTACT_COLUMNS)}  # fmt: skip
    current = _current_prospects(commerce, legal_entity, todo) if len(todo) else {}
    counts: Counter[str] = Counter()

    def email_of(row: dict) -> str:
        now = current.get(row["prospect_id"]) or {}
        return now.get("PrimaryEmailAddress") or row["prospect"]["PrimaryEmailAddress"]

    def known_for(rows: list[dict]) -> customers.Known:
        """What HQ already holds that may be these prospects' customers: by account number (any
        company), by email (this legal entity), and the hierarchies the persons among them are in."""
        numbers = {str(accounts[row["account_id"]].get("accountnumber") or "").strip() for row in rows
                   if row["account_id"] in accounts}  # fmt: skip
        if account_template:
            numbers |= {customer_account(account_template, legal_entity, row["prospect_id"], role)
                        for row in rows for role in ("ORG", "ADM")}  # fmt: skip
        found = commerce.rows_where("CustomersV3", "CustomerAccount", numbers, CUSTOMER_FIELDS)
        found += commerce.rows_where("CustomersV3", "PrimaryContactEmail", {email_of(row) for row in rows},
                                     CUSTOMER_FIELDS, legal_entity=legal_entity)  # fmt: skip
        persons = {row["PartyNumber"] for row in found if row["PartyType"] == "Person"}
        nodes = commerce.rows_where("CustomerHierarchyNodes", "NodePartyNumber", persons, NODE_FIELDS) if persons else []
        hierarchies = commerce.rows_where("CustomerHiearchies", "CustomerHierarchyId",
                                          {node["CustomerHierarchyId"] for node in nodes}, HIERARCHY_FIELDS) if nodes else []  # fmt: skip
        return customers.Known.of(found, legal_entity, nodes, hierarchies)

    def choose(row: dict, known: customers.Known) -> customers.Choice:
        record = f"prospect {row['legal_entity']}/{row['prospect_id']}"
        account, contact = accounts.get(row["account_id"]), contacts.get(row["contact_id"])
        if account is None or contact is None:
            missing = "account" if account is None else "contact"
            raise DecisionConflict(f"{missing}_deleted", f"{record}: the qualified lead's {missing} no longer exists "
                                   "in Sales; recreate it, or create the customer in Commerce by hand")  # fmt: skip
        currency = {"SalesCurrencyCode": row["prospect"]["CurrencyCode"]} if row["prospect"].get("CurrencyCode") else {}
        return customers.choose(legal_entity=legal_entity, prospect_id=row["prospect_id"], account=account,
                                contact=contact, email=email_of(row), known=known, template=account_template,
                                common={**common, **currency}, tenant=tenant)  # fmt: skip

    def facts(organization: dict, person: dict) -> dict:
        return {"org_customer_account": organization["CustomerAccount"], "org_party_number": organization["PartyNumber"],
                "person_customer_account": person["CustomerAccount"], "person_party_number": person["PartyNumber"]}  # fmt: skip

    def create_one(row: dict) -> tuple[str, dict]:
        key = (row["legal_entity"], row["prospect_id"])
        choice = choose(row, known_for([row]))
        made = {}
        for wanted in choice.to_create:
            try:
                made[wanted["PartyType"]] = commerce.create_customer(wanted, key)
            except D365Error as error:  # made meanwhile (a lost answer, an overlapping run): adopt it
                again = choose(row, known_for([row]))
                existing = again.organization if wanted["PartyType"] == "Organization" else again.person
                if not error.is_record_error or "PartyNumber" not in existing:
                    raise
                made[wanted["PartyType"]] = existing
        organization = made.get("Organization", choice.organization)
        person = made.get("Person", choice.person)
        counts["existing customers reused"] += choice.reused
        if not accounts[row["account_id"]].get("accountnumber"):  # before the store records the customers
            sales.set_account_number(row["account_id"], organization["CustomerAccount"])
        return "created", facts(organization, person)

    def number_accounts(done: list[tuple[dict, dict]]) -> None:
        """The organization's customer account on every account without a number, in bulk; sent
        before the store records the customers, so a run killed in between numbers them when rerun."""
        numbered = [{"accountid": row["account_id"], "accountnumber": fact["org_customer_account"]} for row, fact in done
                    if row["account_id"] in accounts and not accounts[row["account_id"]].get("accountnumber")]  # fmt: skip
        for outcome in bulk.write(numbered, sales.targets_per_request,
                                  lambda rows: sales.update_many("accounts", "accountid", rows)):  # fmt: skip
            if isinstance(outcome, bulk.Refused):  # kept on the account; the customers stay recorded
                log.warning("account %s keeps no customer account number: %s", outcome.item["accountid"], outcome.error)
                counts["account_numbers_failed"] += 1

    if not commerce.bulk:
        counts.update({name: value for name, value in
                       for_each_prospect("write customers", legal_entity, todo, store, run_id, create_one).items()
                       if name not in ("step", "legal_entity")})  # fmt: skip
    else:
        known = known_for(todo.to_dict("records"))
        choices: dict[str, customers.Choice] = {}

        def plan(row: dict) -> list[BatchRequest] | dict:
            choice = choices[row["prospect_id"]] = choose(row, known)
            if not choice.to_create:
                return facts(choice.organization, choice.person)
            key = (row["legal_entity"], row["prospect_id"])
            return [commerce.create_request("CustomersV3", wanted, key) for wanted in choice.to_create]

        def record(row: dict, answers: list[BatchResponse]) -> dict:
            choice = choices[row["prospect_id"]]
            made = {wanted["PartyType"]: answer.body for wanted, answer in zip(choice.to_create, answers)}
            return facts(made.get("Organization", choice.organization), made.get("Person", choice.person))

        counts.update(_in_changesets(commerce, "write customers", legal_entity, todo, store, run_id, plan, record,
                                     create_one, repeatable=bool(account_template), before_recording=number_accounts))  # fmt: skip
        counts["existing customers reused"] += sum(choice.reused for choice in choices.values())
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
    repeatable: bool = True,
    before_recording: Callable[[list[tuple[dict, dict]]], None] | None = None,
) -> Counter[str]:
    """One atomic changeset per prospect, many per `$batch`. `plan` gives a prospect's writes (or,
    when nothing needs writing, its facts); `record` turns the answers into facts; `before_recording`
    gets the (row, facts) of every prospect done before the store records them. A changeset refused
    as a whole goes through `one` (reads first, adopts what exists, else keeps the error)."""
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
    answers = commerce.run_changesets([writes for _, writes in planned], operation=step,
                                      repeatable=repeatable) if planned else []  # fmt: skip
    refused = []
    for (row, _), answer in zip(planned, answers):
        if all(part.ok for part in answer):
            fact = record(row, answer)
            updates.append(((row["legal_entity"], row["prospect_id"]), fact, None))
            done.append((row, fact))
            counts["written"] += 1
        else:
            refused.append(row)
    if before_recording is not None:
        before_recording(done)
    store.update_many(updates, run_id)
    if conflicts:
        store.record_anomalies(conflicts, run_id)
        counts["conflicts"] += len(conflicts)
    if refused:  # rare: done by an earlier, interrupted run, or a record HQ refuses; judged one by one
        retried = for_each_prospect(step, legal_entity, pd.DataFrame(refused), store, run_id, one)
        counts.update({f"{name} one by one": value for name, value in retried.items()
                       if name not in ("step", "legal_entity")})  # fmt: skip
    return counts


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
    """Won opportunities: the requester in the organization's B2B customer hierarchy, then the
    approval; in bulk mode in one atomic changeset, so HQ never emails a partner without a hierarchy.

    An organization that has no B2B hierarchy gets one, in the prospect's legal entity, with the
    requester as its Admin. One that already has one (a company onboarded before) keeps it, and the
    requester joins it as a User: a hierarchy keeps one Admin."""
    todo = store.work("approve", legal_entity, first_id, last_id)
    counts: Counter[str] = Counter()

    def known_for(rows: list[dict]) -> tuple[dict[str, list[str]], set[tuple[str, str]]]:
        """The ids of the B2B hierarchies of these prospects' organizations, by organization (folded
        party number), and the (hierarchy, person) memberships of the requesters whose organization
        has one (only they may be in it already), folded: looked up per prospect, not scanned."""
        hierarchies: dict[str, list[str]] = {}
        for found in commerce.rows_where("CustomerHiearchies", "OrganizationPartyNumber",
                                         {row["org_party_number"] for row in rows}, HIERARCHY_FIELDS,
                                         legal_entity=legal_entity):  # fmt: skip
            if found.get("Purpose") == "B2BOrganization":
                hierarchies.setdefault(customers.fold(found["OrganizationPartyNumber"]), []).append(
                    found["CustomerHierarchyId"])
        persons = {row["person_party_number"] for row in rows if customers.fold(row["org_party_number"]) in hierarchies}
        members = {(customers.fold(node["CustomerHierarchyId"]), customers.fold(node["NodePartyNumber"]))
                   for node in commerce.rows_where("CustomerHierarchyNodes", "NodePartyNumber", persons, NODE_FIELDS)
                   if not node.get("VersionRemoved")}  # fmt: skip
        return hierarchies, members

    def membership(row: dict, hierarchies: dict[str, list[str]],
                   members: set[tuple[str, str]]) -> tuple[str, list[tuple[str, dict]]]:  # fmt: skip
        """(hierarchy id, the writes that put the requester in it)."""
        derived = prospect_hierarchy_id(row["legal_entity"], row["prospect_id"])
        found = sorted((customers.fold(hierarchy_id) != customers.fold(derived), hierarchy_id)
                       for hierarchy_id in hierarchies.get(customers.fold(row["org_party_number"]), ()))  # fmt: skip
        if not found:
            return derived, [("CustomerHiearchies", _hierarchy(row, derived)),
                             ("CustomerHierarchyNodes", _node(row, derived, "Admin"))]  # fmt: skip
        joined, hierarchy_id = found[0]
        member = (customers.fold(hierarchy_id), customers.fold(row["person_party_number"])) in members
        if joined and not member:
            counts["joined an existing hierarchy"] += 1
        return hierarchy_id, [] if member else [("CustomerHierarchyNodes", _node(row, hierarchy_id, "Admin" if not joined else "User"))]

    def approve_one(row: dict) -> tuple[str, dict]:
        hierarchy_id, writes = membership(row, *known_for([row]))
        create = {"CustomerHiearchies": commerce.create_hierarchy, "CustomerHierarchyNodes": commerce.create_hierarchy_node}
        for entity_set, body in writes:
            try:
                create[entity_set](body)
            except D365Error as error:  # made meanwhile (a lost answer, an overlapping run): judged again
                if not error.is_record_error or membership(row, *known_for([row]))[1] == writes:
                    raise
        _decide(commerce, row["legal_entity"], row["prospect_id"], "Approved")
        return "approved", {"hierarchy_id": hierarchy_id, "decision": rules.Stage.APPROVED.value}

    if not commerce.bulk:
        result = for_each_prospect("approve", legal_entity, todo, store, run_id, approve_one)
        return {**result, **counts}
    current = _current_prospects(commerce, legal_entity, todo) if len(todo) else {}
    hierarchies, members = known_for(todo.to_dict("records")) if len(todo) else ({}, set())
    chosen: dict[str, str] = {}

    def plan(row: dict) -> list[BatchRequest] | dict:
        hierarchy_id, writes = membership(row, hierarchies, members)
        chosen[row["prospect_id"]] = hierarchy_id
        prospect = current.get(row["prospect_id"])
        if _judge(prospect, row["legal_entity"], row["prospect_id"], "Approved"):
            return {"hierarchy_id": hierarchy_id, "decision": rules.Stage.APPROVED.value}
        key = (row["legal_entity"], row["prospect_id"])
        return [*(commerce.create_request(entity_set, body, key) for entity_set, body in writes),
                commerce.status_request(row["legal_entity"], row["prospect_id"], "Approved", prospect["@odata.etag"])]  # fmt: skip

    def record(row: dict, answers: list[BatchResponse]) -> dict:
        return {"hierarchy_id": chosen[row["prospect_id"]], "decision": rules.Stage.APPROVED.value}

    written = _in_changesets(commerce, "approve", legal_entity, todo, store, run_id, plan, record, approve_one)
    return {"step": "approve", "legal_entity": legal_entity, **written, **counts}


def _hierarchy(row: dict, hierarchy_id: str) -> dict:
    """A B2B hierarchy, written in the prospect's legal entity (F&O writes a record in the company its
    `dataAreaId` names, else in the caller's default company)."""
    channel = row["prospect"].get("RetailChannelOperatingUnitPartyNumber")
    return {"dataAreaId": row["legal_entity"], "CustomerHierarchyId": hierarchy_id, "Name": row["prospect"]["CompanyName"],
            "Purpose": "B2BOrganization", "OrganizationPartyNumber": row["org_party_number"],
            **({"SellerChannel": channel} if channel else {})}  # fmt: skip


def _node(row: dict, hierarchy_id: str, role: str) -> dict:
    return {"CustomerHierarchyId": hierarchy_id, "NodePartyNumber": row["person_party_number"], "Role": role,
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

    counts = _in_changesets(commerce, "reject", legal_entity, todo, store, run_id, plan,
                               lambda row, answers: decided, reject_one)  # fmt: skip
    return {"step": "reject", "legal_entity": legal_entity, **counts}
