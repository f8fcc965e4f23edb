"""Commerce HQ `$batch`: OData v4 multipart/mixed, atomic changesets, continue-on-error."""

from __future__ import annotations

import json
import threading
import time
from email import policy
from email.message import Message
from email.parser import BytesParser

import pytest
from starlette.testclient import TestClient

from d365_fakes.clients import ClientRegistration
from d365_fakes.commerce import CUSTOMERS, PROSPECTS, CommerceState, create_app
from d365_fakes.dataverse import DataverseState
from d365_fakes.faults import FaultPlan
from d365_fakes.limits import Limits, ServiceProtection
from d365_fakes.server import create_apps
from d365_fakes.tokens import TokenIssuer

COMMERCE = "https://commerce.test"
SYNC = ClientRegistration("b2b-sync", "sync-secret", default_company="usrt")
CROSS = "?cross-company=true"


@pytest.fixture(scope="module")
def issuer():
    return TokenIssuer("https://login.test", "11111111-2222-3333-4444-555555555555")


@pytest.fixture
def state():
    state = CommerceState()
    state.seed_prospects([prospect("P-1"), prospect("P-2", "usmf"), prospect("P-3")])
    return state


@pytest.fixture
def api(state, issuer):
    client = TestClient(create_app(state, issuer, COMMERCE, {SYNC.client_id: SYNC}), base_url=COMMERCE)
    client.headers["Authorization"] = "Bearer " + issuer.issue(SYNC, COMMERCE)["access_token"]
    return client


def prospect(prospect_id, company="usrt", **fields):
    return {"dataAreaId": company, "ProspectId": prospect_id, "ProspectName": "Ann Lee", "CompanyName": "Contoso",
            "PrimaryEmailAddress": "ann@contoso.test", **fields}


def prospect_url(prospect_id, company="usrt"):
    return f"Prospects(dataAreaId='{company}',ProspectId='{prospect_id}')"


def request(method, url, body=None, content_id=None, **headers):
    """One `application/http` part."""
    lines = ["Content-Type: application/http", "Content-Transfer-Encoding: binary"]
    if content_id is not None:
        lines.append(f"Content-ID: {content_id}")
    lines += ["", f"{method} {url} HTTP/1.1", "Accept: application/json"]
    if body is not None:
        lines.append("Content-Type: application/json")
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    lines += ["", json.dumps(body) if body is not None else ""]
    return "\r\n".join(lines)


def changeset(*parts, boundary="changeset_e1f3"):
    return (f"Content-Type: multipart/mixed; boundary={boundary}\r\n\r\n"
            + "".join(f"--{boundary}\r\n{part}\r\n" for part in parts) + f"--{boundary}--")


def batch_body(*parts, boundary="batch_8a2c"):
    return ("".join(f"--{boundary}\r\n{part}\r\n" for part in parts) + f"--{boundary}--\r\n").encode()


def send(api, *parts, prefer=None):
    headers = {"Content-Type": "multipart/mixed; boundary=batch_8a2c"}
    if prefer:
        headers["Prefer"] = prefer
    return api.post("/data/$batch", content=batch_body(*parts), headers=headers)


def answers(response):
    """Per batch part: a list of (status, headers, body) for a changeset, or one tuple."""
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("multipart/mixed; boundary=batchresponse_")
    message = BytesParser(policy=policy.HTTP).parsebytes(
        f"Content-Type: {response.headers['content-type']}\r\n\r\n".encode() + response.content)
    assert not message.defects
    return [[_answer(inner) for inner in part.iter_parts()] if part.is_multipart() else _answer(part)
            for part in message.iter_parts()]


def _answer(part: Message):
    assert part.get_content_type() == "application/http"
    head, _, payload = part.get_payload(decode=True).partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in header_lines)
    if part["Content-ID"]:
        headers["Part-Content-ID"] = part["Content-ID"]
    return int(status_line.split()[1]), headers, json.loads(payload) if payload else None


def statuses(parsed):
    return [[answer[0] for answer in part] if isinstance(part, list) else part[0] for part in parsed]


def organization(name="Contoso", **fields):
    return {"CustomerGroupId": "10", "PartyType": "Organization", "OrganizationName": name, **fields}


def person(email, **fields):
    return {"CustomerGroupId": "10", "PartyType": "Person", "PersonFirstName": "Ann", "PrimaryContactEmail": email, **fields}


def test_reads_and_a_changeset_in_one_batch(api, state):
    response = send(
        api,
        request("GET", "Prospects?$select=ProspectId"),
        changeset(
            request("POST", "CustomersV3" + CROSS, organization(), content_id="1"),
            request("PATCH", prospect_url("P-1") + CROSS, {"B2BProspectStatus": "Approved"}, content_id="2",
                    If_Match="*"),
        ),
    )

    read, (created, approved) = answers(response)
    assert read[0] == 200 and [row["ProspectId"] for row in read[2]["value"]] == ["P-1", "P-3"]
    status, headers, body = created
    assert (status, headers["Part-Content-ID"], body["OrganizationName"]) == (201, "1", "Contoso")
    assert headers["Location"] == f"{COMMERCE}/data/CustomersV3(dataAreaId='usrt',CustomerAccount='USRT-000001')"
    assert headers["ETag"] == body["@odata.etag"] and headers["OData-Version"] == "4.0"
    assert approved[:2] == (204, {"OData-Version": "4.0", "Part-Content-ID": "2"})
    assert response.headers["OData-Version"] == "4.0" and "Preference-Applied" not in response.headers
    assert [email["ProspectId"] for email in state.outbox] == ["P-1"]
    assert state.counts() == {"requests": 1, "writes": {"Prospects": 1, "CustomersV3": 1, "CustomerHiearchies": 0,
                                                        "CustomerHierarchyNodes": 0}}


def test_inner_urls_may_be_absolute_and_honour_cross_company(api):
    parsed = answers(send(
        api,
        request("GET", f"{COMMERCE}/data/{prospect_url('P-2', 'usmf')}"),
        request("GET", f"/data/{prospect_url('P-2', 'usmf')}{CROSS}"),
        request("GET", f"Prospects{CROSS}&$filter=dataAreaId%20eq%20'usmf'"),
        prefer="odata.continue-on-error",
    ))

    assert statuses(parsed) == [404, 200, 200]
    assert parsed[1][2]["ProspectId"] == "P-2"
    assert [row["ProspectId"] for row in parsed[2][2]["value"]] == ["P-2"]


def test_a_later_request_of_a_changeset_may_name_an_earlier_one_by_content_id(api, state):
    parsed = answers(send(api, changeset(
        request("POST", "CustomersV3", organization(), content_id="org"),
        request("PATCH", "$org", {"OrganizationName": "Contoso Ltd"}, content_id="rename"),
    )))

    assert statuses(parsed) == [[201, 204]]
    [row] = state.visible_rows(CUSTOMERS, "usrt", False)
    assert row["OrganizationName"] == "Contoso Ltd"


def test_a_failed_changeset_leaves_no_row_no_email_and_no_write_behind(api, state):
    existing = api.post("/data/CustomersV3", json=person("bob@contoso.test")).json()
    p3_before = api.get("/data/" + prospect_url("P-3")).json()
    writes_before = state.counts()["writes"]

    parsed = answers(send(api, changeset(
        request("PATCH", prospect_url("P-1"), {"B2BProspectStatus": "Approved"}),
        request("POST", "CustomersV3", organization("Fabrikam"), content_id="7"),
        request("PATCH", prospect_url("P-3"), {"Note": "changed"}),
        request("DELETE", f"CustomersV3(dataAreaId='usrt',CustomerAccount='{existing['CustomerAccount']}')"),
        request("POST", "CustomersV3", person("ann@contoso.test"), content_id="8"),
        request("POST", "CustomersV3", person("ANN@contoso.test"), content_id="9"),  # the same email: 400
        request("POST", "CustomersV3", organization("Never run")),
    )))

    [(status, headers, body)] = parsed
    assert (status, headers["Part-Content-ID"]) == (400, "9")
    assert "already the primary contact email" in body["error"]["innererror"]["message"]
    assert state.outbox == []
    assert state.counts()["writes"] == writes_before
    assert [row["CustomerAccount"] for row in state.visible_rows(CUSTOMERS, "usrt", False)] == [existing["CustomerAccount"]]
    assert api.get("/data/" + prospect_url("P-1")).json()["B2BProspectStatus"] == "Pending"
    assert api.get("/data/" + prospect_url("P-3")).json() == p3_before  # the same ETag, too
    # The indexes were put back as well: Ann's email is free again and Bob's is still taken.
    assert api.post("/data/CustomersV3", json=person("ann@contoso.test")).status_code == 201
    assert api.post("/data/CustomersV3", json=person("bob@contoso.test")).status_code == 400


def test_processing_stops_at_the_first_failure_without_continue_on_error(api, state):
    failing = changeset(request("POST", "CustomersV3", {"CustomerGroupId": "10", "PartyType": "Robot"}, content_id="1"))
    later = changeset(request("POST", "CustomersV3", organization()))

    parsed = answers(send(api, request("GET", "Prospects"), failing, later))

    assert statuses(parsed) == [200, 400]
    assert state.visible_rows(CUSTOMERS, "usrt", True) == []


def test_continue_on_error_runs_the_later_parts(api, state):
    failing = changeset(request("POST", "CustomersV3", {"CustomerGroupId": "10", "PartyType": "Robot"}))
    later = changeset(request("POST", "CustomersV3", organization()))

    response = send(api, failing, request("GET", "NoSuchEntities"), later, prefer="odata.continue-on-error")

    assert statuses(answers(response)) == [400, 404, [201]]
    assert response.headers["Preference-Applied"] == "odata.continue-on-error"
    assert len(state.visible_rows(CUSTOMERS, "usrt", True)) == 1


def test_a_failed_single_request_also_stops_the_batch(api):
    parsed = answers(send(api, request("GET", prospect_url("P-404")), request("GET", "Prospects")))

    assert statuses(parsed) == [404]


@pytest.mark.parametrize(
    ("content_type", "body", "message"),
    [
        ("application/json", b"{}", "multipart/mixed with a boundary"),
        ("multipart/mixed", b"--x\r\n\r\n--x--", "multipart/mixed with a boundary"),
        ("multipart/mixed; boundary=batch_8a2c", b"not a multipart body", "malformed"),
        ("multipart/mixed; boundary=batch_8a2c",
         batch_body(request("GET", "Prospects"))[:-len(b"--batch_8a2c--\r\n")], "malformed"),
        ("multipart/mixed; boundary=batch_8a2c",
         batch_body("Content-Type: application/json\r\n\r\n{}"), "expected application/http"),
        ("multipart/mixed; boundary=batch_8a2c",
         batch_body(request("GET", "Prospects").replace(" HTTP/1.1", "")), "is not a request line"),
        ("multipart/mixed; boundary=batch_8a2c",
         batch_body(changeset(changeset(request("POST", "CustomersV3", organization()), boundary="changeset_inner"))),
         "changesets cannot be nested"),
        ("multipart/mixed; boundary=batch_8a2c",
         batch_body(changeset(request("POST", "CustomersV3", organization(), content_id="1"),
                              request("POST", "CustomersV3", organization("B"), content_id="1"))),
         "Content-ID is used twice"),
    ],
)
def test_malformed_batches_are_400(api, state, content_type, body, message):
    response = api.post("/data/$batch", content=body, headers={"Content-Type": content_type})

    assert response.status_code == 400, response.text
    assert response.json()["error"]["innererror"]["type"] == "Microsoft.OData.ODataException"
    assert message in response.json()["error"]["innererror"]["message"]
    assert state.visible_rows(CUSTOMERS, "usrt", True) == []


def test_a_get_inside_a_changeset_refuses_the_whole_batch(api, state):
    response = send(api, changeset(request("POST", "CustomersV3", organization()), request("GET", "Prospects")))

    assert response.status_code == 400
    assert "GET Prospects is inside a changeset" in response.json()["error"]["innererror"]["message"]
    assert state.visible_rows(CUSTOMERS, "usrt", True) == []


def test_more_than_1000_requests_are_refused(api):
    parts = [changeset(*[request("POST", "CustomersV3", organization(f"O{n}")) for n in range(500)]) for _ in range(2)]

    assert answers(send(api, *parts, prefer="odata.continue-on-error"))  # 1000 is fine
    response = send(api, *parts, request("GET", "Prospects"))
    assert response.status_code == 400 and "more than 1000 requests" in response.text


def test_the_batch_is_authenticated_once_and_counted_once(api, state):
    unauthenticated = api.post("/data/$batch", content=batch_body(request("GET", "Prospects")),
                               headers={"Authorization": "", "Content-Type": "multipart/mixed; boundary=batch_8a2c"})
    assert unauthenticated.status_code == 401

    answers(send(api, *[request("GET", "Prospects") for _ in range(5)]))

    assert state.counts()["requests"] == 2


def test_a_batch_is_one_request_for_service_protection(issuer):
    state = CommerceState()
    protection = ServiceProtection(Limits(commerce_requests=2, commerce_window_s=60))
    _, commerce_app, _ = create_apps(issuer, {SYNC.client_id: SYNC}, COMMERCE, "https://org.crm.test", state,
                                     DataverseState(), FaultPlan(), protection)
    api = TestClient(commerce_app, base_url=COMMERCE)
    api.headers["Authorization"] = "Bearer " + issuer.issue(SYNC, COMMERCE)["access_token"]

    writes = changeset(*[request("POST", "CustomersV3", organization(f"O{n}")) for n in range(5)])
    assert statuses(answers(send(api, writes))) == [[201] * 5]
    assert api.get("/data/CustomersV3").status_code == 200
    assert send(api, writes).status_code == 429
    assert state.counts()["writes"]["CustomersV3"] == 5


def test_a_changeset_holds_the_state_so_readers_never_see_half_of_it():
    state = CommerceState()
    inside, release = threading.Event(), threading.Event()
    seen: list[int] = []

    def write_two():
        with state.transaction():
            state.create(PROSPECTS, prospect("P-1"), "usrt")
            inside.set()
            release.wait(5)
            state.create(PROSPECTS, prospect("P-2"), "usrt")

    writer = threading.Thread(target=write_two)
    writer.start()
    inside.wait(5)
    reader = threading.Thread(target=lambda: seen.append(len(state.visible_rows(PROSPECTS, "usrt", True))))
    reader.start()
    time.sleep(0.1)
    assert seen == []  # still waiting for the changeset
    release.set()
    writer.join(5)
    reader.join(5)
    assert seen == [2]


def test_transactions_do_not_nest():
    state = CommerceState()
    with state.transaction(), pytest.raises(RuntimeError):
        with state.transaction():
            pass
