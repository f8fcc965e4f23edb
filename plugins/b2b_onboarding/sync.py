"""The prospect sync: Pending B2B prospects in Commerce become Commerce B2B leads in Sales."""

from __future__ import annotations

from collections import Counter

from . import prospects as prospect_rules
from .commerce import CommerceClient
from .per_record import for_each_prospect
from .rules import Stage
from .sales import SalesClient
from .store import StateStore


def pull_prospects(commerce: CommerceClient, store: StateStore, legal_entity: str, run_id: str) -> dict:
    """Reads every Pending B2B prospect of a legal entity, page by page, validates each, and tracks it.

    Level-based, not interval-based: Pending is the state acted on, so a rerun or a backfill of
    any interval does the same idempotent work.
    """
    counts: Counter[str] = Counter()
    for page in commerce.iter_pending_prospect_pages(legal_entity):
        validated = prospect_rules.validate_page(page)
        counts["pulled"] += len(validated)
        counts["invalid"] += int(validated["error"].notna().sum())
        counts.update(store.record_pulled(validated, run_id))
    return {"step": "pull", "legal_entity": legal_entity, **counts}


def push_leads(sales: SalesClient, store: StateStore, legal_entity: str, run_id: str) -> dict:
    """Creates the lead of every tracked, valid prospect that has none yet, or adopts the lead that
    already exists. A record the service refuses keeps its error and is retried next run."""
    tracked = store.frame(legal_entity)

    def push(row: dict) -> tuple[str, dict]:
        key = prospect_rules.prospect_key(row["legal_entity"], row["prospect_id"])
        lead_id, created = sales.create_lead(key, prospect_rules.lead_of(row["prospect"]))
        # An adopted lead's state is whatever a seller made it; the reconciliation reads it.
        return ("created", {"lead_id": lead_id, "lead_state": "open"}) if created else ("adopted", {"lead_id": lead_id})

    return for_each_prospect("push", legal_entity, tracked[tracked["stage"] == Stage.PULLED], store, run_id, push)
