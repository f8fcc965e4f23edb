"""The DAGs' schedules, as `[d365_b2b_onboarding] scheduling` chooses them (provider_info.CONFIG).

- `events` (default): the triggerer watches the systems (airflow/triggers.py) and an asset event
  starts a run as soon as there is work: `b2b_prospect_sync` on asset `b2b_pending_prospects`, or
  hourly as a safety net; `b2b_outcomes` on asset `b2b_seller_outcomes`.
- `time`: both on their crons (`sync_schedule`, `outcomes_schedule`, every 15 minutes by default).
`b2b_outcome_reconciliation` runs on `reconciliation_schedule` (02:00 UTC) in both modes.

Read when a DAG file is parsed: imports only `airflow.sdk`, the triggers module (light itself) and
the standard library.
"""

from __future__ import annotations

from typing import Any

from airflow.sdk import Asset, AssetOrTimeSchedule, AssetWatcher, CronTriggerTimetable, conf

from b2b_onboarding.airflow.triggers import PendingProspectsTrigger, SellerOutcomesTrigger

SECTION = "d365_b2b_onboarding"
MODES = ("events", "time")
DEFAULT_POLL_INTERVAL_S = 30.0
DEFAULT_CRON = "*/15 * * * *"
DEFAULT_RECONCILIATION_CRON = "0 2 * * *"
# Events mode still runs the sync this often: a missed event (a triggerer down) waits an hour at most.
SAFETY_NET_CRON = "0 * * * *"
PENDING_PROSPECTS = "b2b_pending_prospects"
SELLER_OUTCOMES = "b2b_seller_outcomes"


def _option(name: str, default: str) -> str:
    return str(conf.get(SECTION, name, fallback=default)).strip() or default


def mode() -> str:
    """`events` or `time`; any other value fails the DAG file's parse, naming the option."""
    chosen = _option("scheduling", "events")
    if chosen.lower() not in MODES:
        raise ValueError(
            f"[{SECTION}] scheduling = {chosen!r} is not a scheduling mode: set it (airflow.cfg, or "
            f"AIRFLOW__{SECTION.upper()}__SCHEDULING) to one of {', '.join(MODES)}."
        )
    return chosen.lower()


def poll_interval_s() -> float:
    """Seconds between two looks of each trigger."""
    text = _option("poll_interval_s", str(DEFAULT_POLL_INTERVAL_S))
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise ValueError(f"[{SECTION}] poll_interval_s = {text!r} is not a number of seconds above 0: set it, e.g. 30.")
    return value


def sync_schedule() -> Any:
    """`b2b_prospect_sync`: on a change of the Pending prospects in HQ, or hourly; in time mode its cron."""
    if mode() == "time":
        return _option("sync_schedule", DEFAULT_CRON)
    watcher = AssetWatcher(name="b2b_pending_prospects_watcher",
                           trigger=PendingProspectsTrigger(poll_interval_s=poll_interval_s()))  # fmt: skip
    return AssetOrTimeSchedule(timetable=CronTriggerTimetable(SAFETY_NET_CRON, timezone="UTC"),
                               assets=Asset(PENDING_PROSPECTS, watchers=[watcher]))  # fmt: skip


def outcomes_schedule() -> Any:
    """`b2b_outcomes`: on a change of leads or opportunities in Dataverse; in time mode its cron."""
    if mode() == "time":
        return _option("outcomes_schedule", DEFAULT_CRON)
    watcher = AssetWatcher(name="b2b_seller_outcomes_watcher",
                           trigger=SellerOutcomesTrigger(poll_interval_s=poll_interval_s()))  # fmt: skip
    return Asset(SELLER_OUTCOMES, watchers=[watcher])


def reconciliation_schedule() -> str:
    """`b2b_outcome_reconciliation`: nightly in both modes."""
    return _option("reconciliation_schedule", DEFAULT_RECONCILIATION_CRON)
