"""The prospect sync: Pending B2B prospects in Commerce become Commerce B2B leads in Sales."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Collection, Iterator, Sequence
from datetime import UTC, datetime, timedelta

from b2b_onboarding.clients.commerce import CommerceClient
from b2b_onboarding.clients.sales import IDS_PER_QUERY, SalesClient
from b2b_onboarding.domain import prospects as prospect_rules
from b2b_onboarding.domain import rules
from b2b_onboarding.domain.prospects import key_fold
from b2b_onboarding.domain.tenant import DEFAULT_TENANT, Tenant
from b2b_onboarding.errors import D365Error
from b2b_onboarding.flow import bulk, claims
from b2b_onboarding.flow.per_record import keep
from b2b_onboarding.store.state import StateStore

log = logging.getLogger(__name__)


def pull_prospects(
    commerce: CommerceClient, store: StateStore, legal_entity: str, run_id: str,
    prospect_ids: Collection[str] | None = None, tenant: Tenant = DEFAULT_TENANT,
) -> dict:  # fmt: skip
    """Reads every Pending B2B prospect of a legal entity, page by page, validates each, and tracks it.

    A prospect whose email a tracked, undecided prospect of the legal entity already holds is
    refused like any invalid record, and validated again on every pull until the email is free.
    Level-based, not interval-based: Pending is the state acted on, so a rerun or a backfill of
    any interval does the same idempotent work. One page at a time is in memory.

    With `prospect_ids` (a targeted rerun), only those prospects are read, each by its key, whatever
    the Pending page set holds; each must still be a Pending B2B prospect to be tracked.

    A whole pull, once every page is recorded, stores the fingerprint of what it read as the legal
    entity's watermark (`flow.watch`: the trigger compares HQ with it); a targeted pull read only some
    prospects, and a dry run's store keeps none.
    """
    counts: Counter[str] = Counter()
    pages = commerce.iter_prospect_pages(legal_entity) if prospect_ids is None else _named_prospects(
        commerce, legal_entity, prospect_ids, counts)  # fmt: skip
    read = prospect_rules.PendingFingerprint()
    for page in pages:
        read.add(page)
        validated = prospect_rules.validate_page(page, legal_entity, tenant)
        in_use = store.emails_in_use(legal_entity, validated["email"].dropna())
        validated = prospect_rules.refuse_duplicate_emails(validated, legal_entity, in_use)
        counts["pulled"] += len(validated)
        counts["invalid"] += int(validated["error"].notna().sum())
        counts.update(store.record_pulled(validated, run_id))
    if prospect_ids is None:
        store.set_delta_link(prospect_rules.watermark_name(legal_entity), read.value, run_id)
    return {"step": "pull", "legal_entity": legal_entity, **counts}


def _named_prospects(
    commerce: CommerceClient, legal_entity: str, prospect_ids: Collection[str], counts: Counter[str]
) -> Iterator[list[dict]]:
    """The named prospects that HQ shows as Pending B2B prospects, as one page; the others are
    counted and logged (only Pending prospects are onboarded)."""
    page = []
    for prospect_id in sorted(prospect_ids):
        prospect = commerce.get_prospect(legal_entity, prospect_id)
        if prospect is None:
            log.warning("prospect %s/%s was named but does not exist in Commerce: not pulled", legal_entity, prospect_id)
            counts["not found"] += 1
        elif prospect.get("IsB2BProspect") != "Yes" or prospect.get("B2BProspectStatus") != "Pending":
            log.warning("prospect %s/%s was named but is %s%s in Commerce: not pulled (only Pending B2B prospects are)",
                        legal_entity, prospect_id, prospect.get("B2BProspectStatus"),
                        "" if prospect.get("IsB2BProspect") == "Yes" else ", not a B2B prospect")  # fmt: skip
            counts["not pending"] += 1
        else:
            page.append(prospect)
    yield page


def push_leads(
    sales: SalesClient,
    store: StateStore,
    legal_entity: str,
    run_id: str,
    first_id: str | None = None,
    last_id: str | None = None,
    tenant: Tenant = DEFAULT_TENANT,
) -> dict:
    """Creates the lead of every tracked, valid prospect (of a prospect-id range) that has none yet,
    or adopts the one lead that already exists under either form of key, whoever made it (this
    product, dual-write before the cut-over, a seller), as it is: its state is read at adoption, and
    an untagged one is tagged as a Commerce B2B lead. Two leads for one prospect are an anomaly and
    neither is adopted. A record the service refuses keeps its error and is retried next run.

    Each batch (one by one: each prospect) is claimed before its leads are read and written, so that
    overlapping runs write each lead once (`flow.claims`); what another run holds is done after it."""
    result = _LeadOutcomes(legal_entity)
    # A claim guards a batch's ranged read and its upsert; one by one, a prospect's read, its create,
    # and the read of the lead a refused create found.
    held_for = claims.lease(sales, 2 if sales.bulk else 3)
    with claims.Claims(store, "push", run_id) as claimed:
        for todo in claimed.rounds(lambda: store.work("push", legal_entity, first_id, last_id)):
            if sales.bulk:
                _push_in_bulk(sales, claimed, held_for, todo.to_dict("records"), result, legal_entity, tenant)
            else:
                _push_one_by_one(sales, claimed, held_for, todo.to_dict("records"), result, legal_entity, tenant)
            result.record(sales, store, run_id, claimed.claimant)
    if claimed.elsewhere:
        result.counts["claimed by another run"] = len(claimed.elsewhere)
    return {"step": "push", "legal_entity": legal_entity, **result.counts}


def _push_one_by_one(
    sales: SalesClient, claimed: claims.Claims, held_for: timedelta, pending: list[dict], result: _LeadOutcomes,
    legal_entity: str, tenant: Tenant,
) -> None:  # fmt: skip
    for row in pending:
        if not claimed.take([row], held_for):
            continue
        try:
            leads = sales.get_leads(legal_entity, row["prospect_id"])
            if not leads:
                lead_id, existing = sales.create_lead(legal_entity, row["prospect_id"],
                                                      prospect_rules.lead_of(row["prospect"], tenant))  # fmt: skip
                if existing is None:
                    result.created(row, lead_id)
                    continue
                leads = [existing]
            result.found(row, leads)
        except D365Error as error:
            if not error.is_record_error:
                raise
            result.refused(row, error)


def _push_in_bulk(
    sales: SalesClient, claimed: claims.Claims, held_for: timedelta, pending: list[dict], result: _LeadOutcomes,
    legal_entity: str, tenant: Tenant,
) -> None:  # fmt: skip
    def send(batch: Sequence[dict]) -> dict[str, list[dict] | str]:
        """Prospect id → its existing leads, or the id of the lead created for it; of the batch's
        prospects this task holds (the others are left to the run that claims them)."""
        batch = claimed.take(batch, held_for)
        if not batch:
            return {}
        existing = sales.leads_between(legal_entity, batch[0]["prospect_id"], batch[-1]["prospect_id"])
        found = {row["prospect_id"]: existing[key_fold(row["prospect_id"])] for row in batch
                 if key_fold(row["prospect_id"]) in existing}  # fmt: skip
        new = [(row["prospect_id"], prospect_rules.lead_of(row["prospect"], tenant)) for row in batch
               if row["prospect_id"] not in found]  # fmt: skip
        created = dict(zip((prospect_id for prospect_id, _ in new), sales.upsert_leads(legal_entity, new))) if new else {}
        return found | created

    for outcome in bulk.write(pending, sales.targets_per_request, send, sales.max_concurrency):
        if isinstance(outcome, bulk.Refused):
            result.refused(outcome.item, outcome.error)
            continue
        for row in outcome.items:
            answer = outcome.result.get(row["prospect_id"])
            if isinstance(answer, str):
                result.created(row, answer)
            elif answer is not None:
                result.found(row, answer)


class _LeadOutcomes:
    """What `push_leads` found or did per prospect, recorded in the store in one go per round."""

    def __init__(self, legal_entity: str) -> None:
        self.legal_entity = legal_entity
        self.counts: Counter[str] = Counter()
        self.updates: list[tuple[tuple[str, str], dict, str | None]] = []
        self.anomalies: list[tuple[tuple[str, str], str, str]] = []
        self.untagged: list[tuple[tuple[str, str], str]] = []

    def created(self, row: dict, lead_id: str) -> None:
        facts = {"lead_id": lead_id, "lead_state": "open", "lead_fields": prospect_rules.mapped_lead_fields(row["prospect"])}
        self.updates.append(((row["legal_entity"], row["prospect_id"]), facts, None))
        self.counts["created"] += 1

    def found(self, row: dict, leads: list[dict]) -> None:
        key, record = (row["legal_entity"], row["prospect_id"]), f"prospect {row['legal_entity']}/{row['prospect_id']}"
        if len(leads) > 1:
            ids = ", ".join(sorted(lead["leadid"].lower() for lead in leads))
            detail = (f"{record} has {len(leads)} leads in Sales ({ids}; keys "
                      f"{', '.join(repr(lead['msdyn_prospectid']) for lead in leads)}); neither is adopted. Next step: "
                      "merge or delete the extra leads in Sales so that one remains; the next sync adopts it")  # fmt: skip
            self.updates.append((key, {}, keep(row, f"conflict: {detail}")))
            self.anomalies.append((key, "duplicate_leads", detail))
            self.counts["conflicts"] += 1
            return
        lead = leads[0]
        state = rules.LEAD_STATES.get(lead.get("statecode"))
        facts = {
            "lead_id": lead["leadid"].lower(), "lead_state": state,
            # Only what HQ changes from now on is carried to the lead: its values as HQ has them today.
            "lead_fields": prospect_rules.mapped_lead_fields(row["prospect"]),
            "opportunity_id": _lower(lead.get("_qualifyingopportunityid_value")),
            "account_id": _lower(lead.get("_parentaccountid_value")),
            "contact_id": _lower(lead.get("_parentcontactid_value")),
            "qualified_at": datetime.now(UTC).isoformat() if state == "qualified" else None,
        }  # fmt: skip
        self.updates.append((key, {name: value for name, value in facts.items() if value is not None}, None))
        if lead.get("msdyn_b2bcommerceprospect") is not True:
            self.untagged.append((key, lead["leadid"].lower()))
        self.counts["adopted"] += 1

    def refused(self, row: dict, error: D365Error) -> None:
        self.updates.append(((row["legal_entity"], row["prospect_id"]), {}, keep(row, str(error))))
        self.counts["failed"] += 1

    def record(self, sales: SalesClient, store: StateStore, run_id: str, claimant: str) -> None:
        """Tags the untagged leads adopted (before the store records them: a run killed in between
        finds them again and tags them), then records every outcome so far, ending the claimant's
        claims in the same transaction."""
        tagged = self._tag(sales)
        store.update_many(self.updates, run_id, release=("push", claimant))
        if self.anomalies:
            store.record_anomalies(self.anomalies, run_id)
        store.note([(key, "adopted an untagged lead and tagged it as a Commerce B2B lead")
                    for key, lead_id in self.untagged if lead_id in tagged], run_id)  # fmt: skip
        self.updates, self.anomalies, self.untagged = [], [], []

    def _tag(self, sales: SalesClient) -> set[str]:
        """Tags the untagged leads adopted, so that "All Commerce B2B leads" and the drift check see
        them; returns the ids tagged."""
        rows = [{"leadid": lead_id, "msdyn_b2bcommerceprospect": True} for _, lead_id in self.untagged]
        tagged: set[str] = set()
        for outcome in bulk.write(rows, sales.targets_per_request, lambda part: sales.update_many("leads", "leadid", part)):
            if isinstance(outcome, bulk.Refused):
                log.warning("lead %s adopted but not tagged as a Commerce B2B lead: %s", outcome.item["leadid"], outcome.error)
                self.counts["tagging failed"] += 1
            else:
                tagged |= {row["leadid"] for row in outcome.items}
        self.counts["tagged"] += len(tagged)
        return tagged


def _lower(value: object) -> str | None:
    return value.lower() if isinstance(value, str) else None


def correct_leads(
    sales: SalesClient, store: StateStore, legal_entity: str, run_id: str,
    first_id: str | None = None, last_id: str | None = None,
) -> dict:  # fmt: skip
    """Carries corrections made in HQ to open leads, in bulk: a mapped column that HQ changed is
    updated unless a seller changed it in Sales too, in which case the seller's value stays and the
    clash is an anomaly (`lead_edited_in_sales`). Each change is in the prospect's history.

    The chunk's prospects are claimed before their leads are read, so that overlapping runs update
    each lead once (`flow.claims`); what another run holds is done after it."""
    counts: Counter[str] = Counter()
    with claims.Claims(store, "correct", run_id) as claimed:
        for todo in claimed.rounds(lambda: store.work("correct", legal_entity, first_id, last_id)):
            rows = todo.to_dict("records")
            # The claim guards the reads of the leads (IDS_PER_QUERY a request, max_concurrency at once)
            # and the updates after them (targets_per_request each, one after another).
            reads = -(-len(rows) // IDS_PER_QUERY)
            requests = -(-reads // sales.max_concurrency) + -(-len(rows) // sales.targets_per_request)
            taken = claimed.take(rows, claims.lease(sales, requests))
            if taken:
                _correct(sales, store, taken, run_id, claimed.claimant, counts)
    if claimed.elsewhere:
        counts["claimed by another run"] = len(claimed.elsewhere)
    return {"step": "correct leads", "legal_entity": legal_entity, **counts}


def _correct(
    sales: SalesClient, store: StateStore, todo: list[dict], run_id: str, claimant: str, counts: Counter[str]
) -> None:
    columns = ("leadid", "statecode", *prospect_rules.MAPPED_LEAD_COLUMNS)
    lead_ids = [row["lead_id"] for row in todo if row["lead_id"] is not None]
    current = {row["leadid"].lower(): row for row in sales.get_by_ids("leads", "leadid", lead_ids, columns)}
    changes, facts, notes, clashes = [], {}, {}, []
    for row in todo:
        key, lead = (row["legal_entity"], row["prospect_id"]), current.get(row["lead_id"])
        if lead is None or lead.get("statecode") != 0:  # gone or closed: the reconciliation reads it
            counts["not open"] += 1
            continue
        wanted, base = prospect_rules.mapped_lead_fields(row["prospect"]), row["lead_fields"] or {}
        update = {column: value for column, value in wanted.items()
                  if _same(lead.get(column), base.get(column)) and not _same(lead.get(column), value)}  # fmt: skip
        clashing = sorted(column for column, value in wanted.items() if not _same(value, base.get(column))
                          and not _same(lead.get(column), base.get(column)) and not _same(lead.get(column), value))  # fmt: skip
        facts[key] = {"lead_fields": wanted, "lead_outdated": None}
        if update:
            changes.append((key, {"leadid": row["lead_id"], **update}))
            notes[key] = "lead updated from the correction in Commerce: " + ", ".join(sorted(update))
        if clashing:
            clashes.append((key, "lead_edited_in_sales",
                            f"prospect {key[0]}/{key[1]} was corrected in Commerce ("
                            + "; ".join(f"{column}: {wanted[column]!r}" for column in clashing)
                            + "), but a seller had changed the same columns of its lead in Sales ("
                            + "; ".join(f"{column}: {lead.get(column)!r}" for column in clashing)
                            + "); the seller's values stay. Next step: agree on the values, and set them in Sales "
                              "or Commerce by hand"))  # fmt: skip
    updates = []
    written = {key for key, _ in changes}
    for outcome in bulk.write([row for _, row in changes], sales.targets_per_request,
                              lambda part: sales.update_many("leads", "leadid", part)):  # fmt: skip
        if isinstance(outcome, bulk.Refused):
            key = next(key for key, row in changes if row is outcome.item)
            written.discard(key)
            facts.pop(key)
            updates.append((key, {}, keep({"legal_entity": key[0], "prospect_id": key[1]}, str(outcome.error))))
            counts["failed"] += 1
    updates += [(key, fact, None) for key, fact in facts.items()]
    store.update_many(updates, run_id, release=("correct", claimant))
    store.note([(key, notes[key]) for key in notes if key in written], run_id)
    if clashes:
        store.record_anomalies(clashes, run_id)
    counts["corrected"] += len(written)
    counts["clashes"] += len(clashes)
    counts["unchanged"] += len(facts) - len(written)


def _same(a: object, b: object) -> bool:
    """Equal as a lead column shows them: a missing value and an empty one are the same."""
    return (a or None) == (b or None)
