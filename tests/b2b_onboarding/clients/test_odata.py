from urllib.parse import unquote

import httpx
import pytest

from b2b_onboarding.clients.odata import error_from_response, key_segment, literal
from b2b_onboarding.errors import D365Error


def test_literals_double_quotes():
    assert literal("O'Brien") == "'O''Brien'"


@pytest.mark.parametrize("value", ["O'Brien", "' or 1 eq 1", "a/b", "a?b", "a#b", "50%", "line\nbreak", "ü€"])
def test_key_segments_keep_every_value_inside_its_quotes(value):
    segment = key_segment("Prospects", dataAreaId="usrt", ProspectId=value)
    assert segment.startswith("Prospects(dataAreaId='usrt',ProspectId='")
    raw = segment[len("Prospects(dataAreaId='usrt',ProspectId='") : -2]
    assert not set(raw) & set("/?#'\n ")
    assert unquote(raw) == value.replace("'", "''")


def test_finance_and_operations_errors_read_the_inner_message():
    response = httpx.Response(400, json={"error": {"code": "", "message": "An error has occurred.",
                                                   "innererror": {"message": "Prospect P-1 is Approved"}}})  # fmt: skip
    error = error_from_response("Commerce headquarters", "set prospect status", response, "prospect usrt/P-1")
    assert error.status == 400 and error.message == "Prospect P-1 is Approved"
    assert str(error).startswith("Commerce headquarters: set prospect status for prospect usrt/P-1 failed with HTTP 400")
    assert error.is_record_error


def test_dataverse_errors_keep_their_code_and_say_what_to_do():
    response = httpx.Response(429, json={"error": {"code": "0x80072322", "message": "Number of requests exceeded"}})
    error = error_from_response("Dataverse (Sales)", "create lead", response, None)
    assert error.code == "0x80072322" and not error.is_record_error
    assert "Next step:" in str(error) and "throttling" in str(error)


def test_errors_without_a_json_body_still_name_the_status():
    error = error_from_response("Dataverse (Sales)", "read leads", httpx.Response(502, text="<html>"), None)
    assert error.status == 502 and "HTTP 502" in str(error)
    assert isinstance(error, D365Error) and not error.is_record_error
