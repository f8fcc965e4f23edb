"""The prospect sync: Pending B2B prospects in Commerce become Commerce B2B leads in Sales."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from . import bulk
from . import prospects as prospect_rules
from .commerce import CommerceClient
from .per_record import for_each_prospect, keep
from .sales import SalesClient
from .store import StateStore


def pull_prospects(commerce: CommerceClient, store: StateStore, legal_entity: str, run_id: str) -> dict:
    """Reads every Pending B2B prospect of a legal entity, page by page, validates each, and tracks it.

    A prospect whose email a tracked, undecided prospect of the legal entity already holds is
    refused like any invalid record, and validated again on every pull until the email is free.
    Level-based, not interval-based: Pending is the state acted on, so a rerun or a backfill of
    any interval does the same idempotent work. One page at a time is in memory.
    """
    counts: Counter[str] = Counter()
    for page in commerce.iter_prospect_pages(legal_entity):
        validated = prospect_rules.validate_page(page, legal_entity)
        in_use = store.emails_in_use(legal_entity, validated["email"].dropna())
        validated = prospect_rules.refuse_duplicate_emails(validated, legal_entity, in_use)
        counts["pulled"] += len(validated)
        counts["invalid"] += int(validated["error"].notna().sum())
        counts.update(store.record_pulled(validated, run_id))
    return {"step": "pull", "legal_entity": legal_entity, **counts}


def push_leads(
    sales: SalesClient,
    store: StateStore,
    legal_entity: str,
    run_id: str,
    first_id: str | None = None,
    last_id: str | None = None,
) -> dict:
    """Creates the lead of every tracked, valid prospect (of a prospect-id range) that has none yet,
    or adopts the lead that already exists. A record the service refuses keeps its error and is
    retried next run; the rest are written."""
    todo = store.work("push", legal_entity, first_id, last_id)
    if not sales.bulk:
        return for_each_prospect("push", legal_entity, todo, store, run_id, lambda row: _push_one(sales, row))

    pending = [(row, prospect_rules.prospect_key(row["legal_entity"], row["prospect_id"])) for row in
               todo.to_dict("records")]  # fmt: skip

    def send(batch: Sequence[tuple[dict, str]]) -> dict[str, tuple[str, bool]]:
        """Key → (lead id, created): existing leads adopted as they are, the others created."""
        existing = sales.leads_between(batch[0][1], batch[-1][1])
        new = [(key, prospect_rules.lead_of(row["prospect"])) for row, key in batch if key not in existing]
        created = dict(zip((key for key, _ in new), sales.upsert_leads(new))) if new else {}
        return {key: (existing[key], False) if key in existing else (created[key], True) for _, key in batch}

    counts: Counter[str] = Counter()
    updates = []
    for outcome in bulk.write(pending, sales.targets_per_request, send, sales.max_concurrency):
        if isinstance(outcome, bulk.Refused):
            row, _ = outcome.item
            updates.append(((row["legal_entity"], row["prospect_id"]), {}, keep(row, str(outcome.error))))
            counts["failed"] += 1
            continue
        for row, key in outcome.items:
            lead_id, created = outcome.result[key]
            facts = {"lead_id": lead_id, "lead_state": "open"} if created else {"lead_id": lead_id}
            updates.append(((row["legal_entity"], row["prospect_id"]), facts, None))
            counts["created" if created else "adopted"] += 1
    store.update_many(updates, run_id)
    return {"step": "push", "legal_entity": legal_entity, **counts}


def _push_one(sales: SalesClient, row: dict) -> tuple[str, dict]:
    key = prospect_rules.prospect_key(row["legal_entity"], row["prospect_id"])
    lead_id, created = sales.create_lead(key, prospect_rules.lead_of(row["prospect"]))
    # An adopted lead's state is whatever a seller made it; the reconciliation reads it.
    return ("created", {"lead_id": lead_id, "lead_state": "open"}) if created else ("adopted", {"lead_id": lead_id})
