"""Command line: `python -m d365_fakes serve [options]`."""

from __future__ import annotations

import argparse
import os
import sys
import uuid
from pathlib import Path

from d365_fakes.clients import load_clients

CLIENTS_ENV = "D365_FAKES_CLIENTS"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m d365_fakes",
        description="Local HTTPS fakes of Entra ID, Commerce headquarters OData and Dataverse.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve_parser = commands.add_parser(
        "serve",
        help="serve the three fakes until SIGTERM/SIGINT",
        description="Prints one JSON line of endpoints to stdout once all three are serving.",
    )
    serve_parser.add_argument(
        "--state-dir",
        type=Path,
        default=Path(".fakes"),
        help="where the CA, keys, tenant id and endpoints.json live (default: .fakes)",
    )
    for service, port in (("entra", 8441), ("commerce", 8442), ("dataverse", 8443)):
        serve_parser.add_argument(
            f"--{service}-port", type=int, default=port, help=f"default {port}; 0 = any free port"
        )
    serve_parser.add_argument(
        "--clients",
        help=f"JSON file of app registrations (default: ${CLIENTS_ENV}, a path or inline JSON)",
    )
    serve_parser.add_argument(
        "--commerce-page-size",
        type=int,
        default=10_000,
        help="rows per Commerce OData page (default: 10000, as in F&O)",
    )
    serve_parser.add_argument(
        "--tenant-id",
        type=_tenant_id,
        help="a GUID (default: one created once and kept in the state dir)",
    )
    args = parser.parse_args(argv)

    clients_source = args.clients or os.environ.get(CLIENTS_ENV)
    if not clients_source:
        parser.error(
            f"no app registrations: pass --clients FILE or set {CLIENTS_ENV} to a file path or "
            'inline JSON, e.g. [{"client_id": "...", "client_secret": "..."}]'
        )
    try:
        clients = load_clients(clients_source)
    except (OSError, ValueError) as error:
        parser.error(f"cannot load app registrations: {error}")
    if args.commerce_page_size < 1:
        parser.error("--commerce-page-size must be at least 1")

    from d365_fakes.server import serve  # after argument checks: the servers import FastAPI

    try:
        serve(
            state_dir=args.state_dir,
            entra_port=args.entra_port,
            commerce_port=args.commerce_port,
            dataverse_port=args.dataverse_port,
            clients=clients,
            commerce_page_size=args.commerce_page_size,
            tenant_id=args.tenant_id,
        )
    except OSError as error:
        print(f"d365_fakes: {error}", file=sys.stderr)
        return 1
    return 0


def _tenant_id(value: str) -> str:
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a GUID: {value!r}") from None


if __name__ == "__main__":
    sys.exit(main())
