"""`make airflow` (`python -m b2b_drivers.local_airflow`): with `--check` it starts the fakes and Airflow,
waits until every process is healthy and both DAGs are parsed, prints the login, and stops everything.
In `make test`, so that the README's "Try it locally" keeps working."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def processes_of(home: Path) -> list[str]:
    """The command lines of the running processes whose AIRFLOW_HOME is `home`."""
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if f"AIRFLOW_HOME={home}\0".encode() in environ.read_bytes():
                found.append((environ.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode())
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


def test_check_starts_airflow_and_the_fakes_prints_the_login_and_stops_them(tmp_path: Path) -> None:
    home = tmp_path / "airflow"
    home.mkdir()
    # What an earlier start left: its password stays, its state store goes with its fakes' world.
    (home / "simple_auth_manager_passwords.json").write_text(json.dumps({"admin": "kept-from-last-time"}))
    (home / "state.db").write_text("an earlier world")
    port = free_port()
    # As `make airflow` runs it, yet from another directory and without PYTHONPATH: the venv finds the
    # package through the .pth file `make install` writes.
    env = {name: value for name, value in os.environ.items() if name != "PYTHONPATH"}

    done = subprocess.run(
        [sys.executable, "-m", "b2b_drivers.local_airflow", "--home", str(home), "--port", str(port), "--check"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip

    assert done.returncode == 0, done.stdout + done.stderr
    assert f"Airflow is up: http://127.0.0.1:{port}\n" in done.stdout
    assert "login  admin / kept-from-last-time " in done.stdout  # the check logged in with it
    assert "b2b_prospect_sync, b2b_outcomes, b2b_outcome_reconciliation, paused" in done.stdout
    assert "20 Pending B2B prospects in usrt, usmf" in done.stdout
    assert done.stdout.endswith("Stopped: Airflow and the fakes.\n")
    assert not (home / "state.db").exists()
    # Where Admin > Connections shows them and can change them; the state store stays a variable.
    metadata = sqlite3.connect(home / "airflow.db")
    in_database = metadata.execute("SELECT conn_id FROM connection ORDER BY conn_id").fetchall()
    metadata.close()
    assert in_database == [("d365_commerce",), ("d365_sales",)]
    for name in ("api-server", "scheduler", "dag-processor", "triggerer"):
        assert (home / "services" / f"{name}.log").stat().st_size
    assert processes_of(home) == []
    assert not (home / "fakes" / "endpoints.json").exists()  # the fakes remove it when they stop
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5)
