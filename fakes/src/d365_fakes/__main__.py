"""Command line: `python -m d365_fakes serve [options]`, and `python -m d365_fakes demo-world [options]`
(the fakes with prospects seeded and sellers at work, for the compose demo:
`docker compose --env-file deploy/demo.env --profile demo up`)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import uuid
from pathlib import Path
from typing import Any

from d365_fakes.clients import load_clients
from d365_fakes.faults import RULE_FIELDS, FaultPlan
from d365_fakes.listen import ANY_ADDRESS, LOOPBACK, check_listen_address

CLIENTS_ENV = "D365_FAKES_CLIENTS"
MIN_DEMO_PROSPECTS = 10  # the demo's story makes its 4th and 9th prospects bad records


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
    _add_serve_arguments(serve_parser)
    world_parser = commands.add_parser(
        "demo-world",
        help="serve the fakes, seed the demo's Pending prospects, and play the sellers",
        description="Serves the fakes as `serve` does (same options) with a seller app added, seeds "
        "the demo's prospects in Commerce once, then every --sellers-every-s seconds decides the open "
        "Commerce B2B leads in Sales as the demo plans them (won, lost, disqualified, qualified, "
        "untouched), until SIGTERM/SIGINT.",
    )
    _add_serve_arguments(world_parser)
    world_parser.add_argument(
        "--prospects", type=int, default=50, help="prospects to seed, at least 10 (default: 50, as make demo)"
    )
    world_parser.add_argument(
        "--legal-entities",
        default="usrt,usmf",
        help="comma-separated dataAreaIds to seed (default: usrt,usmf)",
    )
    world_parser.add_argument(
        "--sellers-every-s",
        type=float,
        default=30,
        help="how often the sellers work their open leads (default: 30)",
    )
    args = parser.parse_args(argv)
    serve_options = _serve_options(parser, args)
    if args.command == "demo-world":
        from d365_fakes import demo_world

        legal_entities = tuple(part.strip() for part in args.legal_entities.split(",") if part.strip())
        if args.prospects < MIN_DEMO_PROSPECTS or not legal_entities or args.sellers_every_s <= 0:
            parser.error(f"--prospects must be at least {MIN_DEMO_PROSPECTS}, --sellers-every-s positive, "
                         "--legal-entities not empty")
        return demo_world.run(
            args.state_dir, serve_options, args.prospects, legal_entities, args.sellers_every_s
        )
    return _serve(serve_options)


def _add_serve_arguments(serve_parser: argparse.ArgumentParser) -> None:
    serve_parser.add_argument(
        "--state-dir",
        type=Path,
        default=Path(".fakes"),
        help="where the CA, keys, tenant id and endpoints.json live (default: .fakes)",
    )
    serve_parser.add_argument(
        "--host",
        default=LOOPBACK,
        help="the IPv4 address to listen on: a loopback one, or 0.0.0.0 in a container "
        "(default: 127.0.0.1). The admin surface answers loopback callers only.",
    )
    serve_parser.add_argument(
        "--public-host",
        help="the host name clients use (in every URL, token audience and the certificate), e.g. "
        "the compose service name (default: --host; required with --host 0.0.0.0)",
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
    serve_parser.add_argument(
        "--delta-token-ttl-s",
        type=float,
        default=604_800,
        help="how long a Dataverse delta link stays valid, in seconds (default: 604800, 7 days)",
    )
    _add_limit_arguments(serve_parser)
    _add_fault_arguments(serve_parser)


def _serve_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of `server.serve`, checked; exits through `parser.error` otherwise."""
    try:
        check_listen_address(args.host)
    except ValueError as error:
        parser.error(f"--host {error}")
    if args.host == ANY_ADDRESS and not args.public_host:
        parser.error(f"--public-host is required with --host {ANY_ADDRESS}: clients cannot reach {ANY_ADDRESS}")
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
    if not args.delta_token_ttl_s > 0:
        parser.error("--delta-token-ttl-s must be more than 0")
    faults = FaultPlan(seed=args.fault_seed)
    for rule in args.fault:
        try:
            fields = json.loads(rule)
        except ValueError as error:
            parser.error(f"--fault {rule}: not JSON ({error})")
        try:
            faults.add_fields(fields)
        except ValueError as error:
            parser.error(f"--fault {rule}: {error}")

    # After the argument checks: the servers import FastAPI.
    from d365_fakes.limits import Limits

    try:
        limits = Limits(
            enabled=args.limits == "on",
            latency_ms=args.latency_ms,
            dataverse_requests=args.dataverse_requests,
            dataverse_window_s=args.dataverse_window_s,
            dataverse_execution_s=args.dataverse_execution_s,
            dataverse_concurrent=args.dataverse_concurrent,
            commerce_requests=args.commerce_requests,
            commerce_window_s=args.commerce_window_s,
        )
    except ValueError as error:
        field, _, reason = str(error).partition(" ")
        parser.error(f"--{field.replace('_', '-')} {reason}")

    return {
        "state_dir": args.state_dir,
        "entra_port": args.entra_port,
        "commerce_port": args.commerce_port,
        "dataverse_port": args.dataverse_port,
        "clients": clients,
        "commerce_page_size": args.commerce_page_size,
        "tenant_id": args.tenant_id,
        "limits": limits,
        "delta_token_ttl_s": args.delta_token_ttl_s,
        "faults": faults,
        "host": args.host,
        "public_host": args.public_host,
    }


def _serve(options: dict[str, Any]) -> int:
    from d365_fakes.server import serve

    try:
        serve(**options)
    except OSError as error:
        print(f"d365_fakes: {error}", file=sys.stderr)
        return 1
    return 0


def _add_limit_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "service protection",
        "Per-caller limits over a sliding window, answered with 429 and Retry-After (0 = no limit). "
        "Change them at runtime with POST /_admin/limits.",
    )
    group.add_argument(
        "--limits", choices=("on", "off"), default="on", help="off: no 429s at all (default: on)"
    )
    group.add_argument(
        "--latency-ms",
        type=float,
        default=0,
        help="added to every Commerce and Dataverse OData request (default: 0)",
    )
    group.add_argument("--dataverse-requests", type=int, default=6000, help="default: 6000")
    group.add_argument("--dataverse-window-s", type=float, default=300, help="default: 300")
    group.add_argument(
        "--dataverse-execution-s",
        type=float,
        default=1200,
        help="handler time per window (default: 1200)",
    )
    group.add_argument("--dataverse-concurrent", type=int, default=52, help="default: 52")
    group.add_argument(
        "--commerce-requests", type=int, default=0, help="per window (default: 0, HQ's are optional)"
    )
    group.add_argument("--commerce-window-s", type=float, default=300, help="default: 300")


def _add_fault_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "fault injection",
        "Rules checked in order on every request; the first that fires wins. Change them at runtime "
        "with POST/GET/DELETE /_admin/faults (POST /_admin/reset drops them too).",
    )
    group.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="JSON",
        help=f"a rule as a JSON object of {', '.join(RULE_FIELDS)}, e.g. "
        '\'{"system": "dataverse", "kind": "reset", "route": "UpsertMultiple", "share": 0.1}\' '
        "(repeatable)",
    )
    group.add_argument(
        "--fault-seed",
        type=int,
        default=0,
        help="seeds the draws of rules with a share, so a run is repeatable (default: 0)",
    )


def _tenant_id(value: str) -> str:
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a GUID: {value!r}") from None


if __name__ == "__main__":
    sys.exit(main())
