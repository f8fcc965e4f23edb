"""What the onboarding DAGs share: their run params (the Trigger form), their task defaults and the
name of a chunk's task.

Imported by the DAG processor with every parse of a DAG file, so it imports Airflow's `Param` and the
standard library alone; the failure callback imports the notifier only once a task has failed.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from airflow.sdk import Param

START_DATE = datetime(2026, 1, 1, tzinfo=timezone.utc)
TAGS = ["dynamics365", "b2b-onboarding"]
# A mapped chunk's name in the UI, e.g. "usrt P-000001…P-005000".
CHUNK = "{{ task.op_kwargs['legal_entity'] }} {{ task.op_kwargs['first_id'] }}…{{ task.op_kwargs['last_id'] }}"


def task_failed(context: Mapping[str, Any]) -> None:
    """The DAGs' on_failure_callback: the product's notifier logs, records and alerts the failure."""
    from b2b_onboarding.airflow.notifier import TaskFailureNotifier

    TaskFailureNotifier()(context)


# Each DAG adds its retry_delay.
DEFAULT_ARGS = {"retries": 2, "on_failure_callback": task_failed}


def run_params() -> dict[str, Param]:
    """The run params both DAGs take, each optional: its type admits null, which keeps the Trigger form
    from marking it "required". New objects on each call: a run's values are kept in its DAG's Param
    objects (`Param.resolve`), which two DAGs must not share."""
    return {
        "dry_run": Param(False, type=["null", "boolean"], title="Dry run",
                         description="Read Commerce, Sales and the state store, and log every write this run would "
                                     "make (system, operation, legal entity, prospect, what) without making any."),
        "legal_entities": Param([], type=["null", "array"], items={"type": "string"}, title="Legal entities",
                                description="Only these legal entities (dataAreaId, e.g. usrt), one per line. "
                                            "Empty: those of the connection d365_commerce."),
        "prospect_ids": Param([], type=["null", "array"], items={"type": "string", "pattern": "^[^/]+/.+$"},
                              title="Prospects (targeted rerun)",
                              description="Only these prospects, as <legal entity>/<prospect id> (e.g. usrt/P-000123), "
                                          "one per line: every step works on them alone, each read by its key (a bad "
                                          "record fixed in HQ is pulled again while it is a Pending B2B prospect). "
                                          "Empty: every prospect."),
        "chunk_size": Param(5000, type=["null", "integer"], minimum=1, title="Chunk size",
                            description="Prospects per mapped task (a chunk of leads to push or correct, or of "
                                        "Commerce writes)."),
    }  # fmt: skip
