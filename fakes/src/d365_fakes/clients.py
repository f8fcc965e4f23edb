"""App registrations known to the fake Entra ID tenant.

Each registration is a confidential client (client id + secret) and the application user that the
fake Commerce and Dataverse services act as when a token for that client arrives. Secrets are never
hard-coded: they come from a JSON file or inline JSON supplied by whoever starts the fakes.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from d365_fakes.security import COMMERCE, DATAVERSE, DEFAULT_ROLES, ROLES


@dataclass(frozen=True)
class ClientRegistration:
    client_id: str
    client_secret: str = field(repr=False)
    app_user_id: str = ""
    default_company: str = "usmf"
    display_name: str = ""
    # Whether the app has a user in each system (a Dataverse application user; a row in HQ's
    # "Microsoft Entra applications") and its security roles there (security.py).
    dataverse_application_user: bool = True
    dataverse_roles: tuple[str, ...] = DEFAULT_ROLES[DATAVERSE]
    commerce_application_user: bool = True
    commerce_roles: tuple[str, ...] = DEFAULT_ROLES[COMMERCE]

    def __post_init__(self) -> None:
        if not self.client_id or not self.client_secret:
            raise ValueError("a client registration needs a non-empty client_id and client_secret")
        for system in (DATAVERSE, COMMERCE):
            if not isinstance(getattr(self, f"{system}_application_user"), bool):
                raise ValueError(f"{system}_application_user must be true or false")
            roles = getattr(self, f"{system}_roles")
            if isinstance(roles, str) or not all(isinstance(role, str) for role in roles):
                raise ValueError(f"{system}_roles must be a list of role names")
            unknown = sorted(set(roles) - set(ROLES[system]))
            if unknown:
                raise ValueError(f"{system}_roles: {system} has no role {unknown[0]!r} (it has {sorted(ROLES[system])})")
            object.__setattr__(self, f"{system}_roles", tuple(roles))
        # Frozen dataclass: derived defaults are filled in through object.__setattr__.
        if not self.app_user_id:
            object.__setattr__(
                self, "app_user_id", str(uuid.uuid5(uuid.NAMESPACE_URL, self.client_id))
            )
        if not self.display_name:
            object.__setattr__(self, "display_name", self.client_id)

    def has_user(self, system: str) -> bool:
        return bool(getattr(self, f"{system}_application_user"))

    def roles(self, system: str) -> tuple[str, ...]:
        return getattr(self, f"{system}_roles")


_FIELDS = (
    "client_id", "client_secret", "app_user_id", "default_company", "display_name",
    "dataverse_application_user", "dataverse_roles", "commerce_application_user", "commerce_roles",
)  # fmt: skip


def load_clients(source: str | Path | list[dict[str, Any]]) -> dict[str, ClientRegistration]:
    """Read registrations from a JSON file path, an inline JSON string, or a parsed list.

    Returns them keyed by client id. Raises ValueError with a message naming the bad entry.
    """
    entries = _parse(source)
    if not isinstance(entries, list) or not entries:
        raise ValueError("clients must be a non-empty JSON list of objects")
    clients: dict[str, ClientRegistration] = {}
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ValueError(f"clients[{index}] must be an object")
        unknown = set(entry) - set(_FIELDS)
        if unknown:
            raise ValueError(f"clients[{index}] has unknown keys: {sorted(unknown)}")
        try:
            client = ClientRegistration(**entry)
        except (TypeError, ValueError) as error:
            raise ValueError(f"clients[{index}]: {error}") from None
        if client.client_id in clients:
            raise ValueError(f"clients[{index}]: duplicate client_id {client.client_id!r}")
        clients[client.client_id] = client
    return clients


def _parse(source: str | Path | list[dict[str, Any]]) -> Any:
    if isinstance(source, list):
        return source
    if isinstance(source, Path):
        return json.loads(source.read_text(encoding="utf-8"))
    text = source.strip()
    if text.startswith("["):
        return json.loads(text)
    return json.loads(Path(text).read_text(encoding="utf-8"))
