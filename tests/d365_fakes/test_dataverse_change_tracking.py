"""Change tracking: `Prefer: odata.track-changes`, delta links, deleted rows, expiry, paging."""

import re
from datetime import datetime, timezone
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from starlette.testclient import TestClient
from test_dataverse import (  # noqa: F401 (api and issuer are fixtures)
    API_ROOT,
    ORG_URL,
    api,
    by_prospect_id,
    create,
    error_of,
    issuer,
)

from d365_fakes.dataverse import DataverseState

TRACK = {"Prefer": "odata.track-changes"}
TTL_S = 3600


class FakeClock:
    def __init__(self) -> None:
        self.now = datetime(2017, 8, 22, 8, 10, 44, tzinfo=timezone.utc).timestamp()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def state(clock: FakeClock) -> DataverseState:
    return DataverseState(clock=clock, delta_token_ttl_s=TTL_S)


def track(api: TestClient, url: str, page_size: int | None = None) -> httpx.Response:
    prefer = "odata.track-changes" + (f", odata.maxpagesize={page_size}" if page_size else "")
    return api.get(url, headers={"Prefer": prefer})


def read_all(api: TestClient, url: str, page_size: int | None = None) -> tuple[list[dict], str]:
    """Every page of a tracked read (or of a delta link): its entries and the new delta link."""
    entries: list[dict] = []
    while True:
        response = track(api, url, page_size)
        assert response.status_code == 200, response.text
        body = response.json()
        entries += body["value"]
        if "@odata.deltaLink" in body:
            assert "@odata.nextLink" not in body
            return entries, body["@odata.deltaLink"]
        url = body["@odata.nextLink"]


def deleted(entity_set: str, row_id: str) -> dict:
    return {
        "@odata.context": f"{ORG_URL}{API_ROOT}/$metadata#{entity_set}/$deletedEntity",
        "id": row_id,
        "reason": "deleted",
    }


def token_of(delta_link: str) -> str:
    return parse_qs(urlsplit(delta_link).query)["$deltatoken"][0]


def test_the_first_read_returns_every_row_and_a_delta_link_in_dataverse_form(
    api: TestClient, state: DataverseState
) -> None:
    ids = sorted(create(api, "leads", {"lastname": name}) for name in ("A", "B", "C"))
    response = track(api, "leads?$select=lastname")
    assert response.status_code == 200
    assert response.headers["Preference-Applied"] == "odata.track-changes"
    body = response.json()
    assert body["@odata.context"] == f"{ORG_URL}{API_ROOT}/$metadata#leads(lastname)"
    assert [row["leadid"] for row in body["value"]] == ids
    assert set(body["value"][0]) == {"@odata.etag", "leadid", "lastname"}
    link = body["@odata.deltaLink"]
    assert link.startswith(f"{ORG_URL}{API_ROOT}/leads?$select=lastname&$deltatoken=")
    assert "%21" in link and "!" not in link  # the token travels url-encoded
    version = max(api.get(f"leads({row_id})").json()["versionnumber"] for row_id in ids)
    assert token_of(link) == f"{version}!08/22/2017 08:10:44"


def test_a_delta_link_returns_what_changed_then_what_was_deleted_and_a_new_link(
    api: TestClient,
) -> None:
    kept, changed, gone = sorted(create(api, "leads", {"lastname": n}) for n in ("A", "B", "C"))
    _, link = read_all(api, "leads?$select=lastname")
    assert api.patch(f"leads({changed})", json={"lastname": "B2", "firstname": "X"}).status_code == 204
    added = create(api, "leads", {"lastname": "D"})
    assert api.delete(f"leads({gone})").status_code == 204

    response = api.get(link)  # a delta link works without the Prefer header too
    assert response.status_code == 200
    body = response.json()
    assert body["@odata.context"] == f"{ORG_URL}{API_ROOT}/$metadata#leads(lastname)/$delta"
    rows, deletions = body["value"][:-1], body["value"][-1:]
    assert sorted(rows, key=lambda row: row["leadid"]) == rows  # in key order
    assert {row["leadid"]: row["lastname"] for row in rows} == {changed: "B2", added: "D"}
    assert set(rows[0]) == {"@odata.etag", "leadid", "lastname"}  # the link keeps the $select
    assert deletions == [deleted("leads", gone)]
    new_link = body["@odata.deltaLink"]
    assert new_link != link and kept not in response.text

    assert api.get(new_link).json()["value"] == []
    assert api.get(link).json()["value"] == body["value"]  # an older link still answers from its version


def test_a_row_created_and_deleted_since_shows_only_as_deleted_and_one_recreated_only_as_changed(
    api: TestClient,
) -> None:
    recreated = create(api, "accounts", {"name": "Recreated"})
    _, link = read_all(api, "accounts")
    short_lived = create(api, "accounts", {"name": "Short-lived"})
    for row_id in (short_lived, recreated):
        assert api.delete(f"accounts({row_id})").status_code == 204
    assert api.patch(f"accounts({recreated})", json={"name": "Back"}).status_code == 204
    entries, _ = read_all(api, link)
    assert [(entry.get("accountid"), entry.get("name")) for entry in entries[:1]] == [(recreated, "Back")]
    assert entries[1:] == [deleted("accounts", short_lived)]


def test_tokens_expire_after_the_retention_and_on_reset(
    api: TestClient, state: DataverseState, clock: FakeClock
) -> None:
    create(api, "leads", {"lastname": "A"})
    _, link = read_all(api, "leads")
    clock.now += TTL_S
    assert api.get(link).status_code == 200  # at the limit, still good
    clock.now += 1
    assert error_of(api.get(link), 400) == {
        "code": "0x80044352",
        "message": "ExpiredVersionStamp: The version stamp associated with the change tracking "
        "token has expired. Perform a full sync.",
    }
    entries, fresh = read_all(api, "leads")  # the full sync the error asks for
    assert len(entries) == 1
    state.reset()
    assert error_of(api.get(fresh), 400)["code"] == "0x80044352"  # reset rows left no tombstones
    _, after_reset = read_all(api, "leads")
    assert api.get(after_reset).json()["value"] == []


@pytest.mark.parametrize(
    "query",
    [
        "$filter=statecode eq 0",
        "$orderby=lastname",
        "$expand=parentaccountid",
        "$top=1",
        "$count=true",
        "savedQuery=00000000-0000-0000-0000-000000000000",
    ],
)
def test_change_tracking_refuses_options_other_than_select(api: TestClient, query: str) -> None:
    option = query.partition("=")[0]
    refused = error_of(track(api, f"leads?{query}"), 400)
    assert refused == {
        "code": "0x8006088a",
        "message": f"The query option {option} cannot be used with change tracking "
        "(Prefer: odata.track-changes).",
    }
    _, link = read_all(api, "leads")
    assert error_of(api.get(f"{link}&{query}"), 400) == refused


@pytest.mark.parametrize(
    "token",
    [
        "garbage",
        "",
        "12!99/99/2017 08:10:44",
        "12!08/22/2017",
        "-1!08/22/2017 08:10:44",
        "999999999!08/22/2017 08:10:44",  # a version this organization has not reached
        "12!08/22/2017 08:10:44!",
    ],
)
def test_a_garbled_token_is_refused(api: TestClient, token: str) -> None:
    response = api.get("leads", params={"$deltatoken": token})
    assert error_of(response, 400)["code"] == "0x8006088a"


def test_a_garbled_paging_cookie_is_refused_in_a_tracked_read(api: TestClient) -> None:
    for name in "ABC":
        create(api, "leads", {"lastname": name})
    next_link = track(api, "leads", page_size=1).json()["@odata.nextLink"]
    plain_cookie = api.get("leads", headers={"Prefer": "odata.maxpagesize=1"}).json()["@odata.nextLink"]
    for url in (re.sub(r"skiptoken=[^&]+", "skiptoken=xyz", next_link), plain_cookie):
        assert error_of(track(api, url, page_size=1), 400)["code"] == "0x8006088a"


def test_large_reads_and_deltas_are_paged_and_changes_during_paging_are_not_lost(
    api: TestClient,
) -> None:
    ids = sorted(create(api, "leads", {"msdyn_prospectid": f"P-{n}", "lastname": "v1"}) for n in range(7))
    first = track(api, "leads?$select=lastname", page_size=3)
    assert first.headers["Preference-Applied"] == "odata.track-changes, odata.maxpagesize=3"
    body = first.json()
    assert len(body["value"]) == 3 and "@odata.deltaLink" not in body
    assert api.patch(f"leads({ids[0]})", json={"lastname": "changed while paging"}).status_code == 204
    rest, link = read_all(api, body["@odata.nextLink"], page_size=3)
    assert [row["leadid"] for row in body["value"] + rest] == ids

    for row_id in ids[2:5]:
        assert api.patch(f"leads({row_id})", json={"lastname": "v2"}).status_code == 204
    for row_id in ids[5:]:
        assert api.delete(f"leads({row_id})").status_code == 204
    pages = []
    url: str | None = link
    while url:
        page = track(api, url, page_size=2).json()
        assert len(page["value"]) <= 2
        pages.append(page["value"])
        url = page.get("@odata.nextLink")
        assert bool(url) != ("@odata.deltaLink" in page)
    entries = [entry for page in pages for entry in page]
    assert len(pages) == 3
    assert [row["leadid"] for row in entries[:4]] == [ids[0], *ids[2:5]]  # the change made while paging too
    assert entries[4:] == [deleted("leads", row_id) for row_id in ids[5:]]


def test_tracked_reads_of_other_tables_and_by_alternate_key_deletes(api: TestClient) -> None:
    create(api, "leads", {"msdyn_prospectid": "P-1"})
    _, link = read_all(api, "leads")
    lead_id = api.get(by_prospect_id("P-1")).json()["leadid"]
    assert api.delete(by_prospect_id("P-1")).status_code == 204
    assert api.get(link).json()["value"] == [deleted("leads", lead_id)]
    contacts = track(api, "contacts")
    assert contacts.json()["value"] == [] and "@odata.deltaLink" in contacts.json()
