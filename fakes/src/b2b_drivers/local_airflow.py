"""`make airflow`: Airflow on this machine with the product and the fakes, to try the DAGs by hand
(the next step after `make demo`).

Starts the fakes (20 Pending B2B prospects seeded, two of them bad records; sellers decide each new
lead every 30 s as `make demo` plans it), then `airflow api-server`, `scheduler`, `dag-processor`
and `triggerer` (LocalExecutor, SQLite) in `.airflow/` (b2b_drivers.airflow_processes), with the
product's connections `d365_commerce` and `d365_sales` in the metadata database (Admin > Connections
shows them and can change them), `d365_state` as an `AIRFLOW_CONN_*` variable, its pools imported
and the Simple auth manager's one user `admin`. Both DAGs start paused, as in production: nothing
writes until you unpause or trigger one. Prints the URL, the login and where the logs are, and stays in the
foreground until Ctrl-C (or SIGTERM), which stops every process it started. `--check` stops once
everything is up and both DAGs are parsed (tests/b2b_drivers/test_local_airflow.py, in `make test`).

Each start is a new world: the fakes keep theirs in memory, so Airflow's metadata database, the
state store and the logs start empty with it (a connection changed in the UI too). Only the admin's
password is kept.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import socket
import sys
import time
from collections import Counter
from contextlib import ExitStack
from pathlib import Path

import httpx

from b2b_drivers.airflow_processes import (
    DAG_IDS,
    LEGAL_ENTITIES,
    PASSWORD_FILE,
    ROOT,
    USERNAME,
    AirflowFailed,
    AirflowProcesses,
    admin_password,
    environment,
    split_connections,
)
from d365_fakes.actors import Seller
from d365_fakes.running import FakeAdmin, FakesFailedToStart, running_fakes
from d365_fakes.scenario import Cast, airflow_connections, play_sellers, prospects

SERVICES = ("api-server", "scheduler", "dag-processor", "triggerer")  # started in this order, stopped in the reverse
# Kept in Airflow's metadata database, where Admin > Connections shows them and can edit them; d365_state,
# this start's SQLite file, stays an AIRFLOW_CONN_* variable.
CONNECTIONS_IN_DATABASE = ("d365_commerce", "d365_sales")
PROSPECTS = 20
SELLERS_EVERY_S = 30


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m b2b_drivers.local_airflow",
        description="Airflow (api-server, scheduler, dag-processor, triggerer) with the product and the fakes, "
        "in the foreground until Ctrl-C.",
    )
    parser.add_argument(
        "--home", type=Path, default=ROOT / ".airflow",
        help="AIRFLOW_HOME: metadata database, state store, the fakes, logs (default: .airflow)",
    )  # fmt: skip
    parser.add_argument("--port", type=int, default=8080, help="the api-server's port on 127.0.0.1 (default: 8080)")
    parser.add_argument("--check", action="store_true", help="stop once everything is up and both DAGs are parsed")
    args = parser.parse_args(argv)
    if not _port_free(args.port):
        parser.error(f"port {args.port} is in use (another `make airflow`?): choose another, "
                     f"make airflow AIRFLOW_ARGS='--port {args.port + 1}'")  # fmt: skip
    home = args.home.resolve()
    # SIGINT too: a script's background job inherits it ignored.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _interrupted)
    try:
        with ExitStack() as stack:
            airflow, seller, plan = _start(stack, home, args.port)
            if args.check:
                print("--check: everything is up; stopping.", flush=True)
            else:
                _serve_until_interrupted(airflow, seller, plan)
    except KeyboardInterrupt:
        pass
    except (AirflowFailed, FakesFailedToStart) as error:
        print(f"make airflow failed: {error}", file=sys.stderr)
        return 1
    print("Stopped: Airflow and the fakes.")
    return 0


def _start(stack: ExitStack, home: Path, port: int) -> tuple[AirflowProcesses, Seller, dict]:
    """The fakes with their world, then Airflow; stopped by `stack`, also when starting fails half-way."""
    _new_world(home)
    cast = Cast.new()
    print("Starting the fakes (Entra ID, Commerce, Dataverse)", flush=True)
    endpoints = stack.enter_context(running_fakes(home / "fakes", cast.clients))
    rows, plan = prospects(PROSPECTS, tuple(LEGAL_ENTITIES))
    with FakeAdmin(endpoints) as admin:
        admin.seed_prospects(rows)
    seller = Seller(endpoints, cast.seller["client_id"], cast.seller["client_secret"])
    stack.callback(seller.close)

    base_url = f"http://127.0.0.1:{port}"
    password = admin_password(home)
    connections = airflow_connections(endpoints, cast, LEGAL_ENTITIES, home / "state.db")
    variables, in_database = split_connections(connections, CONNECTIONS_IN_DATABASE)
    airflow = AirflowProcesses(home, environment(home, port, variables), base_url, password)
    stack.callback(_stop, airflow)
    print("Migrating Airflow's metadata database, importing the pools and connections", flush=True)
    airflow.set_up_database(in_database)
    print(f"Starting airflow {', '.join(SERVICES)}, waiting until they are healthy and the DAGs parsed", flush=True)
    for name in SERVICES:
        airflow.start_process(name)
    airflow.wait_until_ready()
    seeded = f"{len(rows)} Pending B2B prospects in {', '.join(LEGAL_ENTITIES)}"
    print(f"""
Airflow is up: {base_url}
  login  {USERNAME} / {password}   (kept in {_shown(home / PASSWORD_FILE)})
  DAGs   {', '.join(DAG_IDS)}, paused: a triggered run waits (queued) until its
         DAG is unpaused, by its toggle or the Trigger form's "Unpause ... on trigger" (ticked by default).
         Unpaused, a DAG also makes its latest scheduled run at once (a real one), then runs on schedule:
         event-driven (the triggerer watches HQ and Dataverse every 30 s): the sync when HQ's Pending
         prospects change (and hourly), b2b_outcomes when sellers decide, the reconciliation at 02:00 UTC
         (b2b_preflight only by hand). AIRFLOW__D365_B2B_ONBOARDING__SCHEDULING=time: the crons instead.
         Trigger b2b_preflight first (it only reads), then the sync with dry_run.
  fakes  {seeded} (two bad records); sellers decide new leads every {SELLERS_EVERY_S} s.
  conns  {', '.join(CONNECTIONS_IN_DATABASE)} under Admin > Connections (change them there);
         d365_state, the state store ({_shown(home / 'state.db')}), as AIRFLOW_CONN_D365_STATE.
  pages  Browse > B2B onboarding: the prospects as the state store has them.
  logs   {_shown(home / 'services')}/<{'|'.join(SERVICES)}>.log, tasks in {_shown(home / 'logs')}/,
         the fakes in {_shown(home / 'fakes')}/
Ctrl-C stops everything.
""", flush=True)  # fmt: skip
    return airflow, seller, plan


def _serve_until_interrupted(airflow: AirflowProcesses, seller: Seller, plan: dict) -> None:
    """The sellers' rounds, as `demo-world` plays them, while every Airflow process lives."""
    while True:
        time.sleep(SELLERS_EVERY_S)
        airflow.check_alive()
        try:
            decided = play_sellers(seller, plan)
        except (httpx.HTTPError, RuntimeError) as error:  # a transient failure: next round
            print(f"sellers could not work this round: {error}", flush=True)
            continue
        _report(decided)


def _report(decided: Counter) -> None:
    acted = {decision: count for decision, count in decided.items() if decision != "untouched"}
    if acted:
        print("sellers decided: " + ", ".join(f"{count} {decision}" for decision, count in sorted(acted.items())),
              flush=True)  # fmt: skip


def _new_world(home: Path) -> None:
    """Drops what an earlier start left (metadata database, state store, fakes, logs), but the password."""
    home.mkdir(parents=True, exist_ok=True)
    for path in [*home.glob("airflow.db*"), *home.glob("state.db*")]:
        path.unlink()
    for name in ("fakes", "logs", "services"):
        shutil.rmtree(home / name, ignore_errors=True)


def _port_free(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _shown(path: Path) -> str:
    """`path` as the user typed from the repository (`make airflow`), else in full."""
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)


def _stop(airflow: AirflowProcesses) -> None:
    """Every Airflow process; a second Ctrl-C does not cut this short."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    airflow.stop_all()


def _interrupted(signum: int, frame: object) -> None:
    """Ctrl-C and SIGTERM stop everything the same way."""
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
