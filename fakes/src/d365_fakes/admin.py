"""The `/_admin` surface: seed, inspect and reset the fakes' state (demo and tests only).

It has no authentication; that is acceptable only because it answers loopback callers only
(`loopback_callers_only`), also when the fakes listen on 0.0.0.0 in a container.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.responses import JSONResponse

from d365_fakes.faults import FaultPlan
from d365_fakes.tokens import TokenIssuer


class CommerceAdmin(Protocol):
    outbox: list[dict[str, Any]]

    def reset(self) -> None: ...
    def seed_prospects(self, rows: list[dict[str, Any]]) -> int: ...
    def counts(self) -> dict[str, Any]: ...


class DataverseAdmin(Protocol):
    def reset(self) -> None: ...
    def counts(self) -> dict[str, Any]: ...
    def add_rejection(self, entity_set: Any, column: Any, value: Any, message: Any = None) -> None: ...
    def clear_rejections(self) -> None: ...
    def apply_decisions(self, decisions: Any, as_client_id: Any = None) -> dict[str, Any]: ...
    def seed_companies(self, codes: Any) -> int: ...


def loopback_callers_only(request: Request) -> None:
    """A route dependency: 403 for a caller that is not on this machine's loopback."""
    caller = request.client.host if request.client else ""
    try:
        loopback = ipaddress.ip_address(caller).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise HTTPException(403, f"the admin surface answers loopback callers only, not {caller or 'unknown'}")


def create_admin_router(
    commerce_state: CommerceAdmin,
    dataverse_state: DataverseAdmin,
    issuer: TokenIssuer,
    faults: FaultPlan,
    also_reset: Sequence[Callable[[], None]] = (),
) -> APIRouter:
    """`also_reset`: what else `/reset` puts back as the fakes started (e.g. the tenant's security)."""
    router = APIRouter()

    @router.post("/reset", status_code=204)
    async def reset() -> Response:
        commerce_state.reset()
        dataverse_state.reset()
        issuer.reset_counts()
        issuer.clear_revocations()
        issuer.clock.reset()
        faults.clear()
        for undo in also_reset:
            undo()
        return Response(status_code=204)

    @router.post("/faults", status_code=204)
    async def add_fault(request: Request) -> Response:
        try:
            body = json.loads(await request.body())
        except ValueError as error:
            return _bad_request(f"the body is not JSON: {error}")
        try:
            faults.add_fields(body)
        except ValueError as error:
            return _bad_request(str(error))
        return Response(status_code=204)

    @router.get("/faults")
    async def fault_report() -> dict[str, Any]:
        return faults.report()

    @router.delete("/faults", status_code=204)
    async def clear_faults() -> Response:
        faults.clear()
        return Response(status_code=204)

    @router.post("/tokens/revoke", status_code=204)
    async def revoke_tokens(request: Request) -> Response:
        try:
            # No body at all revokes every client's tokens, as `{}` does.
            body = await _json_object(request, ("client_id",)) if (await request.body()).strip() else {}
        except ValueError as error:
            return _bad_request(str(error))
        client_id = body.get("client_id")
        if client_id is not None and (not isinstance(client_id, str) or not client_id):
            return _bad_request(f"client_id must be a client id (a non-empty string), got {client_id!r}")
        issuer.revoke(client_id)
        return Response(status_code=204)

    @router.post("/commerce/prospects")
    async def seed_prospects(request: Request) -> JSONResponse:
        try:
            body = json.loads(await request.body())
        except ValueError as error:
            return _bad_request(f"the body is not JSON: {error}")
        if not isinstance(body, dict) or not isinstance(body.get("prospects"), list):
            return _bad_request('the body must be {"prospects": [ {...}, ... ]}')
        try:
            created = commerce_state.seed_prospects(body["prospects"])
        except ValueError as error:
            return _bad_request(str(error))
        # Their legal entities in Dataverse, as dual-write's legal-entity map made them at setup:
        # leads of these companies can then bind msdyn_company.
        dataverse_state.seed_companies(sorted({str(row["dataAreaId"]) for row in body["prospects"]}))
        return JSONResponse({"created": created})

    @router.get("/commerce/outbox")
    async def outbox() -> dict[str, Any]:
        return {"emails": list(commerce_state.outbox)}

    @router.post("/dataverse/rejections", status_code=204)
    async def add_rejection(request: Request) -> Response:
        try:
            body = await _json_object(request, ("entity_set", "column", "value", "message"))
            dataverse_state.add_rejection(
                body.get("entity_set"), body.get("column"), body.get("value"), body.get("message")
            )
        except ValueError as error:
            return _bad_request(str(error))
        return Response(status_code=204)

    @router.delete("/dataverse/rejections", status_code=204)
    async def clear_rejections() -> Response:
        dataverse_state.clear_rejections()
        return Response(status_code=204)

    @router.post("/dataverse/companies")
    async def seed_companies(request: Request) -> JSONResponse:
        try:
            body = await _json_object(request, ("codes",))
            created = dataverse_state.seed_companies(body.get("codes"))
        except ValueError as error:
            return _bad_request(str(error))
        return JSONResponse({"created": created})

    @router.post("/dataverse/decisions")
    async def apply_decisions(request: Request) -> JSONResponse:
        try:
            body = await _json_object(request, ("decisions", "as_client_id"))
            decisions, as_client_id = body.get("decisions"), body.get("as_client_id")
            result = dataverse_state.apply_decisions(decisions, as_client_id)
        except ValueError as error:
            return _bad_request(str(error))
        return JSONResponse(result)

    @router.get("/counts")
    async def counts() -> dict[str, Any]:
        return {
            "commerce": commerce_state.counts(),
            "dataverse": dataverse_state.counts(),
            "entra": {"tokens_issued": issuer.tokens_issued},
        }

    return router


async def _json_object(request: Request, fields: tuple[str, ...]) -> dict[str, Any]:
    """The body as a JSON object of (some of) `fields`; ValueError saying what is wrong."""
    try:
        body = json.loads(await request.body())
    except ValueError as error:
        raise ValueError(f"the body is not JSON: {error}") from None
    if not isinstance(body, dict):
        raise ValueError(f"the body must be a JSON object with {', '.join(fields)}")
    unknown = sorted(set(body) - set(fields))
    if unknown:
        raise ValueError(f"unknown field(s): {', '.join(unknown)}")
    return body


def _bad_request(message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=400)
