"""The tables a run logs: what each step did, and where every prospect stands."""

from __future__ import annotations

from collections.abc import Iterable

import pandas as pd

from .rules import Stage


def run_table(results: Iterable[dict]) -> pd.DataFrame:
    """One row per step and legal entity, one column per outcome count."""
    frame = pd.DataFrame.from_records(list(results))
    if frame.empty:
        return frame
    counts = frame.drop(columns=["step", "legal_entity"]).fillna(0).astype(int)
    return pd.concat([frame[["step", "legal_entity"]], counts], axis=1).set_index(["step", "legal_entity"])


def stage_counts(tracked: pd.DataFrame) -> pd.DataFrame:
    """Prospects per legal entity and stage, stages in flow order, with a total row."""
    order = [stage.value for stage in Stage]
    table = pd.crosstab(tracked["legal_entity"], pd.Categorical(tracked["stage"], categories=order))
    table = table.loc[:, (table != 0).any(axis=0)]
    table.loc["total"] = table.sum()
    table.columns.name = None
    table.index.name = "legal_entity"
    return table
