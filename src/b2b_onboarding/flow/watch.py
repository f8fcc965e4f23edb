"""Whether there is work, cheaply: what the event triggers (airflow/triggers.py) ask on every poll.

Each answer compares what a system shows now with what the flow last recorded in the state store
(HQ: the fingerprint of a legal entity's Pending prospects that the last pull stored; Dataverse: the
delta links the last outcome read stored), and never writes to the store: only the task that applied
the changes a watermark or a link covers moves it, so a poll can never make the flow skip work.
"""

from __future__ import annotations

from collections.abc import Sequence

from b2b_onboarding.clients.commerce import CommerceClient
from b2b_onboarding.clients.sales import SalesClient
from b2b_onboarding.domain.prospects import PendingFingerprint, watermark_name
from b2b_onboarding.store.state import StateStore

# The tables whose changes are sellers' outcomes, as `reconcile.read_outcomes` tracks them.
OUTCOME_TABLES = ("leads", "opportunities")


def pending_fingerprints(commerce: CommerceClient, legal_entities: Sequence[str]) -> dict[str, PendingFingerprint]:
    """Legal entity (lowercase) → the fingerprint of its Pending B2B prospects now, every legal
    entity named, from one keys-only request (more only past a server page)."""
    found = {legal_entity.lower(): PendingFingerprint() for legal_entity in legal_entities}
    for page in commerce.pending_prospect_versions(legal_entities):
        for row in page:
            fingerprint = found.get(str(row.get("dataAreaId") or "").lower())
            if fingerprint is not None:  # only the legal entities asked for count, whatever HQ answers
                fingerprint.add([row])
    return found


def hq_state(commerce: CommerceClient, store: StateStore, legal_entities: Sequence[str]) -> dict[str, str]:
    """The legal entities (as named) whose Pending prospects differ from the watermark of their last
    pull, each with its fingerprint now (what a trigger remembers having fired for). A legal entity
    never pulled counts when it has Pending prospects."""
    now = pending_fingerprints(commerce, legal_entities)
    changed = {}
    for legal_entity in legal_entities:
        fingerprint = now[legal_entity.lower()]
        watermark = store.delta_link(watermark_name(legal_entity))
        if fingerprint.value != watermark and (watermark is not None or fingerprint.count > 0):
            changed[legal_entity] = fingerprint.value
    return changed


def hq_changes(commerce: CommerceClient, store: StateStore, legal_entities: Sequence[str]) -> list[str]:
    """The legal entities (as named) whose Pending B2B prospects changed since their last pull."""
    return list(hq_state(commerce, store, legal_entities))


def sales_state(sales: SalesClient, store: StateStore) -> dict[str, str]:
    """The outcome tables with changes since the delta link the last outcome read stored (or with no
    link, or an expired one: a full read is work too), each with that link ("" when none): one
    request per table with a link."""
    changed = {}
    for table in OUTCOME_TABLES:
        link = store.delta_link(table)
        if link is None or sales.has_changes(table, link):
            changed[table] = link or ""
    return changed


def sales_changes(sales: SalesClient, store: StateStore) -> list[str]:
    """Of `leads` and `opportunities`, those with changes since the last outcome read."""
    return list(sales_state(sales, store))
