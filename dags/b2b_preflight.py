"""
### B2B preflight

Run by hand before the first run on a tenant, and after any change to it (a new app registration,
security role, solution or legal entity): every check of what the flow needs that can be made by
reading alone, against the connections `d365_commerce` and `d365_sales`. Writes nothing (so HQ's
write access, which HQ shows only by answering a write, is left to the first run).

The log shows one row per check: the check, the system, ✓ / ✗ / – (not checked: a check it
depends on failed), what was found, and the next step. The run is red when any check failed, its
first line naming them. The same checks from a shell: `python -m b2b_onboarding.flow.preflight`.
"""

from __future__ import annotations

from airflow.sdk import dag, task

from b2b_onboarding.airflow.params import START_DATE, TAGS


@dag(
    schedule=None,
    start_date=START_DATE,
    catchup=False,
    max_active_runs=1,
    tags=TAGS,
    doc_md=__doc__,
)
def b2b_preflight():
    # Its one task is the run's verdict; a retry would read the same tenant again, and whoever
    # triggered it reads the table (no alert).
    @task(retries=0)
    def preflight() -> None:
        from b2b_onboarding.airflow import tasks

        tasks.run_preflight()

    preflight()


b2b_preflight()
