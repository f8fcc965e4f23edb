"""Loading app registrations."""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path

import pytest

from d365_fakes.clients import load_clients

ENTRIES = [
    {"client_id": "app-1", "client_secret": "secret-1"},
    {
        "client_id": "app-2",
        "client_secret": "secret-2",
        "app_user_id": "3f2504e0-4f89-41d3-9a0c-0305e82c3301",
        "default_company": "usrt",
        "display_name": "Onboarding pipeline",
    },
]


def test_defaults_are_derived_from_the_client_id() -> None:
    client = load_clients(ENTRIES)["app-1"]

    assert client.app_user_id == str(uuid.uuid5(uuid.NAMESPACE_URL, "app-1"))
    assert client.default_company == "usmf"
    assert client.display_name == "app-1"
    assert "secret-1" not in repr(client)


def test_explicit_values_are_kept() -> None:
    client = load_clients(ENTRIES)["app-2"]

    assert client.app_user_id == "3f2504e0-4f89-41d3-9a0c-0305e82c3301"
    assert (client.default_company, client.display_name) == ("usrt", "Onboarding pipeline")


def test_file_path_and_inline_json_load_the_same(tmp_path: Path) -> None:
    path = tmp_path / "clients.json"
    path.write_text(json.dumps(ENTRIES))

    assert load_clients(path) == load_clients(str(path)) == load_clients(json.dumps(ENTRIES))


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([], "non-empty"),
        ([{"client_id": "app-1"}], "clients[0]"),
        ([{"client_id": "app-1", "client_secret": "x", "secret": "y"}], "unknown keys"),
        ([ENTRIES[0], ENTRIES[0]], "duplicate client_id 'app-1'"),
    ],
)
def test_bad_entries_are_named(entries: list, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        load_clients(entries)
