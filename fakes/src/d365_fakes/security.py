"""Security of the fake tenant: which app registration has a user in Dataverse and in Commerce
headquarters, and what its security roles let it do there.

Dataverse: an application user per app registration, security roles made of privileges named
`prv<Read|Create|Write|Append|AppendTo|Delete><entity>` at Global depth; a request the roles do not
cover is refused with 0x80040220 naming the missing privilege. HQ (finance and operations): the
app's row in "Microsoft Entra applications" maps it to a user; roles are made of duties, duties of
privileges that grant an access level (Read, Create, Update, Delete) on a data entity.

The roles below are the tenant's definitions; `TenantSecurity` holds who has which, and what an
admin took away (`/_admin/security`), until `/_admin/reset`.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from types import ModuleType
from typing import TYPE_CHECKING, Any, Protocol

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

if TYPE_CHECKING:  # both import this module (tokens through clients)
    from d365_fakes.dataverse import DataverseState
    from d365_fakes.tokens import ServiceClock

DATAVERSE = "dataverse"
COMMERCE = "commerce"
SYSTEMS = (DATAVERSE, COMMERCE)

_IDS = uuid.uuid5(uuid.NAMESPACE_URL, "d365-fakes/security")

# Dataverse: each table's name as privilege names spell it (not always its schema name: systemuser's
# privileges are prv...User, savedquery's prv...Query) and its object type code, as messages show it.
_DATAVERSE_ENTITIES = {
    "lead": ("Lead", 4),
    "account": ("Account", 1),
    "contact": ("Contact", 2),
    "opportunity": ("Opportunity", 3),
    "opportunityclose": ("OpportunityClose", 4208),
    "systemuser": ("User", 8),
    "savedquery": ("Query", 1039),
    "cdm_company": ("cdm_Company", 10012),  # a solution's table: its code is the org's own (>= 10000)
}
DATAVERSE_ACCESS = ("Read", "Create", "Write", "Append", "AppendTo", "Delete")
# privilege name -> the table it is on, for messages
_PRIVILEGE_TABLES = {
    f"prv{access}{entity}": logical_name
    for logical_name, (entity, _) in _DATAVERSE_ENTITIES.items()
    for access in DATAVERSE_ACCESS
}


def dataverse_privilege(access: str, logical_name: str) -> str:
    """Dataverse's name of a table privilege, e.g. ("Create", "lead") -> prvCreateLead."""
    return f"prv{access}{_DATAVERSE_ENTITIES[logical_name][0]}"


def privilege_id(name: str) -> str:
    """A privilege's id: fixed per name, as a privilege's id is the same in every organization."""
    return str(uuid.uuid5(_IDS, "privilege/" + name))


# HQ: data entities (by public collection name) and the access levels a privilege grants on one.
HQ_ENTITIES = (
    "Prospects",
    "CustomersV3",
    "CustomerHiearchies",
    "CustomerHierarchyNodes",
    "LegalEntities",
    "CustomerGroups",
)
HQ_ACCESS = ("Read", "Create", "Update", "Delete")


def hq_privilege(access: str, entity_set: str) -> str:
    """The name of the HQ privilege that grants `access` on a data entity, e.g. CustomersV3EntityCreate
    (Choice: one privilege per entity and access level, named after the entity as F&O names a data
    entity's generated privileges; CONTRACT.md, Security)."""
    return f"{entity_set}Entity{access}"


@dataclass(frozen=True)
class Role:
    name: str
    # Dataverse: the role's privileges; HQ: its duties, each a name and its privileges.
    privileges: frozenset[str] = frozenset()
    duties: tuple[tuple[str, frozenset[str]], ...] = ()

    @cached_property  # asked on every request
    def all_privileges(self) -> frozenset[str]:
        return self.privileges.union(*(privileges for _, privileges in self.duties))


def _dataverse(*grants: tuple[str, str]) -> frozenset[str]:
    return frozenset(dataverse_privilege(access, table) for access, table in grants)


def _hq(*grants: tuple[str, str]) -> frozenset[str]:
    return frozenset(hq_privilege(access, entity) for access, entity in grants)


DATAVERSE_SYSTEM_ADMINISTRATOR = "System Administrator"
HQ_SYSTEM_ADMINISTRATOR = "System administrator"
B2B_ONBOARDING_ROLE = "Commerce B2B onboarding integration"

DATAVERSE_ROLES = {
    role.name: role
    for role in (
        Role(DATAVERSE_SYSTEM_ADMINISTRATOR,
             frozenset(dataverse_privilege(access, table) for table in _DATAVERSE_ENTITIES for access in DATAVERSE_ACCESS)),
        # Exactly what the product's Sales client does (b2b_onboarding/clients/sales.py): WhoAmI needs no privilege.
        Role(B2B_ONBOARDING_ROLE, _dataverse(
            ("Read", "lead"), ("Create", "lead"), ("Write", "lead"), ("Append", "lead"),  # leads, keyed by company
            ("Read", "cdm_company"), ("AppendTo", "cdm_company"),  # a lead's msdyn_company bind
            ("Read", "account"), ("Write", "account"),  # reconciliation; the account number
            ("Read", "contact"), ("Read", "opportunity"),  # what sellers made of the leads
            ("Read", "savedquery"), ("Read", "systemuser"),  # views; users, owners, RetrieveUserPrivileges
        )),
    )
}  # fmt: skip
HQ_ROLES = {
    role.name: role
    for role in (
        Role(HQ_SYSTEM_ADMINISTRATOR, duties=(
            ("Maintain all data entities",
             frozenset(hq_privilege(access, entity) for entity in HQ_ENTITIES for access in HQ_ACCESS)),
        )),
        # Exactly what the product's Commerce client does (b2b_onboarding/clients/commerce.py).
        Role(B2B_ONBOARDING_ROLE, duties=(
            ("Maintain B2B prospect status", _hq(("Read", "Prospects"), ("Update", "Prospects"))),
            ("Create B2B customers and their hierarchies", _hq(
                ("Read", "CustomersV3"), ("Create", "CustomersV3"),
                ("Read", "CustomerHiearchies"), ("Create", "CustomerHiearchies"),
                ("Read", "CustomerHierarchyNodes"), ("Create", "CustomerHierarchyNodes"),
            )),
            ("Read organization setup", _hq(("Read", "LegalEntities"), ("Read", "CustomerGroups"))),
        )),
    )
}  # fmt: skip
ROLES = {DATAVERSE: DATAVERSE_ROLES, COMMERCE: HQ_ROLES}
DEFAULT_ROLES = {DATAVERSE: (DATAVERSE_SYSTEM_ADMINISTRATOR,), COMMERCE: (HQ_SYSTEM_ADMINISTRATOR,)}
ALL_PRIVILEGES = {system: frozenset().union(*(role.all_privileges for role in roles.values()))
                  for system, roles in ROLES.items()}  # fmt: skip


class Registration(Protocol):
    client_id: str
    app_user_id: str

    def has_user(self, system: str) -> bool: ...
    def roles(self, system: str) -> tuple[str, ...]: ...


class PrivilegeMissing(Exception):
    """`privilege` is not among the caller's; `held` says how many it has (Dataverse shows it)."""

    def __init__(self, privilege: str, roles: int, held: int) -> None:
        super().__init__(privilege)
        self.privilege, self.roles, self.held = privilege, roles, held


class TenantSecurity:
    """Who has a user in each system, with which roles, less what an admin revoked."""

    def __init__(self, clients: Mapping[str, Registration]) -> None:
        self._clients = clients
        self.reset()

    def reset(self) -> None:
        """Back to the registrations' own settings."""
        self._without_user: set[tuple[str, str]] = {
            (system, client.client_id) for client in self._clients.values() for system in SYSTEMS
            if not client.has_user(system)
        }  # fmt: skip
        self._revoked: dict[tuple[str, str], frozenset[str]] = {}

    def has_user(self, system: str, client_id: str) -> bool:
        return client_id in self._clients and (system, client_id) not in self._without_user

    def roles(self, system: str, client_id: str) -> list[Role]:
        return [ROLES[system][name] for name in self._clients[client_id].roles(system)]

    def privileges(self, system: str, client_id: str) -> frozenset[str]:
        held = frozenset().union(*(role.all_privileges for role in self.roles(system, client_id)))
        return held - self._revoked.get((system, client_id), frozenset())

    def require(self, system: str, client_id: str, privileges: Iterable[str]) -> None:
        """PrivilegeMissing for the first of `privileges` the client does not hold."""
        held = self.privileges(system, client_id)
        for privilege in privileges:
            if privilege not in held:
                raise PrivilegeMissing(privilege, len(self.roles(system, client_id)), len(held))

    def change(self, body: Any) -> None:
        """Apply an admin's change: `{"client_id", "system", "application_user": false}` removes the
        client's user in that system; `{"client_id", "system", "revoke": [privilege, ...]}` takes
        privileges from it. ValueError naming the field that is wrong."""
        if not isinstance(body, dict):
            raise ValueError('the body must be a JSON object: {"client_id": ..., "system": ..., '
                             '"application_user": false} or {..., "revoke": [...]}')  # fmt: skip
        unknown = sorted(set(body) - {"client_id", "system", "application_user", "revoke"})
        if unknown:
            raise ValueError(f"unknown field(s): {', '.join(unknown)}")
        client_id, system = body.get("client_id"), body.get("system")
        if not isinstance(client_id, str) or client_id not in self._clients:
            raise ValueError(f"client_id must be a registered client id, got {client_id!r}")
        if system not in SYSTEMS:
            raise ValueError(f"system must be one of {', '.join(SYSTEMS)}, got {system!r}")
        if ("application_user" in body) == ("revoke" in body):
            raise ValueError('give exactly one of "application_user" (false) and "revoke"')
        if "application_user" in body:
            if body["application_user"] is not False:
                raise ValueError("application_user must be false (the user is removed until /_admin/reset)")
            self._without_user.add((system, client_id))
            return
        revoke = body["revoke"]
        if not isinstance(revoke, list) or not revoke or not all(isinstance(name, str) for name in revoke):
            raise ValueError("revoke must be a non-empty list of privilege names")
        unknown_privileges = sorted(set(revoke) - ALL_PRIVILEGES[system])
        if unknown_privileges:
            raise ValueError(f"revoke: {system} has no privilege {unknown_privileges[0]!r}")
        key = (system, client_id)
        self._revoked[key] = self._revoked.get(key, frozenset()) | frozenset(revoke)

    def user_privileges(self, client_id: str, business_unit_id: str) -> list[dict[str, str]]:
        """Dataverse's RetrieveUserPrivileges answer for the client's application user."""
        return [
            {"Depth": "Global", "PrivilegeId": privilege_id(name), "BusinessUnitId": business_unit_id,
             "PrivilegeName": name}
            for name in sorted(self.privileges(DATAVERSE, client_id))
        ]  # fmt: skip


def missing_privilege_message(error: PrivilegeMissing, user_id: str, business_unit_id: str) -> str:
    """Dataverse's 0x80040220 message (Troubleshoot Dataverse client errors: "Principal user is
    missing privilege on OTC for entity")."""
    logical_name = _PRIVILEGE_TABLES[error.privilege]
    otc = _DATAVERSE_ENTITIES[logical_name][1]
    return (
        f"Principal user (Id={user_id}, type=8, roleCount={error.roles}, privilegeCount={error.held}, "
        f"accessMode=4, businessUnitId={business_unit_id}), is missing {error.privilege} privilege "
        f"(Id={privilege_id(error.privilege)}) on OTC={otc} for entity '{logical_name}'. "
        f"context.Caller={user_id}. Consider assigning a role with the required privilege to the user or team."
    )


def create_security_router(security: TenantSecurity, clock: ServiceClock) -> APIRouter:
    """`POST /_admin/security` and `POST /_admin/clock`; `/_admin/reset` undoes both."""
    router = APIRouter()

    @router.post("/security", status_code=204)
    async def change_security(request: Request) -> Response:
        try:
            security.change(_json(await request.body()))
        except ValueError as error:
            return JSONResponse({"error": str(error)}, status_code=400)
        return Response(status_code=204)

    @router.post("/clock", status_code=204)
    async def skew_clock(request: Request) -> Response:
        try:
            body = _json(await request.body())
            if not isinstance(body, dict) or set(body) != {"skew_s"}:
                raise ValueError('the body must be {"skew_s": <seconds>}')
            clock.set_skew(body["skew_s"])
        except ValueError as error:
            return JSONResponse({"error": str(error)}, status_code=400)
        return Response(status_code=204)

    return router


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError as error:
        raise ValueError(f"the body is not JSON: {error}") from None


# Dataverse actions bound to nothing that write: what each needs (Win/LoseOpportunity close an
# opportunity and record an opportunityclose bound to it).
_CLOSE_OPPORTUNITY = (("Write", "opportunity"), ("Create", "opportunityclose"), ("Append", "opportunityclose"),
                      ("AppendTo", "opportunity"))  # fmt: skip
_DATAVERSE_UNBOUND_ACTIONS = {"WinOpportunity": _CLOSE_OPPORTUNITY, "LoseOpportunity": _CLOSE_OPPORTUNITY}
_QUALIFY_CREATES = {"CreateAccount": "account", "CreateContact": "contact", "CreateOpportunity": "opportunity"}


async def dataverse_privileges_needed(request: Request, state: DataverseState) -> list[str]:
    """The privileges a Web API request needs, as Dataverse checks them: Read to read a table;
    Create to make a row (a POST, a PATCH that creates: by `If-None-Match: *` or at a key no row
    holds); Write to change one; Append on the row's table and AppendTo on the target's for each
    `@odata.bind`; Delete to delete; bulk actions per target, QualifyLead for what it creates.
    Requests to no table (WhoAmI, metadata, $batch) need none. A request the routes will refuse
    as malformed needs none here: their own answer says what is wrong."""
    from d365_fakes import dataverse as web_api  # it imports this module

    resource = web_api._resource_path(request)
    name = resource.partition("(")[0].partition("/")[0]
    if name in _DATAVERSE_UNBOUND_ACTIONS and request.method == "POST":
        return [dataverse_privilege(access, table) for access, table in _DATAVERSE_UNBOUND_ACTIONS[name]]
    if name == "systemusers" and resource.endswith("/Microsoft.Dynamics.CRM.RetrieveUserPrivileges()"):
        return [dataverse_privilege("Read", "systemuser")]
    if name not in web_api.TABLES:
        return []
    try:
        target = web_api._parse_resource(request)
        body = await web_api._json_body(request) if request.method in ("POST", "PATCH") else {}
        grants = _dataverse_grants(web_api, state, request, target, body)
    except web_api.DataverseError:
        return []
    return list(dict.fromkeys(dataverse_privilege(access, table) for access, table in grants))


def _dataverse_grants(
    web_api: ModuleType, state: DataverseState, request: Request, target: Any, body: dict
) -> list[tuple[str, str]]:
    table = target.table

    def binds(row: Mapping[str, Any]) -> list[tuple[str, str]]:
        bound = [table.lookups[name.removesuffix("@odata.bind")][1] for name in row
                 if name.endswith("@odata.bind") and name.removesuffix("@odata.bind") in table.lookups]  # fmt: skip
        return [grant for entity_set in bound
                for grant in (("Append", table.logical_name), ("AppendTo", web_api.TABLES[entity_set].logical_name))]  # fmt: skip

    def exists(key: Any) -> bool:
        return state.exists(table, key)

    method, logical = request.method, table.logical_name
    if method == "GET":
        return [("Read", logical)]
    if method == "DELETE":
        return [("Delete", logical)]
    if method == "PATCH":
        if request.headers.get("if-none-match") == "*":
            written = "Create"
        elif request.headers.get("if-match") is not None:
            written = "Write"
        else:
            written = "Write" if target.key is not None and exists(target.key) else "Create"
        return [(written, logical), *binds(body)]
    operation = web_api._BULK_OPERATIONS.get(target.action or "")
    if operation is not None:
        grants: list[tuple[str, str]] = []
        for index, row in enumerate(body.get("Targets") or ()):
            key = web_api._target_key(table, index, row, key_required=operation != "create")
            if operation == "create":
                written = "Create"
            elif operation == "update":
                written = "Write"
            else:
                written = "Write" if key is not None and exists(key) else "Create"
            grants += [(written, logical), *binds(row)]
        return grants
    if target.action == web_api._QUALIFY_LEAD:
        created = [("Create", entity) for parameter, entity in _QUALIFY_CREATES.items() if body.get(parameter) is True]
        return [("Write", logical), *created]
    return [("Create", logical), *binds(body)]
