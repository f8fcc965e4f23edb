"""The prospect sync: Pending B2B prospects in Commerce become Commerce B2B leads in Sales."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Collection, Iterator, Sequence

from . import bulk
from . import prospects as prospect_rules
from .commerce import CommerceClient
from .per_record import for_each_prospect, keep
from .sales import SalesClient
from .store import StateStore

log = logging.getLogger(__name__)


def pull_prospects(
    commerce: CommerceClient, store: StateStore, legal_entity: str, run_id: str,
    prospect_ids: Collection[str] | None = None,
) -> dict:  # fmt: skip
    """Reads every Pending B2B prospect of a legal entity, page by page, validates each, and tracks it.

    A prospect whose email a tracked, undecided prospect of the legal entity already holds is
    refused like any invalid record, and validated again on every pull until the email is free.
    Level-based, not interval-based: Pending is the state acted on, so a rerun or a backfill of
    any interval does the same idempotent work. One page at a time is in memory.

    With `prospect_ids` (a targeted rerun), only those prospects are read, each by its key, whatever
    the Pending page set holds; each must still be a Pending B2B prospect to be tracked.
    """
    counts: Counter[str] = Counter()
    pages = commerce.iter_prospect_pages(legal_entity) if prospect_ids is None else _named_prospects(
        commerce, legal_entity, prospect_ids, counts)  # fmt: skip
    for page in pages:
        validated = prospect_rules.validate_page(page, legal_entity)
        in_use = store.emails_in_use(legal_entity, validated["email"].dropna())
        validated = prospect_rules.refuse_duplicate_emails(validated, legal_entity, in_use)
        counts["pulled"] += len(validated)
        counts["invalid"] += int(validated["error"].notna().sum())
        counts.update(store.record_pulled(validated, run_id))
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
