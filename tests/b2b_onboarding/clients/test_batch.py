"""The `$batch` wire format: what we send parses as OData multipart, and answers map to changesets."""

from __future__ import annotations

import json
from email import policy
from email.parser import BytesParser

import pytest

from b2b_onboarding.clients import batch
from b2b_onboarding.clients.batch import BatchRequest


def test_each_changeset_becomes_a_multipart_part_with_numbered_requests():
    # A customer HQ numbers (no CustomerAccount sent); the prospect a write is for is never sent.
    customer = {"dataAreaId": "usrt", "PartyType": "Organization", "OrganizationName": "Contoso"}
    content_type, body = batch.encode([
        [BatchRequest("POST", "CustomersV3?cross-company=true", customer, prospect=("usrt", "P-1"))],
        [BatchRequest("PATCH", "Prospects(dataAreaId='usrt',ProspectId='P-2')?cross-company=true",
                      {"B2BProspectStatus": "Rejected"}, {"If-Match": 'W/"abc"'}, prospect=("usrt", "P-2"))],
    ])  # fmt: skip
    message = BytesParser(policy=policy.HTTP).parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    changesets = list(message.iter_parts())
    assert [part.get_content_type() for part in changesets] == ["multipart/mixed", "multipart/mixed"]
    created = next(changesets[0].iter_parts()).get_payload(decode=True).decode()
    assert created.startswith("POST CustomersV3?cross-company=true HTTP/1.1")
    assert json.loads(created.split("\r\n\r\n", 1)[1]) == customer
    assert "P-1" not in body.decode()
    request = next(changesets[1].iter_parts())
    assert request.get_content_type() == "application/http" and request["Content-ID"] == "1"
    text = request.get_payload(decode=True).decode()
    assert text.startswith("PATCH Prospects(dataAreaId='usrt',ProspectId='P-2')?cross-company=true HTTP/1.1")
    assert 'If-Match: W/"abc"' in text
    assert json.loads(text.split("\r\n\r\n", 1)[1]) == {"B2BProspectStatus": "Rejected"}


def test_answers_are_read_per_changeset_and_a_rolled_back_one_has_one_answer():
    body = "\r\n".join([
        "--batchresponse_1",
        "Content-Type: multipart/mixed; boundary=changesetresponse_a",
        "",
        "--changesetresponse_a",
        "Content-Type: application/http",
        "Content-Transfer-Encoding: binary",
        "Content-ID: 1",
        "",
        "HTTP/1.1 201 Created",
        "Content-Type: application/json",
        "",
        '{"CustomerAccount": "USRT-000001", "PartyNumber": "000000001"}',
        "--changesetresponse_a",
        "Content-Type: application/http",
        "Content-Transfer-Encoding: binary",
        "Content-ID: 2",
        "",
        "HTTP/1.1 204 No Content",
        "",
        "",
        "--changesetresponse_a--",
        "--batchresponse_1",
        "Content-Type: application/http",
        "Content-Transfer-Encoding: binary",
        "",
        "HTTP/1.1 400 Bad Request",
        "Content-Type: application/json",
        "",
        '{"error": {"code": "", "message": "An error has occurred."}}',
        "--batchresponse_1--",
        "",
    ]).encode()  # fmt: skip
    first, second = batch.decode("multipart/mixed; boundary=batchresponse_1", body)
    assert [(part.status, part.ok) for part in first] == [(201, True), (204, True)]
    assert first[0].body == {"CustomerAccount": "USRT-000001", "PartyNumber": "000000001"}
    assert first[0].content_id == "1" and first[1].body is None
    assert len(second) == 1 and second[0].status == 400 and not second[0].ok


def test_an_answer_that_is_not_multipart_is_refused_loudly():
    with pytest.raises(ValueError, match="multipart"):
        batch.decode("application/json", b"{}")
