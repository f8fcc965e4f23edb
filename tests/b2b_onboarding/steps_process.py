"""Runs steps of the flow in a process of its own, as an Airflow worker would, so that a test can
SIGKILL it mid-write or run two at once. Connections come in the environment variable
`STEPS_CONNECTIONS` (JSON: commerce, sales, state_url), never on the command line.

    python steps_process.py sync            # pull and push usrt
    python steps_process.py reconcile       # read outcomes, customers, approvals, rejections
"""

from __future__ import annotations

import json
import os
import sys

from b2b_onboarding.clients.commerce import CommerceClient
from b2b_onboarding.clients.sales import SalesClient
from b2b_onboarding.clients.settings import ServiceSettings
from b2b_onboarding.flow import reconcile, sync
from b2b_onboarding.store.state import StateStore
from d365_fakes.scenario import CUSTOMER_GROUP

LEGAL_ENTITY = "usrt"


def main(step: str, run_id: str) -> None:
    connections = json.loads(os.environ["STEPS_CONNECTIONS"])
    commerce = CommerceClient.connect(ServiceSettings.model_validate(connections["commerce"]))
    sales = SalesClient.connect(ServiceSettings.model_validate(connections["sales"]))
    store = StateStore(connections["state_url"])
    if step == "sync":
        sync.pull_prospects(commerce, store, LEGAL_ENTITY, run_id)
        sync.push_leads(sales, store, LEGAL_ENTITY, run_id)
    elif step == "reconcile":
        reconcile.read_outcomes(sales, store, run_id)
        reconcile.write_customers(commerce, sales, store, LEGAL_ENTITY, run_id, CUSTOMER_GROUP)
        reconcile.approve_won(commerce, store, LEGAL_ENTITY, run_id)
        reconcile.reject_lost(commerce, store, LEGAL_ENTITY, run_id)
    else:
        raise SystemExit(f"unknown step {step!r}: sync or reconcile")


if __name__ == "__main__":
    main(*sys.argv[1:3])
