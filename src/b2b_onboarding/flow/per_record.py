"""Per-record isolation: one prospect's failure is kept with it, and the rest of the batch goes on."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable

import pandas as pd

from b2b_onboarding.errors import D365Error, DecisionConflict
from b2b_onboarding.store.state import StateStore

log = logging.getLogger(__name__)

# An action returns the outcome to count ("created", "done", ...) and the facts to record.
Action = Callable[[dict], tuple[str, dict]]


def for_each_prospect(
    step: str, legal_entity: str, rows: pd.DataFrame, store: StateStore, run_id: str, act: Action
) -> dict:
    """Runs `act` per prospect. A record-level failure (4xx, conflict) is stored as the prospect's
    last error and retried on the next run; a systemic one (auth, throttling, 5xx) fails the task."""
    counts: Counter[str] = Counter()
    for row in rows.to_dict("records"):
        try:
            outcome, facts = act(row)
        except DecisionConflict as conflict:
            store.update(row["legal_entity"], row["prospect_id"], run_id, error=keep(row, f"conflict: {conflict}"))
            store.record_anomalies([((row["legal_entity"], row["prospect_id"]), conflict.kind, str(conflict))], run_id)
            counts["conflicts"] += 1
            continue
        except D365Error as error:
            if not error.is_record_error:
                raise
            store.update(row["legal_entity"], row["prospect_id"], run_id, error=keep(row, str(error)))
            counts["failed"] += 1
            continue
        store.update(row["legal_entity"], row["prospect_id"], run_id, **facts)
        counts[outcome] += 1
    return {"step": step, "legal_entity": legal_entity, **counts}


def keep(row: dict, error: str) -> str:
    """Logs that a prospect is kept, with its error, for the next run; returns the error to store."""
    log.warning("kept prospect %s/%s for the next run: %s", row["legal_entity"], row["prospect_id"], error)
    return error
