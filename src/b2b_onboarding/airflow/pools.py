"""The pools the DAGs' tasks run in (pools.json, shipped in the package). A deployment imports them
once, as compose's airflow-init does:

    airflow pools import "$(python -m b2b_onboarding.airflow.pools)"
"""

from __future__ import annotations

from pathlib import Path

POOLS_FILE = Path(__file__).with_name("pools.json")

if __name__ == "__main__":
    print(POOLS_FILE)
