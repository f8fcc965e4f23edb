"""`[core] hostname_callable` of the test's Celery workers (tests/distributed/conftest.py).

A task process records `hostname_callable()` as its TaskInstance's `hostname` when it starts
(the Task SDK's `TIEnterRunningPayload`). Two workers on one machine share the machine's name, so
each worker is started with its own `B2B_E2E_WORKER` and its task processes, which inherit the
worker's environment and nothing else, report it: the REST API then tells which worker ran a task.
"""

from __future__ import annotations

import os


def hostname() -> str:
    return os.environ["B2B_E2E_WORKER"]
