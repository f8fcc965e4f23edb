from b2b_onboarding import prospects

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
    _, error = prospects.validate({"dataAreaId": "usrt", "ProspectId": "P" * 17})
    assert "ProspectId" in error and "ProspectName" in error and "PrimaryEmailAddress" in error


def test_non_latin_and_emoji_names_are_valid():
    prospect, error = prospects.validate({**GOOD, "ProspectName": "Łukasz Żółć 😀", "CompanyName": "株式会社テスト"})
    assert error is None
    assert prospects.lead_of(prospect.model_dump())["lastname"] == "😀"


def test_control_characters_in_identity_fields_are_refused():
    _, error = prospects.validate({**GOOD, "ProspectId": "P-1\nP-2"})
    assert "ProspectId" in error


def test_validate_page_keeps_every_row_with_either_fields_or_error():
    frame = prospects.validate_page([GOOD, {**GOOD, "ProspectId": "P-2", "PrimaryEmailAddress": "x"}])
    assert list(frame["prospect_id"]) == ["P-000123", "P-2"]
    assert frame.loc[0, "error"] is None and frame.loc[0, "prospect"]["CompanyName"] == "Starfleet Supplies"
    assert frame.loc[1, "prospect"] is None and "PrimaryEmailAddress" in frame.loc[1, "error"]


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
    org, person = prospects.customer_accounts("P-000123")
    assert org != person and len(org) <= 20 and len(person) <= 20
