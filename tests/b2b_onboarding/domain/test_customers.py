"""Which Commerce customers a qualified lead stands for: existing ones reused, never doubled, never
overwritten; contradictions refused with a conflict naming the prospect (pure rules, no I/O)."""

from __future__ import annotations

import pytest

from b2b_onboarding.domain import customers
from b2b_onboarding.errors import DecisionConflict

ACCOUNT = {"accountid": "a-1", "name": "Contoso Ltd", "accountnumber": None}
CONTACT = {"contactid": "c-1", "firstname": "Ann", "lastname": "Lee", "emailaddress1": "ann@old.example"}


def customer(le: str, account: str, party_type: str, party: str, email: str | None = None, name: str | None = None) -> dict:
    return {"dataAreaId": le, "CustomerAccount": account, "PartyType": party_type, "PartyNumber": party,
            "OrganizationName": name, "PrimaryContactEmail": email}  # fmt: skip


def choose(known: customers.Known, account: dict = ACCOUNT, email: str = "ann@contoso.example", **options) -> customers.Choice:
    return customers.choose(legal_entity="usrt", prospect_id="P-7", account=account, contact=CONTACT, email=email,
                            known=known, **options)  # fmt: skip


def test_a_new_company_and_person_are_created_numbered_by_hq_with_the_prospects_current_email():
    choice = choose(customers.Known.of([], "usrt"), common={"CustomerGroupId": "B2B"})
    assert choice.reused == 0
    organization, person = choice.to_create
    assert "CustomerAccount" not in organization and "CustomerAccount" not in person  # HQ's number sequence
    assert organization["OrganizationName"] == "Contoso Ltd" and organization["dataAreaId"] == "usrt"
    assert person["PrimaryContactEmail"] == "ann@contoso.example"  # HQ's email now, not the contact's old one
    assert (person["PersonFirstName"], person["PersonLastName"], person["CustomerGroupId"]) == ("Ann", "Lee", "B2B")


def test_an_account_already_numbered_as_an_organization_customer_is_reused_and_its_number_kept():
    known = customers.Known.of([customer("usrt", "C000042", "Organization", "0042", name="Contoso")], "usrt")
    choice = choose(known, account={**ACCOUNT, "accountnumber": "c000042"})  # any case
    assert choice.organization["CustomerAccount"] == "C000042" and choice.reused == 1
    assert [row["PartyType"] for row in choice.to_create] == ["Person"]


def test_an_existing_person_with_the_same_email_in_the_legal_entity_is_reused_whatever_the_case():
    known = customers.Known.of([customer("usrt", "C000050", "Person", "0050", email="ANN@Contoso.example"),
                                customer("usmf", "C000050", "Person", "0051", email="ann@contoso.example")], "usrt")  # fmt: skip
    choice = choose(known)
    assert choice.person["PartyNumber"] == "0050" and [row["PartyType"] for row in choice.to_create] == ["Organization"]


def test_an_interrupted_runs_organization_is_found_by_the_prospects_email_and_the_accounts_name():
    known = customers.Known.of([customer("usrt", "C000060", "Organization", "0060", "ann@contoso.example", "CONTOSO LTD"),
                                customer("usrt", "C000061", "Person", "0061", "ann@contoso.example")], "usrt")  # fmt: skip
    choice = choose(known)
    assert choice.to_create == [] and choice.organization["CustomerAccount"] == "C000060"


@pytest.mark.parametrize(("rows", "number", "kind"), [
    ([], "C404", "account_number_unknown"),
    ([customer("usmf", "C000042", "Organization", "0042")], "C000042", "account_of_other_legal_entity"),
    ([customer("usrt", "C000042", "Person", "0042")], "C000042", "account_number_not_organization"),
])  # fmt: skip
def test_an_account_number_naming_no_organization_of_the_legal_entity_is_a_conflict(rows, number, kind):
    with pytest.raises(DecisionConflict) as raised:
        choose(customers.Known.of(rows, "usrt"), account={**ACCOUNT, "accountnumber": number})
    assert raised.value.kind == kind
    assert str(raised.value).startswith("prospect usrt/P-7: ") and "Next step" in str(raised.value)


def test_a_person_of_another_organizations_hierarchy_is_a_conflict_and_of_the_same_one_is_reused():
    person = customer("usrt", "C000050", "Person", "0050", email="ann@contoso.example")
    mine = customer("usrt", "C000042", "Organization", "0042", name="Contoso")
    nodes = [{"CustomerHierarchyId": "H-1", "NodePartyNumber": "0050", "VersionRemoved": 0}]
    other = customers.Known.of([person, mine], "usrt", nodes, [{"CustomerHierarchyId": "h-1", "OrganizationPartyNumber": "0099"}])
    with pytest.raises(DecisionConflict) as raised:
        choose(other, account={**ACCOUNT, "accountnumber": "C000042"})
    assert raised.value.kind == "person_of_other_organization"
    same = customers.Known.of([person, mine], "usrt", nodes, [{"CustomerHierarchyId": "H-1", "OrganizationPartyNumber": "0042"}])
    assert choose(same, account={**ACCOUNT, "accountnumber": "C000042"}).reused == 2


def test_a_template_numbers_new_customers_with_the_legal_entity_and_finds_them_again():
    template = "{legal_entity}-{prospect_id}-{role}"
    first = choose(customers.Known.of([], "usrt"), template=template)
    assert [row["CustomerAccount"] for row in first.to_create] == ["USRT-P-7-ORG", "USRT-P-7-ADM"]
    known = customers.Known.of([customer("usrt", "USRT-P-7-ORG", "Organization", "1"),
                                customer("usrt", "usrt-p-7-adm", "Person", "2", email="other@contoso.example")], "usrt")  # fmt: skip
    assert choose(known, template=template).to_create == []


def test_a_template_giving_an_account_longer_than_hq_holds_is_refused_naming_the_prospect():
    with pytest.raises(DecisionConflict) as raised:
        choose(customers.Known.of([], "usrt"), template="{legal_entity}-CUSTOMER-{prospect_id}-{role}")
    assert raised.value.kind == "customer_account_too_long" and "prospect usrt/P-7" in str(raised.value)
