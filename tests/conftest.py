"""Airflow runs against a throwaway home (SQLite metadata DB) so tests never touch a real one."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from b2b_onboarding.airflow.pools import POOLS_FILE

REPO = Path(__file__).resolve().parent.parent
DAGS = REPO / "dags"

# Before anything imports Airflow: its configuration is read once, at import.
os.environ["AIRFLOW_HOME"] = tempfile.mkdtemp(prefix="b2b-tests-airflow-")
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(DAGS)
os.environ["AIRFLOW__CORE__PLUGINS_FOLDER"] = str(REPO / "plugins")
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"


@pytest.fixture(scope="session")
def airflow_db() -> Path:
    """A migrated metadata database for `dag.test()`."""
    subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], check=True, capture_output=True)
    subprocess.run([sys.executable, "-m", "airflow", "pools", "import", str(POOLS_FILE)], check=True, capture_output=True)
    return Path(os.environ["AIRFLOW_HOME"])
