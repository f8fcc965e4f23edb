"""The actors (a seller in Sales, a clerk in Commerce HQ) against the fakes, over real HTTPS with
real MSAL tokens: the fake Entra ID of conftest's `entra_server`, and Commerce and Dataverse
served in-process beside it with the same CA and token issuer."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from d365_fakes import commerce, dataverse
from d365_fakes.actors import Clerk, Seller
from d365_fakes.commerce import CUSTOMERS, PROSPECTS, CommerceState
from d365_fakes.dataverse import DataverseState


@dataclass(frozen=True)
class Endpoints:
    """What the actors read of `running.Endpoints`."""

    entra: str
    tenant_id: str
    authority: str
    commerce: str
    dataverse: str
    ca_bundle: str


@dataclass(frozen=True)
class World:
    endpoints: Endpoints
    hq: CommerceState
    sales: DataverseState


@pytest.fixture
def world(entra_server, serve_https) -> World:
    hq, sales = CommerceState(), DataverseState()
    clients = {entra_server.client.client_id: entra_server.client}  # default company usmf
    hq_url = serve_https(lambda url: commerce.create_app(hq, entra_server.issuer, url, clients), entra_server.tls)
    sales_url = serve_https(lambda url: dataverse.create_app(sales, entra_server.issuer, url, clients), entra_server.tls)
    endpoints = Endpoints(entra_server.url, entra_server.tenant_id, entra_server.authority, hq_url, sales_url,
                          str(entra_server.tls.ca_bundle))  # fmt: skip
    return World(endpoints, hq, sales)


@pytest.fixture
def seller(world: World, entra_server) -> Iterator[Seller]:
    seller = Seller(world.endpoints, entra_server.client.client_id, entra_server.client.client_secret)
    yield seller
    seller.close()


@pytest.fixture
def clerk(world: World, entra_server) -> Iterator[Clerk]:
    clerk = Clerk(world.endpoints, entra_server.client.client_id, entra_server.client.client_secret)
    yield clerk
    clerk.close()


def new_lead(seller: Seller, **columns) -> str:
    """An open lead, as the integration writes one."""
    row = {"firstname": "Ann", "lastname": "Lee", "companyname": "Contoso", "emailaddress1": "ann@contoso.test",
           "msdyn_b2bcommerceprospect": True, **columns}  # fmt: skip
    return seller.call("POST", "leads", json=row).headers["OData-EntityId"].rsplit("(", 1)[1].rstrip(")")


def lead(seller: Seller, lead_id: str) -> dict:
    return seller.call("GET", f"leads({lead_id})").json()


# --- the seller ----------------------------------------------------------------------------------


def test_qualify_creates_everything_by_default(seller: Seller) -> None:
    lead_id = new_lead(seller)
    opportunity_id = seller.qualify(lead_id)
    qualified = lead(seller, lead_id)
    assert (qualified["statecode"], qualified["statuscode"]) == (1, 3)
    assert qualified["_qualifyingopportunityid_value"] == opportunity_id
    account = seller.call("GET", f"accounts({qualified['_parentaccountid_value']})").json()
    contact = seller.call("GET", f"contacts({qualified['_parentcontactid_value']})").json()
    assert account["_originatingleadid_value"] == contact["_originatingleadid_value"] == lead_id


def test_link_existing_rows_then_qualify_without_creating_them(seller: Seller, world: World) -> None:
    account_id = seller.create_account("Contoso Ltd", accountnumber="C000042", email="info@contoso.test")
    contact_id = seller.create_contact("Ann", "Lee", "ann@contoso.test", account_id=account_id)
    contact = seller.call("GET", f"contacts({contact_id})").json()
    assert (contact["fullname"], contact["_parentcustomerid_value"]) == ("Ann Lee", account_id)
    account = seller.call("GET", f"accounts({account_id})").json()
    assert (account["name"], account["accountnumber"], account["emailaddress1"]) == ("Contoso Ltd", "C000042", "info@contoso.test")

    lead_id = new_lead(seller)
    seller.link(lead_id, account_id=account_id, contact_id=contact_id)
    linked = lead(seller, lead_id)
    assert (linked["_parentaccountid_value"], linked["_parentcontactid_value"]) == (account_id, contact_id)
    with pytest.raises(ValueError):
        seller.link(lead_id)

    writes = world.sales.counts()["writes"]
    assert seller.qualify(lead_id, create_account=False, create_contact=False, create_opportunity=False) is None
    qualified = lead(seller, lead_id)
    assert (qualified["statecode"], qualified["_qualifyingopportunityid_value"]) == (1, None)
    assert (qualified["_parentaccountid_value"], qualified["_parentcontactid_value"]) == (account_id, contact_id)
    after = world.sales.counts()["writes"]
    assert (after["accounts"], after["contacts"], after["opportunities"]) == (
        writes["accounts"], writes["contacts"], writes["opportunities"])

    opportunity_id = seller.create_opportunity(lead_id, account_id, contact_id, name="Contoso B2B")
    opportunity = seller.call("GET", f"opportunities({opportunity_id})").json()
    assert (opportunity["name"], opportunity["statecode"], opportunity["_originatingleadid_value"],
            opportunity["_parentaccountid_value"], opportunity["_parentcontactid_value"]) == (
        "Contoso B2B", 0, lead_id, account_id, contact_id)  # fmt: skip
    seller.close_opportunity(opportunity_id, won=True)
    assert seller.call("GET", f"opportunities({opportunity_id})").json()["statecode"] == 1


def test_link_of_a_missing_lead_is_refused_not_upserted(seller: Seller) -> None:
    account_id = seller.create_account("Contoso")
    with pytest.raises(RuntimeError, match="404"):
        seller.link("00000000-0000-0000-0000-0000000000aa", account_id=account_id)


def test_reactivate_and_edit_a_disqualified_lead(seller: Seller) -> None:
    lead_id = new_lead(seller)
    seller.disqualify(lead_id)
    assert lead(seller, lead_id)["statecode"] == 2
    seller.reactivate(lead_id)
    reopened = lead(seller, lead_id)
    assert (reopened["statecode"], reopened["statuscode"]) == (0, 1)
    seller.edit_lead(lead_id, telephone1="+1 425 555 0100", subject="Call back")
    edited = lead(seller, lead_id)
    assert (edited["telephone1"], edited["subject"]) == ("+1 425 555 0100", "Call back")
    assert seller.qualify(lead_id) is not None  # reopened, it can be qualified


def test_create_opportunity_needs_an_existing_lead(seller: Seller) -> None:
    with pytest.raises(RuntimeError, match="0x80040217"):
        seller.create_opportunity("00000000-0000-0000-0000-0000000000aa")


# --- the clerk -----------------------------------------------------------------------------------


def test_clerk_corrects_a_pending_prospect(clerk: Clerk, world: World) -> None:
    awkward = "P-1/2 #x"
    world.hq.seed_prospects([{"dataAreaId": "usrt", "ProspectId": awkward, "ProspectName": "Ann Lee",
                              "PrimaryEmailAddress": "ann@contoso.test"}])  # fmt: skip
    before = clerk.prospect("USRT", awkward)
    clerk.correct("usrt", awkward, PrimaryEmailAddress="ann.lee@contoso.test", PrimaryPhoneNumber="+1 425 555 0100")
    after = clerk.prospect("usrt", awkward)
    assert (after["PrimaryEmailAddress"], after["PrimaryPhoneNumber"], after["B2BProspectStatus"]) == (
        "ann.lee@contoso.test", "+1 425 555 0100", "Pending")
    assert after["@odata.etag"] != before["@odata.etag"]
    clerk.set_status("usrt", awkward, "Approved")
    assert clerk.prospect("usrt", awkward)["B2BProspectStatus"] == "Approved"
    assert [email["template"] for email in world.hq.outbox] == ["B2B prospect approved"]
    with pytest.raises(RuntimeError, match="404"):
        clerk.correct("usmf", awkward, Note="wrong company")


def test_clerk_creates_and_lists_customers_per_legal_entity(clerk: Clerk) -> None:
    usrt = clerk.create_customer({"dataAreaId": "usrt", "CustomerGroupId": "10", "PartyType": "Organization",
                                  "OrganizationName": "Contoso"})  # fmt: skip
    default = clerk.create_customer({"CustomerGroupId": "10", "PartyType": "Person", "PersonFirstName": "Ann",
                                     "PersonLastName": "Lee", "PrimaryContactEmail": "ann@contoso.test"})  # fmt: skip
    assert (usrt["dataAreaId"], usrt["CustomerAccount"]) == ("usrt", "USRT-000001")
    assert (default["dataAreaId"], default["CustomerAccount"]) == ("usmf", "USMF-000001")  # the clerk's default company
    assert [row["PartyNumber"] for row in clerk.customers("usrt")] == [usrt["PartyNumber"]]
    assert [row["PersonLastName"] for row in clerk.customers("usmf")] == ["Lee"]
    assert clerk.customers("o'brien") == []
    with pytest.raises(RuntimeError, match="OrganizationName must be filled in"):
        clerk.create_customer({"dataAreaId": "usrt", "CustomerGroupId": "10", "PartyType": "Organization"})
    with pytest.raises(RuntimeError, match="Field 'CustomerGroupId' must be filled in"):
        clerk.create_customer({"dataAreaId": "usrt", "PartyType": "Organization", "OrganizationName": "No group"})
    assert len(clerk.all(CUSTOMERS.name)) == 2 and clerk.all(PROSPECTS.name) == []


# --- the cut-over from dual-write (needs the Dataverse fake's msdyn_company and cdm_companies) ------


def test_create_dual_write_lead(seller: Seller, world: World) -> None:
    if "cdm_companies" not in dataverse.TABLES or not hasattr(world.sales, "seed_companies"):
        pytest.skip("the Dataverse fake has no cdm_companies table yet")
    world.sales.seed_companies(["usrt"])
    [company] = seller.rows("cdm_companies", {"$filter": "cdm_companycode eq 'USRT'"})
    company_id = company["cdm_companyid"]
    prospect = {"dataAreaId": "usrt", "ProspectId": "P-000007", "ProspectName": "Ann Marie O'Brien",
                "CompanyName": "Contoso", "PrimaryEmailAddress": "ann@contoso.test", "PrimaryPhoneNumber": "",
                "AddressStreet": "1 Main St", "AddressCity": "Redmond", "AddressZipCode": "98052",
                "AddressCountryRegionISOCode": "US", "B2BProspectStatus": "Pending"}  # fmt: skip
    lead_id = seller.create_dual_write_lead(prospect, company_id)
    row = lead(seller, lead_id)
    assert row["msdyn_prospectid"] == "P-000007"
    assert row["_msdyn_company_value"] == company_id
    assert (row["firstname"], row["lastname"], row["fullname"]) == ("Ann Marie", "O'Brien", "Ann Marie O'Brien")
    assert (row["companyname"], row["emailaddress1"], row["telephone1"]) == ("Contoso", "ann@contoso.test", None)
    assert (row["address1_line1"], row["address1_city"], row["address1_postalcode"], row["address1_country"]) == (
        "1 Main St", "Redmond", "98052", "US")
    assert (row["msdyn_b2bcommerceprospect"], row["msdyn_b2bprospectstatus"], row["statecode"]) == (True, 0, 0)
    untagged = seller.create_dual_write_lead(prospect | {"ProspectId": "P-000008"}, company_id, tagged=False)
    assert lead(seller, untagged)["msdyn_b2bcommerceprospect"] is False
