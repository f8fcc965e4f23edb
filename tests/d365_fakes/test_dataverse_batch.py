"""The Dataverse Web API's `$batch`, as "Execute batch operations using the Web API" documents it:
parts served as requests of their own, atomic changesets, `$<Content-ID>` references, continue on
error, one request for the counts. In-process, and once over HTTPS against the served fakes."""

import email.parser
import json
import time
import uuid
from collections.abc import Callable, Iterator

import httpx
import msal
import pytest
from azure.core.credentials import AccessToken
from PowerPlatform.Dataverse.client import DataverseClient
from starlette.testclient import TestClient
from test_dataverse import (  # noqa: F401 (api, issuer and state are fixtures)
    API_ROOT,
    MISSING_ID,
    ORG_URL,
    api,
    by_prospect_id,
    create,
    issuer,
    state,
)

from d365_fakes.dataverse import DataverseState
from d365_fakes.running import Endpoints, FakeAdmin, running_fakes


def part(method: str, url: str, body: dict | None = None, content_id: str | None = None) -> str:
    head = "Content-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n"
    if content_id is not None:
        head += f"Content-ID: {content_id}\r\n"
    request = f"{method} {url} HTTP/1.1\r\n"
    if body is not None:
        request += "Content-Type: application/json; type=entry\r\n\r\n" + json.dumps(body)
    else:
        request += "\r\n"
    return head + "\r\n" + request


def changeset(*parts: str) -> str:
    boundary = f"changeset_{uuid.uuid4()}"
    inner = "".join(f"--{boundary}\r\n{item}\r\n" for item in parts) + f"--{boundary}--"
    return f"Content-Type: multipart/mixed; boundary={boundary}\r\n\r\n{inner}"


def batch(client: TestClient | httpx.Client, *items: str, url: str = "$batch", **headers: str) -> httpx.Response:
    boundary = "batch_AAA123"
    body = "".join(f"--{boundary}\r\n{item}\r\n" for item in items) + f"--{boundary}--\r\n"
    content_type = f'multipart/mixed; boundary="{boundary}"'
    return client.post(url, content=body.encode(), headers={"Content-Type": content_type, **headers})


def answers(response: httpx.Response) -> list[tuple[int, dict[str, str], str]]:
    """Each part's (status, headers, body), changesets' parts flattened, in order; headers
    lower-cased, with the part's Content-ID."""
    message = email.parser.BytesParser().parsebytes(
        b"Content-Type: " + response.headers["Content-Type"].encode() + b"\r\n\r\n" + response.content
    )
    found = []
    for item in message.walk():
        if item.get_content_type() != "application/http":
            continue
        text = item.get_payload(decode=True).decode()
        head, _, body = text.partition("\r\n\r\n")
        status_line, *header_lines = head.split("\r\n")
        headers = {name.lower(): value for name, value in (line.split(": ", 1) for line in header_lines)}
        if item["Content-ID"] is not None:  # a header of the MIME part, around the HTTP answer
            headers["content-id"] = item["Content-ID"]
        found.append((int(status_line.split()[1]), headers, body.strip()))
    return found


def lead_count(api: TestClient) -> int:
    return int(api.get("leads/$count").text)


def test_a_batch_serves_each_part_in_order_and_answers_multipart(api: TestClient, state: DataverseState) -> None:
    before = state.counts()
    response = batch(
        api,
        part("POST", f"{API_ROOT}/leads", {"lastname": "Ada"}),
        part("POST", "leads", {"lastname": "Grace"}),
        part("GET", f"{ORG_URL}{API_ROOT}/leads?$select=lastname&$orderby=lastname"),
    )
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("multipart/mixed; boundary=batchresponse_")
    boundary = response.headers["Content-Type"].split("boundary=")[1]
    uuid.UUID(boundary.removeprefix("batchresponse_"))
    (first, _, _), (second, headers, _), (read, _, listing) = answers(response)
    assert (first, second, read) == (204, 204, 200)
    assert headers["odata-entityid"].startswith(f"{ORG_URL}{API_ROOT}/leads(")
    assert [row["lastname"] for row in json.loads(listing)["value"]] == ["Ada", "Grace"]
    after = state.counts()
    assert after["requests"] == before["requests"] + 1  # the batch is one request
    assert after["writes"]["leads"] == before["writes"]["leads"] + 2  # each write counts


def test_a_failing_part_stops_the_batch_and_gives_its_status(api: TestClient) -> None:
    response = batch(
        api,
        part("POST", "leads", {"lastname": "Ada"}),
        part("POST", "leads", {"nickname": "x"}),
        part("POST", "leads", {"lastname": "never"}),
    )
    assert response.status_code == 400
    statuses = [status for status, _, _ in answers(response)]
    assert statuses == [204, 400]
    status, headers, body = answers(response)[1]
    assert json.loads(body)["error"]["code"] == "0x80060888"  # the same answer as on its own
    uuid.UUID(headers["req_id"])
    assert lead_count(api) == 1


def test_continue_on_error_serves_every_part(api: TestClient) -> None:
    response = batch(
        api,
        part("POST", "leads", {"nickname": "x"}),
        part("POST", "leads", {"lastname": "Ada"}),
        part("GET", f"leads({MISSING_ID})"),
        Prefer="odata.continue-on-error",
    )
    assert response.status_code == 200
    assert response.headers["Preference-Applied"] == "odata.continue-on-error"
    assert [status for status, _, _ in answers(response)] == [400, 204, 404]
    assert lead_count(api) == 1


def test_a_changeset_is_atomic(api: TestClient, state: DataverseState) -> None:
    doomed = create(api, "leads", {"lastname": "Doomed"})
    writes = state.counts()["writes"]["leads"]
    response = batch(
        api,
        changeset(
            part("POST", "leads", {"lastname": "Ada"}, content_id="1"),
            part("PATCH", f"leads({doomed})", {"lastname": "Changed"}, content_id="2"),
            part("DELETE", f"leads({doomed})", content_id="3"),
            part("PATCH", by_prospect_id("P-1"), {"leadsourcecode": "Web"}, content_id="4"),
        ),
    )
    assert response.status_code == 400
    [(status, headers, body)] = answers(response)  # only the failed part is answered
    assert status == 400 and headers["content-id"] == "4"
    assert json.loads(body)["error"]["code"] == "0x80040203"
    assert [row["lastname"] for row in api.get("leads").json()["value"]] == ["Doomed"]
    assert state.counts()["writes"]["leads"] == writes


def test_content_id_references_in_urls_and_binds(api: TestClient) -> None:
    response = batch(
        api,
        changeset(
            part("POST", "accounts", {"name": "Contoso"}, content_id="1"),
            part("POST", "leads", {"lastname": "Ada", "parentaccountid@odata.bind": "$1"}, content_id="2"),
            part("PATCH", "$2", {"firstname": "Augusta"}, content_id="3"),
        ),
    )
    assert response.status_code == 200, response.text
    assert [status for status, _, _ in answers(response)] == [204, 204, 204]
    account_id = api.get("accounts").json()["value"][0]["accountid"]
    [lead] = api.get("leads").json()["value"]
    assert (lead["firstname"], lead["_parentaccountid_value"]) == ("Augusta", account_id)


def test_a_reference_to_an_undeclared_content_id_fails_the_changeset(api: TestClient) -> None:
    response = batch(
        api,
        changeset(
            part("POST", "leads", {"lastname": "Ada"}, content_id="1"),
            part("POST", "leads", {"lastname": "X", "parentaccountid@odata.bind": "$9"}, content_id="2"),
        ),
    )
    assert response.status_code == 400
    [(_, _, body)] = answers(response)
    assert json.loads(body)["error"]["message"] == "Content-ID Reference: '$9' does not exist in the batch context."
    assert lead_count(api) == 0


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b"not multipart", 'multipart/mixed; boundary="batch_x"'),
        (b"--batch_x\r\nContent-Type: text/plain\r\n\r\nhello\r\n--batch_x--\r\n", 'multipart/mixed; boundary="batch_x"'),
        (b"{}", "application/json"),
    ],
)
def test_a_malformed_batch_is_400(api: TestClient, body: bytes, content_type: str) -> None:
    response = api.post("$batch", content=body, headers={"Content-Type": content_type})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "0x80040203"


def test_a_batch_holds_at_most_1000_requests(api: TestClient) -> None:
    too_many = batch(api, *[part("GET", "leads/$count")] * 1001)
    assert too_many.status_code == 400
    assert "1000" in too_many.json()["error"]["message"]
    assert batch(api, *[part("GET", "leads/$count")] * 1000).status_code == 200


def test_a_batch_needs_a_token_and_its_parts_run_as_its_caller(api: TestClient) -> None:
    refused = batch(api, part("GET", "WhoAmI"), Authorization="Bearer not-a-jwt")
    assert refused.status_code == 401
    [(status, _, body)] = answers(batch(api, part("GET", "WhoAmI")))
    assert status == 200 and json.loads(body)["UserId"] == api.get("WhoAmI").json()["UserId"]


APP = {"client_id": "batch-app", "client_secret": "test-only-secret", "default_company": "usrt"}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Endpoints]:
    """The fakes as `serve` runs them."""
    with running_fakes(tmp_path_factory.mktemp("fakes"), [APP]) as fakes:
        yield fakes


@pytest.fixture
def token(served: Endpoints, msal_honours_verify: None) -> Iterator[Callable[[], str]]:
    with FakeAdmin(served) as admin:
        admin.reset()
        admin.set_limits(dataverse_requests=6000)
    app = msal.ConfidentialClientApplication(
        APP["client_id"], client_credential=APP["client_secret"], authority=served.authority,
        instance_discovery=False, verify=served.ca_bundle,
    )  # fmt: skip
    yield lambda: app.acquire_token_for_client(scopes=[f"{served.dataverse}/.default"])["access_token"]


def test_over_https_a_batch_is_one_request_for_service_protection(served: Endpoints, token) -> None:
    headers = {"Authorization": f"Bearer {token()}"}
    with FakeAdmin(served) as admin:
        admin.set_limits(dataverse_requests=3)
    with httpx.Client(base_url=f"{served.dataverse}{API_ROOT}/", verify=served.ca_bundle, headers=headers) as http:
        response = batch(http, *[part("POST", "leads", {"lastname": f"L{n}"}) for n in range(10)])
        assert response.status_code == 200
        assert response.headers["x-ms-ratelimit-burst-remaining-xrm-requests"] == "2"
        uuid.UUID(response.headers["x-ms-service-request-id"])
        assert [status for status, _, _ in answers(response)] == [204] * 10
        assert http.get("leads/$count").text == "10"
    with FakeAdmin(served) as admin:
        counts = admin.counts()["dataverse"]
    assert counts["requests"] == 2 and counts["writes"]["leads"] == 10


def test_microsofts_dataverse_client_batches_against_the_fake(
    served: Endpoints, token, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PowerPlatform-Dataverse-Client 1.1.0's own `$batch` writer and reader: single requests and a
    changeset whose update names the create before it by Content-ID."""
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", served.ca_bundle)  # the client talks through requests

    class Credential:  # azure.core's TokenCredential protocol
        def get_token(self, *scopes: str, **_: object) -> AccessToken:
            return AccessToken(token(), int(time.time()) + 3000)

    client = DataverseClient(served.dataverse, Credential())
    request = client.batch.new()
    request.records.create("account", {"name": "Contoso"})
    with request.changeset() as changes:
        created = changes.records.create("account", {"name": "Fabrikam"})
        changes.records.update("account", created, {"accountnumber": "F-1"})
    result = request.execute()
    assert [item.status_code for item in result.responses] == [204, 204, 204]
    assert [item.content_id for item in result.responses] == [None, "1", "2"]
    with httpx.Client(verify=served.ca_bundle, headers={"Authorization": f"Bearer {token()}"}) as http:
        rows = http.get(f"{served.dataverse}{API_ROOT}/accounts", params={"$select": "name,accountnumber"}).json()
    assert sorted((row["name"], row["accountnumber"]) for row in rows["value"]) == [("Contoso", None), ("Fabrikam", "F-1")]
    assert result.responses[1].entity_id == next(row["accountid"] for row in rows["value"] if row["name"] == "Fabrikam")
