"""Commerce headquarters (Finance and Operations OData): the operations of the onboarding flow."""

from __future__ import annotations

from collections.abc import Iterator

from .odata import ODataClient, key_segment, literal
from .settings import ServiceSettings

SYSTEM = "Commerce headquarters"

PROSPECT_FIELDS = (
    "dataAreaId", "ProspectId", "ProspectName", "CompanyName", "PrimaryEmailAddress", "PrimaryPhoneNumber",
    "AddressStreet", "AddressCity", "AddressStateId", "AddressZipCode", "AddressCountryRegionISOCode",
    "CurrencyCode", "LanguageId", "Note", "RetailChannelOperatingUnitPartyNumber", "IsB2BProspect",
    "B2BProspectStatus",
)  # fmt: skip

# Every call reads and writes across legal entities; without this HQ shows only the caller's default.
_CROSS_COMPANY = {"cross-company": "true"}


def enum_literal(enum_name: str, member: str) -> str:
    return f"Microsoft.Dynamics.DataEntities.{enum_name}'{member}'"


class CommerceClient:
    def __init__(self, odata: ODataClient) -> None:
        self.odata = odata

    @classmethod
    def connect(cls, settings: ServiceSettings) -> CommerceClient:
        return cls(ODataClient.connect(settings, system=SYSTEM, root_path="/data"))

    def iter_pending_prospect_pages(self, legal_entity: str) -> Iterator[list[dict]]:
        """Pending B2B prospects of one legal entity, a server page at a time."""
        query = (
            f"dataAreaId eq {literal(legal_entity)}"
            f" and IsB2BProspect eq {enum_literal('NoYes', 'Yes')}"
            f" and B2BProspectStatus eq {enum_literal('RetailB2BProspectStatus', 'Pending')}"
        )
        params = {**_CROSS_COMPANY, "$filter": query, "$select": ",".join(PROSPECT_FIELDS)}
        return self.odata.iter_pages("Prospects", operation="read pending B2B prospects", params=params)

    def get_prospect(self, legal_entity: str, prospect_id: str) -> dict | None:
        return self.odata.get(
            key_segment("Prospects", dataAreaId=legal_entity, ProspectId=prospect_id),
            operation="read prospect",
            record=f"prospect {legal_entity}/{prospect_id}",
            params=_CROSS_COMPANY,
        )

    def set_prospect_status(self, legal_entity: str, prospect_id: str, status: str, etag: str) -> None:
        """Approve or reject; HQ sends the email. The ETag makes a concurrent change fail with 412."""
        self.odata.request(
            "PATCH",
            key_segment("Prospects", dataAreaId=legal_entity, ProspectId=prospect_id),
            operation=f"set prospect status to {status}",
            record=f"prospect {legal_entity}/{prospect_id}",
            params=_CROSS_COMPANY,
            json={"B2BProspectStatus": status},
            headers={"If-Match": etag},
        )

    def get_customer(self, legal_entity: str, customer_account: str) -> dict | None:
        return self.odata.get(
            key_segment("CustomersV3", dataAreaId=legal_entity, CustomerAccount=customer_account),
            operation="read customer",
            record=f"customer {legal_entity}/{customer_account}",
            params=_CROSS_COMPANY,
        )

    def create_customer(self, customer: dict) -> dict:
        return self.odata.request(
            "POST",
            "CustomersV3",
            operation=f"create {customer['PartyType']} customer",
            record=f"customer {customer['dataAreaId']}/{customer['CustomerAccount']}",
            params=_CROSS_COMPANY,
            json=customer,
        ).json()

    def find_b2b_hierarchy(self, organization_party_number: str) -> dict | None:
        page = self.odata.get(
            "CustomerHiearchies",
            operation="find customer hierarchy",
            record=f"organization party {organization_party_number}",
            params={
                **_CROSS_COMPANY,
                "$filter": f"OrganizationPartyNumber eq {literal(organization_party_number)}",
                "$top": "1",
            },
        )
        return next(iter(page["value"]), None) if page else None

    def create_hierarchy(self, hierarchy: dict) -> dict:
        return self.odata.request(
            "POST",
            "CustomerHiearchies",
            operation="create customer hierarchy",
            record=f"organization party {hierarchy['OrganizationPartyNumber']}",
            params=_CROSS_COMPANY,
            json=hierarchy,
        ).json()

    def get_hierarchy_node(self, hierarchy_id: str, party_number: str) -> dict | None:
        return self.odata.get(
            key_segment("CustomerHierarchyNodes", CustomerHierarchyId=hierarchy_id, NodePartyNumber=party_number),
            operation="read customer hierarchy node",
            record=f"hierarchy {hierarchy_id} party {party_number}",
            params=_CROSS_COMPANY,
        )

    def create_hierarchy_node(self, node: dict) -> dict:
        return self.odata.request(
            "POST",
            "CustomerHierarchyNodes",
            operation=f"add {node['Role']} node to customer hierarchy",
            record=f"hierarchy {node['CustomerHierarchyId']} party {node['NodePartyNumber']}",
            params=_CROSS_COMPANY,
            json=node,
        ).json()
