import pandas as pd
import pytest

from b2b_onboarding.domain import prospects

GOOD = {
    "dataAreaId": "USRT", "ProspectId": "P-000123", "ProspectName": "Jean-Luc Picard",
    "CompanyName": "Starfleet Supplies", "PrimaryEmailAddress": "jl@starfleet.example",
    "PrimaryPhoneNumber": "+1 555 0100", "AddressStreet": "1 Main St", "AddressCity": "Seattle",
    "AddressZipCode": "98052", "AddressCountryRegionISOCode": "US", "CurrencyCode": "USD",
    "IsB2BProspect": "Yes", "B2BProspectStatus": "Pending",
}  # fmt: skip


def test_a_valid_prospect_is_normalised_and_kept_whole():
    prospect, error = prospects.validate(GOOD)
    assert error is None
    assert prospect.dataAreaId == "usrt"
    assert prospect.PrimaryEmailAddress == "jl@starfleet.example"


def test_each_bad_field_is_named_with_the_prospect():
    _, error = prospects.validate({**GOOD, "PrimaryEmailAddress": "not-an-email", "CompanyName": "  "})
    assert error.startswith("prospect USRT/P-000123: ")
    assert "PrimaryEmailAddress" in error and "CompanyName" in error


def test_missing_fields_and_over_long_ids_are_refused():
    _, error = prospects.validate({"dataAreaId": "usrt", "ProspectId": "P" * 21})
    assert "ProspectId: 21 characters; Commerce's field Prospects.ProspectId holds at most 20 in this tenant" in error
    assert "ProspectId" in error and "ProspectName" in error and "PrimaryEmailAddress" in error


def test_non_latin_and_emoji_names_are_valid():
    prospect, error = prospects.validate({**GOOD, "ProspectName": "Łukasz Żółć 😀", "CompanyName": "株式会社テスト"})
    assert error is None
    assert prospects.lead_of(prospect.model_dump())["lastname"] == "😀"


def test_control_characters_in_identity_fields_are_refused():
    _, error = prospects.validate({**GOOD, "ProspectId": "P-1\nP-2"})
    assert "ProspectId" in error


@pytest.mark.parametrize("name", ["Ada\u2028Lovelace", "Ada\x07Lovelace", "Ada\x85Lovelace"])
def test_line_separators_and_controls_in_names_are_refused(name):
    _, error = prospects.validate({**GOOD, "ProspectName": name})
    assert "ProspectName: Value error, contains control characters or line breaks" in error


@pytest.mark.parametrize("name", ["\u05d3\u05d5\u05d3 \u200f\u05db\u05d4\u05df", "Family \U0001F468\u200d\U0001F469\u200d\U0001F467"])
def test_format_characters_of_real_names_are_valid(name):  # right-to-left marks, emoji joined by ZWJ
    prospect, error = prospects.validate({**GOOD, "ProspectName": name, "CompanyName": name})
    assert error is None and prospect.ProspectName == name


def test_validate_page_keeps_every_row_with_either_fields_or_error():
    frame = prospects.validate_page([GOOD, {**GOOD, "ProspectId": "P-2", "PrimaryEmailAddress": "x"}], "usrt")
    assert list(frame["prospect_id"]) == ["P-000123", "P-2"]
    assert frame.loc[0, "error"] is None and frame.loc[0, "prospect"]["CompanyName"] == "Starfleet Supplies"
    assert "PrimaryEmailAddress" in frame.loc[1, "error"]
    assert frame.loc[1, "prospect"]["PrimaryEmailAddress"] == "x"  # as received, beside its error


def test_lead_follows_the_dual_write_column_map_and_is_tagged():
    prospect, _ = prospects.validate(GOOD)
    lead = prospects.lead_of(prospect.model_dump())
    assert lead["firstname"] == "Jean-Luc" and lead["lastname"] == "Picard"
    assert lead["companyname"] == "Starfleet Supplies"
    assert lead["emailaddress1"] == "jl@starfleet.example"
    assert lead["address1_postalcode"] == "98052"
    assert lead["msdyn_b2bcommerceprospect"] is True
    assert lead["leadsourcecode"] == 8
    assert "msdyn_prospectid" not in lead  # the alternate key travels in the URL only
    assert "fullname" not in lead  # computed by Dataverse


def test_single_word_names_become_the_last_name():
    assert prospects.split_name("Cher") == ("", "Cher")


def test_identity_of_a_prospect_across_legal_entities():
    assert prospects.prospect_key("usrt", "P-1") != prospects.prospect_key("usmf", "P-1")
    assert prospects.key_fold("USMF:P-000008") == prospects.key_fold("usmf:p-000008")
    org, person = (prospects.customer_account("{legal_entity}-{prospect_id}-{role}", "usrt", "P-000123", role)
                   for role in ("ORG", "ADM"))  # fmt: skip
    assert (org, person) == ("USRT-P-000123-ORG", "USRT-P-000123-ADM")


# --- One email per legal entity (pure: the holders come in as a mapping) ---------------------------


def page_of(*rows: tuple[str, str, str]) -> pd.DataFrame:
    """A validated page of (legal entity, prospect id, email) rows."""
    return prospects.validate_page([{**GOOD, "dataAreaId": le, "ProspectId": pid, "PrimaryEmailAddress": email}
                                    for le, pid, email in rows], "usrt")  # fmt: skip


def errors_of(page: pd.DataFrame) -> dict[str, str | None]:
    return dict(zip(page["legal_entity"] + "/" + page["prospect_id"], page["error"]))


def test_emails_compare_case_insensitively_and_trimmed():
    assert prospects.email_key("  Ada@Engines.Example ") == prospects.email_key("ada@engines.example")


def test_within_a_page_the_lowest_prospect_id_keeps_an_email_and_the_others_are_refused():
    page = page_of(("usrt", "P-000007", "ADA@engines.example"), ("usrt", "P-000002", "ada@engines.example"),
                   ("usrt", "P-000009", "ada@Engines.example"))  # fmt: skip

    checked = prospects.refuse_duplicate_emails(page, "usrt", {})

    assert errors_of(checked) == {
        "usrt/P-000007": "prospect usrt/P-000007: PrimaryEmailAddress: the same email as prospect usrt/P-000002 "
                         "(emails must be unique per legal entity)",
        "usrt/P-000002": None,
        "usrt/P-000009": "prospect usrt/P-000009: PrimaryEmailAddress: the same email as prospect usrt/P-000002 "
                         "(emails must be unique per legal entity)",
    }  # fmt: skip
    refused = checked[checked["error"].notna()]
    assert refused["email"].isna().all()
    assert [row["ProspectId"] for row in refused["prospect"]] == ["P-000007", "P-000009"]  # kept, beside the error
    assert page["error"].isna().all()  # the input page is left as it was


def test_a_tracked_holder_keeps_its_email_against_any_prospect_of_the_page_even_itself_again():
    page = page_of(("usrt", "P-000001", "ada@engines.example"), ("usrt", "P-000005", "ada@engines.example"))

    checked = prospects.refuse_duplicate_emails(page, "usrt", {"ada@engines.example": "P-000005"})

    assert "the same email as prospect usrt/P-000005" in errors_of(checked)["usrt/P-000001"]
    assert errors_of(checked)["usrt/P-000005"] is None


def test_other_legal_entities_and_invalid_rows_neither_hold_nor_lose_an_email():
    page = page_of(("usmf", "P-000001", "ada@engines.example"), ("usrt", "P-000002", "not-an-email"),
                   ("usrt", "P-000003", "ada@engines.example"))  # fmt: skip

    checked = prospects.refuse_duplicate_emails(page, "usrt", {})

    assert checked["error"].tolist() == page["error"].tolist()
    assert errors_of(checked)["usrt/P-000003"] is None


VERSIONS = [{"ProspectId": f"P-{n:06d}", "@odata.etag": f'W/"{n}"'} for n in range(1, 8)]


def fingerprint(*pages) -> prospects.PendingFingerprint:
    taken = prospects.PendingFingerprint()
    for page in pages:
        taken.add(page)
    return taken


def test_a_fingerprint_is_the_same_whatever_the_order_and_pages_the_rows_come_in():
    whole = fingerprint(VERSIONS)
    assert fingerprint(VERSIONS[5:], VERSIONS[:2], VERSIONS[2:5]).value == whole.value
    assert fingerprint(VERSIONS[::-1]).value == whole.value
    assert whole.count == 7 and whole.value.startswith("v1:7:") and len(whole.value) == len("v1:7:") + 64


def test_a_fingerprint_changes_with_any_prospect_added_gone_or_written():
    whole = fingerprint(VERSIONS).value
    assert fingerprint(VERSIONS[1:]).value != whole  # decided or deleted
    assert fingerprint(VERSIONS, [{"ProspectId": "P-000008", "@odata.etag": 'W/"8"'}]).value != whole
    written = [{**row, "@odata.etag": 'W/"99"'} if row["ProspectId"] == "P-000003" else row for row in VERSIONS]
    assert fingerprint(written).value != whole
    # two rows trading etags are two writes, not the same set
    swapped = [{**VERSIONS[0], "@odata.etag": VERSIONS[1]["@odata.etag"]},
               {**VERSIONS[1], "@odata.etag": VERSIONS[0]["@odata.etag"]}, *VERSIONS[2:]]  # fmt: skip
    assert fingerprint(swapped).value != whole


def test_a_fingerprint_compares_keys_as_hq_does_and_an_empty_set_has_one():
    upper = [{**row, "ProspectId": row["ProspectId"].lower()} for row in VERSIONS]
    assert fingerprint(upper).value == fingerprint(VERSIONS).value
    assert fingerprint().value == fingerprint([]).value == "v1:0:" + "0" * 64


def test_the_watermark_of_a_legal_entity_is_named_in_lowercase_beside_the_delta_links():
    assert prospects.watermark_name("USRT") == prospects.watermark_name("usrt") == "Prospects@usrt"
