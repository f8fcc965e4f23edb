"""The tables a run logs: what each step did, and where every prospect stands."""

from __future__ import annotations

from collections.abc import Iterable

import pandas as pd

from .rules import Stage


def run_table(results: Iterable[dict]) -> pd.DataFrame:
    """One row per step and legal entity (its chunks summed; peak memory the largest), one column
    per outcome count."""
    frame = pd.DataFrame.from_records(list(results))
    if frame.empty:
        return frame
    frame = frame.fillna(0)
    how = {name: "max" if name == "peak_rss_mb" else "sum" for name in frame.columns if name not in _KEYS}
    table = frame.groupby(_KEYS, sort=False).agg(how)
    whole = [name for name in table.columns if (table[name] % 1 == 0).all()]
    return table.astype({name: int for name in whole})


_KEYS = ["step", "legal_entity"]


def stage_counts(tracked: pd.DataFrame) -> pd.DataFrame:
    """Prospects per legal entity and stage, stages in flow order, with a total row."""
    order = [stage.value for stage in Stage]
    table = pd.crosstab(tracked["legal_entity"], pd.Categorical(tracked["stage"], categories=order))
    table = table.loc[:, (table != 0).any(axis=0)]
    table.loc["total"] = table.sum()
    table.columns.name = None
    table.index.name = "legal_entity"
    return table
