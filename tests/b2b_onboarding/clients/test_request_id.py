"""Every failure answered by Dataverse or Commerce HQ names the id the service gave the request
(Dataverse's x-ms-service-request-id, F&O's ms-dyn-aid activity id), after the service's message:
the one thing Microsoft support asks for. Against the running fakes."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator

import pytest

from b2b_onboarding.clients.commerce import CommerceClient
from b2b_onboarding.clients.odata import DEFAULT_MAX_ATTEMPTS
from b2b_onboarding.clients.sales import SalesClient
from b2b_onboarding.errors import D365Error
from d365_fakes.running import FakeAdmin

GUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"


@pytest.fixture
def sales(world, admin: FakeAdmin) -> Iterator[SalesClient]:
    client = SalesClient.connect(world.settings(world.endpoints.dataverse))
    yield client
    client.odata.close()


@pytest.fixture
def commerce(world, admin: FakeAdmin) -> Iterator[CommerceClient]:
    client = CommerceClient.connect(world.settings(world.endpoints.commerce, legal_entities=["usrt"]))
    yield client
    client.odata.close()


def failure_of(call) -> D365Error:
    with pytest.raises(D365Error) as failed:
        call()
    return failed.value


def request_id_in_message(error: D365Error) -> str:
    """The id the first line names: after the service's message, before the next step."""
    message = str(error)
    found = re.search(rf"\. Request id: ({GUID}) \(give it to Microsoft support\)\. Next step: ", message)
    assert found, message
    assert message.index(error.message) < found.start()
    return found[1]


def test_a_dataverse_error_names_the_answers_service_request_id(sales: SalesClient) -> None:
    first = failure_of(lambda: sales.odata.request("GET", "nosuchset", operation="read nosuchset"))
    assert (first.status, first.code) == (404, "0x8006088a")
    assert request_id_in_message(first) == first.request_id == str(uuid.UUID(first.request_id))
    second = failure_of(lambda: sales.odata.request("GET", "nosuchset", operation="read nosuchset"))
    assert second.request_id != first.request_id  # one id per request


def test_a_dataverse_error_keeps_its_request_id_when_it_names_the_record(sales: SalesClient) -> None:
    error = failure_of(lambda: sales.odata.request("GET", "leads", operation="read leads", params={"$select": "nickname"}))
    named = error.for_record("USRT prospect P-1")
    assert named.request_id == error.request_id
    assert "for USRT prospect P-1" in str(named) and request_id_in_message(named) == error.request_id


def test_retries_spent_name_the_last_answers_request_id(sales: SalesClient, admin: FakeAdmin) -> None:
    sales.whoami()  # a token in the cache first
    admin.inject_fault("dataverse", 503, count=DEFAULT_MAX_ATTEMPTS, retry_after=0)
    error = failure_of(sales.whoami)
    assert error.status == 503 and error.attempts == DEFAULT_MAX_ATTEMPTS
    assert request_id_in_message(error) == error.request_id


def test_a_commerce_error_names_the_activity_id(commerce: CommerceClient, admin: FakeAdmin) -> None:
    admin.inject_fault("commerce", 400, count=1)
    error = failure_of(lambda: commerce.get_prospect("usrt", "P-000001"))
    assert error.status == 400
    assert request_id_in_message(error) == error.request_id


def test_a_commerce_answer_of_its_own_names_the_activity_id(commerce: CommerceClient) -> None:
    first = failure_of(lambda: commerce.odata.request("GET", "NoSuchEntities", operation="read NoSuchEntities"))
    second = failure_of(lambda: commerce.odata.request("GET", "NoSuchEntities", operation="read NoSuchEntities"))
    assert first.status == 404
    assert request_id_in_message(first) == first.request_id != second.request_id


def test_a_failure_without_an_answer_names_no_request_id() -> None:
    error = D365Error(system="Sales (Dataverse)", operation="read leads", status=0, message="connection refused")
    assert "Request id" not in str(error)
