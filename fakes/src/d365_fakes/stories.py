"""How real sellers and clerks work, beyond the demo's one-click decisions: a second requester of a
company that is already a B2B customer, a lead qualified first and given its opportunity later, a
prospect corrected in HQ after its lead exists, and a lead dual-write wrote before the cut-over.
`make demo` and the end-to-end "seller stories" tests play them through the Web APIs and judge the
result from what Commerce, Sales and the outbox show."""

from __future__ import annotations

from dataclasses import dataclass, field

from d365_fakes.actors import Clerk, Seller
from d365_fakes.dataverse import company_id
from d365_fakes.scenario import CUSTOMER_GROUP

LEGAL_ENTITY = "usrt"
ONBOARDED = "Contoso Ltd"  # a company whose B2B customer hierarchy exists before the stories start
HIERARCHY = "CONTOSO-B2B"


def request(number: int, name: str, company: str, email: str) -> dict:
    """A Pending B2B request of the stories' legal entity, `S-<number>`."""
    return {"dataAreaId": LEGAL_ENTITY, "ProspectId": f"S-{number:06d}", "ProspectName": name, "CompanyName": company,
            "PrimaryEmailAddress": email, "PrimaryPhoneNumber": "+1 555 0100", "AddressCity": "Seattle",
            "AddressZipCode": "98052", "AddressCountryRegionISOCode": "USA", "CurrencyCode": "USD",
            "Note": "Requested on the B2B site", "RetailChannelOperatingUnitPartyNumber": "000000123"}  # fmt: skip


@dataclass
class Stories:
    """The story prospects, what each seller will decide (by the prospect's email as HQ ends up
    having it, as `scenario.observe` reads plans), and what existed before the first run."""

    prospects: list[dict]
    plan: dict[str, str]
    organization: dict = field(default_factory=dict)  # the onboarded company's customer in HQ
    account_id: str = ""  # its account in Sales, numbered with that customer account
    dual_write_lead_id: str = ""
    corrected_email: str = "grace.hopper@navy.example"

    def id_of(self, story: str) -> str:
        return {"second requester": "S-000001", "late opportunity": "S-000002", "correction": "S-000003",
                "dual-write lead": "S-000004"}[story]  # fmt: skip


def seed(admin, seller: Seller, clerk: Clerk) -> Stories:
    """The world as a tenant moving off dual-write has it: Contoso is an onboarded B2B customer
    (Organization, its Admin, its hierarchy; its account in Sales carries the customer account), and
    dual-write wrote the lead of one Pending prospect. Then four requests wait in HQ."""
    prospects = [
        request(1, "Mary Second", ONBOARDED, "mary@contoso.example"),
        request(2, "Linus Later", "Northwind Traders", "linus@northwind.example"),
        request(3, "Grace Hoper", "Fabrikam Inc", "grace@fabrikam.example"),  # a typo the clerk fixes
        request(4, "Dale Dualwrite", "Adventure Works", "dale@adventure.example"),
    ]
    admin.seed_prospects(prospects)
    stories = Stories(prospects, {"mary@contoso.example": "won", "linus@northwind.example": "won",
                                  "grace.hopper@navy.example": "won", "dale@adventure.example": "won"})  # fmt: skip
    stories.organization = clerk.create_customer({"dataAreaId": LEGAL_ENTITY, "PartyType": "Organization",
                                                  "OrganizationName": ONBOARDED, "CustomerGroupId": CUSTOMER_GROUP,
                                                  "PrimaryContactEmail": "office@contoso.example"})  # fmt: skip
    olga = clerk.create_customer({"dataAreaId": LEGAL_ENTITY, "PartyType": "Person", "PersonFirstName": "Olga",
                                  "PersonLastName": "First", "PrimaryContactEmail": "olga@contoso.example",
                                  "CustomerGroupId": CUSTOMER_GROUP})  # fmt: skip
    cross = {"cross-company": "true"}
    clerk.call("POST", "CustomerHiearchies", params=cross, json={
        "dataAreaId": LEGAL_ENTITY, "CustomerHierarchyId": HIERARCHY, "Name": ONBOARDED, "Purpose": "B2BOrganization",
        "OrganizationPartyNumber": stories.organization["PartyNumber"]})  # fmt: skip
    clerk.call("POST", "CustomerHierarchyNodes", params=cross, json={
        "CustomerHierarchyId": HIERARCHY, "NodePartyNumber": olga["PartyNumber"], "Role": "Admin", "NodeType": "Customer"})  # fmt: skip
    stories.account_id = seller.create_account(ONBOARDED, accountnumber=stories.organization["CustomerAccount"])
    stories.dual_write_lead_id = seller.create_dual_write_lead(prospects[3], company_id(LEGAL_ENTITY))
    return stories


def lead_of(seller: Seller, email: str) -> dict:
    [lead] = seller.rows("leads", {"$filter": f"emailaddress1 eq '{email}'"})
    return lead


def after_first_sync(seller: Seller, clerk: Clerk, stories: Stories) -> None:
    """The second requester's seller qualifies against the existing account and wins; the late
    opportunity's seller qualifies without one; a clerk corrects the mistyped request in HQ."""
    mary = lead_of(seller, "mary@contoso.example")
    seller.link(mary["leadid"], account_id=stories.account_id)
    seller.close_opportunity(seller.qualify(mary["leadid"], create_account=False), won=True)
    seller.qualify(lead_of(seller, "linus@northwind.example")["leadid"], create_opportunity=False)
    clerk.correct(LEGAL_ENTITY, stories.id_of("correction"), ProspectName="Grace Hopper",
                  PrimaryEmailAddress=stories.corrected_email, PrimaryPhoneNumber="+1 555 0199")  # fmt: skip


def after_corrections_synced(seller: Seller, stories: Stories) -> None:
    """The opportunity made late is won; the corrected lead and the dual-write lead are won."""
    linus = lead_of(seller, "linus@northwind.example")
    opportunity = seller.create_opportunity(linus["leadid"], linus["_parentaccountid_value"], linus["_parentcontactid_value"])
    seller.close_opportunity(opportunity, won=True)
    for email in (stories.corrected_email, "dale@adventure.example"):
        seller.close_opportunity(seller.qualify(lead_of(seller, email)["leadid"]), won=True)


def judge(seller: Seller, clerk: Clerk, outbox: list[dict], stories: Stories) -> tuple[dict, list[str]]:
    """(counts for the demo's summary, violations) from what the systems show."""
    violations = []
    customers = clerk.customers(LEGAL_ENTITY)
    contosos = [row for row in customers if row["PartyType"] == "Organization" and row["OrganizationName"] == ONBOARDED]
    nodes = [row for row in clerk.all("CustomerHierarchyNodes") if row["CustomerHierarchyId"] == HIERARCHY]
    mary = [row for row in customers if row["PartyType"] == "Person" and row["PrimaryContactEmail"] == "mary@contoso.example"]
    reused = int(len(contosos) == 1 and len(mary) == 1 and
                 any(node["NodePartyNumber"] == mary[0]["PartyNumber"] and node["Role"] == "User" for node in nodes))  # fmt: skip
    if not reused:
        violations.append(f"second requester: {len(contosos)} '{ONBOARDED}' organizations, {len(mary)} persons, "
                          f"hierarchy nodes {[(node['NodePartyNumber'], node['Role']) for node in nodes]}")  # fmt: skip
    if len([row for row in clerk.all("CustomerHiearchies") if row["OrganizationPartyNumber"] == stories.organization["PartyNumber"]]) != 1:
        violations.append("the onboarded company got a second hierarchy")
    linus = lead_of(seller, "linus@northwind.example")
    made_later = seller.rows("opportunities", {"$filter": f"_originatingleadid_value eq {linus['leadid']}"})
    late = int(linus["_qualifyingopportunityid_value"] is None and [row["statecode"] for row in made_later] == [1]
               and clerk.prospect(LEGAL_ENTITY, stories.id_of("late opportunity"))["B2BProspectStatus"] == "Approved")  # fmt: skip
    if not late:
        violations.append(f"late opportunity: not approved (opportunities {made_later})")
    grace = lead_of(seller, stories.corrected_email)
    person = [row for row in customers if row["PartyType"] == "Person" and row["PrimaryContactEmail"] == stories.corrected_email]
    approval = [mail["to"] for mail in outbox if mail["ProspectId"] == stories.id_of("correction")]
    corrected = int(grace["telephone1"] == "+1 555 0199" and grace["lastname"] == "Hopper" and len(person) == 1
                    and approval == [stories.corrected_email])  # fmt: skip
    if not corrected:
        violations.append(f"correction: lead {grace['emailaddress1']}/{grace['telephone1']}/{grace['lastname']}, "
                          f"{len(person)} persons with the new email, approval emails to {approval}")  # fmt: skip
    dale = seller.rows("leads", {"$filter": f"msdyn_prospectid eq '{stories.id_of('dual-write lead')}'"})
    adopted = int([row["leadid"] for row in dale] == [stories.dual_write_lead_id] and
                  clerk.prospect(LEGAL_ENTITY, stories.id_of("dual-write lead"))["B2BProspectStatus"] == "Approved")  # fmt: skip
    if not adopted:
        violations.append(f"dual-write lead: leads {[row['leadid'] for row in dale]}, expected only {stories.dual_write_lead_id}")
    counts = {"existing_customers_reused": reused, "late_opportunities": late, "leads_corrected": corrected,
              "leads_adopted_from_dual_write": adopted}  # fmt: skip
    return counts, violations
