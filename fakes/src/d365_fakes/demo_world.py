"""`python -m d365_fakes demo-world`: the fakes with a world at work in them, for
`docker compose --env-file deploy/demo.env --profile demo up` (the compose file's `fakes` service).

Serves the three fakes in a child process (as `serve` does, with a seller app registered beside the
given ones), seeds the demo's prospects in Commerce (`scenario.prospects`: Pending, two of them bad
records), then, until SIGTERM or SIGINT, plays the sellers every few seconds: each open Commerce B2B
lead in Sales is decided as the demo plans it (won, lost, disqualified, qualified, untouched), so
that the DAGs always have work. The fakes keep their state in memory: a restart seeds again.
"""

from __future__ import annotations

import json
import multiprocessing
import secrets
import signal
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from d365_fakes.clients import ClientRegistration
from d365_fakes.running import STARTUP_TIMEOUT_S, STOP_TIMEOUT_S, Endpoints, FakeAdmin
from d365_fakes.server import ENDPOINTS_FILE

SELLER_CLIENT_ID = "demo-seller"


def run(
    state_dir: Path,
    serve_options: dict[str, Any],
    prospect_count: int,
    legal_entities: tuple[str, ...],
    sellers_every_s: float,
) -> int:
    """Serve, seed, and play the sellers until SIGTERM/SIGINT; the exit code of the command."""
    from d365_fakes.actors import Seller
    from d365_fakes.scenario import play_sellers, prospects

    clients = dict(serve_options["clients"])
    if SELLER_CLIENT_ID in clients:
        print(f"d365_fakes: the client id {SELLER_CLIENT_ID} is the demo's seller; register others", file=sys.stderr)
        return 2
    # A fresh secret each start: only this process plays the seller.
    seller_app = ClientRegistration(SELLER_CLIENT_ID, secrets.token_urlsafe(24), display_name="Sales seller (demo)")
    clients[seller_app.client_id] = seller_app

    # Forked before any thread or signal handler exists here; the child serves as `serve` does.
    server = multiprocessing.get_context("fork").Process(
        target=_serve, args=({**serve_options, "clients": clients},), name="d365_fakes serve"
    )
    server.start()
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    try:
        endpoints = _wait_for_endpoints(Path(state_dir), server)
        if endpoints is None:
            return server.exitcode or 1
        rows, plan = prospects(prospect_count, legal_entities)
        with FakeAdmin(endpoints) as admin:
            admin.seed_prospects(rows)
        _say(f"seeded {len(rows)} Pending B2B prospects in {', '.join(legal_entities)}")
        seller = Seller(endpoints, seller_app.client_id, seller_app.client_secret)
        try:
            while not stop.wait(sellers_every_s):
                if not server.is_alive():
                    _say(f"the fakes stopped (exit code {server.exitcode})")
                    return server.exitcode or 1
                try:
                    decided = play_sellers(seller, plan)
                except (httpx.HTTPError, RuntimeError) as error:  # a transient failure: next round
                    _say(f"sellers could not work this round: {error}")
                    continue
                _report(decided)
        finally:
            seller.close()
        return 0
    finally:
        server.terminate()
        server.join(STOP_TIMEOUT_S)
        if server.is_alive():
            server.kill()
            server.join()


def _serve(options: dict[str, Any]) -> None:
    from d365_fakes.server import serve

    # The parent's handlers are not inherited (it installs them after the fork); serve installs its own.
    try:
        serve(**options)
    except OSError as error:
        print(f"d365_fakes: {error}", file=sys.stderr)
        sys.exit(1)


def _wait_for_endpoints(state_dir: Path, server: multiprocessing.Process) -> Endpoints | None:
    """The endpoints the child announced in `endpoints.json`; None if it stopped first."""
    path = state_dir.resolve() / ENDPOINTS_FILE
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if not server.is_alive():
            return None
        try:
            announced = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            announced = {}
        if announced.get("pid") == server.pid:  # not a file left by an earlier instance
            return Endpoints(**announced)
        time.sleep(0.1)
    _say(f"the fakes did not announce their endpoints within {STARTUP_TIMEOUT_S} s")
    return None


def _report(decided: Counter) -> None:
    acted = {decision: count for decision, count in decided.items() if decision != "untouched"}
    if acted:
        _say("sellers decided: " + ", ".join(f"{count} {decision}" for decision, count in sorted(acted.items())))


def _say(message: str) -> None:
    print(f"demo-world: {message}", flush=True)
