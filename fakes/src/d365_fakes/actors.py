"""People at work in the two systems, through the same APIs and auth as everyone else:
a seller in Sales, and a back-office clerk in Commerce headquarters.

Each method is one real Web API or OData call (or a read and a write), made as the person would
make it through the product's own forms; an error answer raises RuntimeError with its body.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import httpx
import msal

from d365_fakes.running import Endpoints

# Dual-write's "Prospects (leads)" map (README, "Sellers, clerks and the cut-over"): prospect field -> lead column. The
# name is split below (Dataverse composes a lead's fullname from firstname and lastname).
DUAL_WRITE_LEAD_COLUMNS = {
    "CompanyName": "companyname",
    "PrimaryEmailAddress": "emailaddress1",
    "PrimaryPhoneNumber": "telephone1",
    "AddressStreet": "address1_line1",
    "AddressCity": "address1_city",
    "AddressStateId": "address1_stateorprovince",
    "AddressZipCode": "address1_postalcode",
    "AddressCountryRegionISOCode": "address1_country",
}
# RetailB2BProspectStatus members by value, as dual-write maps the enum to the choice column.
B2B_PROSPECT_STATUS_VALUES = {"Pending": 0, "Approved": 1, "Rejected": 2, "Unknown": 3}
DEFAULT_OPPORTUNITY_NAME = "B2B partner onboarding"
_KEY_SAFE = "',="  # left as they are in a key segment; everything else in a value is percent-encoded


class ApiUser:
    """An app registration calling one API with real MSAL tokens over verified TLS."""

    def __init__(self, endpoints: Endpoints, resource: str, root_path: str, client_id: str, client_secret: str):
        self._scope = f"{resource}/.default"
        # An httpx client for MSAL too: requests would let REQUESTS_CA_BUNDLE override the CA bundle.
        self._msal = msal.ConfidentialClientApplication(
            client_id, client_credential=client_secret, authority=endpoints.authority,
            instance_discovery=False, http_client=httpx.Client(verify=endpoints.ca_bundle, timeout=30),
        )  # fmt: skip
        self._http = httpx.Client(
            base_url=f"{resource}{root_path}/",
            verify=endpoints.ca_bundle,
            timeout=30,
            headers={"Accept": "application/json", "OData-Version": "4.0", "OData-MaxVersion": "4.0"},
        )

    def close(self) -> None:
        self._http.close()

    def call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        token = self._msal.acquire_token_for_client(scopes=[self._scope])
        if "access_token" not in token:
            raise RuntimeError(f"no token: {token.get('error_description')}")
        headers = {"Authorization": f"Bearer {token['access_token']}", **kwargs.pop("headers", {})}
        response = self._http.request(method, path, headers=headers, **kwargs)
        if response.is_error:
            raise RuntimeError(f"{method} {path} answered {response.status_code}: {response.text}")
        return response

    def rows(self, path: str, params: dict[str, str] | None = None) -> list[dict]:
        page = self.call("GET", path, params=params).json()
        rows = page["value"]
        while next_link := page.get("@odata.nextLink"):
            page = self.call("GET", next_link).json()
            rows += page["value"]
        return rows


def created_id(response: httpx.Response) -> str:
    """The new row's id, from the `OData-EntityId: <root>/<set>(<id>)` of a 204 create."""
    return response.headers["OData-EntityId"].rsplit("(", 1)[1].rstrip(")")


def odata_key(entity_set: str, **key: str) -> str:
    """`Prospects(dataAreaId='usrt',ProspectId='P-1')`: quotes doubled, then percent-encoded, so a
    value holding `/ # ? %` or a quote travels as data."""
    literal = ",".join(f"{name}='" + value.replace("'", "''") + "'" for name, value in key.items())
    return f"{entity_set}({quote(literal, safe=_KEY_SAFE)})"


def split_name(full_name: str) -> tuple[str, str]:
    """("Ann Marie", "O'Brien") from "Ann Marie O'Brien": the last word is the last name."""
    first, _, last = " ".join(full_name.split()).rpartition(" ")
    return first, last


class Seller(ApiUser):
    """A seller working the Commerce B2B leads in Sales."""

    def __init__(self, endpoints: Endpoints, client_id: str, client_secret: str) -> None:
        super().__init__(endpoints, endpoints.dataverse, "/api/data/v9.2", client_id, client_secret)

    def view(self, name: str) -> list[dict]:
        query = self.rows("savedqueries", {"$filter": f"name eq '{name}'", "$select": "savedqueryid"})
        return self.rows("leads", {"savedQuery": query[0]["savedqueryid"]})

    def qualify(
        self, lead_id: str, create_account: bool = True, create_contact: bool = True, create_opportunity: bool = True
    ) -> str | None:
        """Qualifies the lead (QualifyLead, Status 3 Qualified), creating what is asked; a seller who
        linked an existing account or contact first (`link`) asks for fewer. Returns the new
        opportunity's id, or None when none is created."""
        created = self.call("POST", f"leads({lead_id})/Microsoft.Dynamics.CRM.QualifyLead", json={
            "CreateAccount": create_account, "CreateContact": create_contact,
            "CreateOpportunity": create_opportunity, "Status": 3,
        }).json()["value"]  # fmt: skip
        return next((row["opportunityid"] for row in created if row["@odata.type"].endswith("opportunity")), None)

    def link(self, lead_id: str, account_id: str | None = None, contact_id: str | None = None) -> None:
        """Points the open lead at an existing account and/or contact (the seller picks them in the
        lead form's company and contact sections before qualifying)."""
        binds = {}
        if account_id is not None:
            binds["parentaccountid@odata.bind"] = f"/accounts({account_id})"
        if contact_id is not None:
            binds["parentcontactid@odata.bind"] = f"/contacts({contact_id})"
        if not binds:
            raise ValueError("link needs an account_id or a contact_id")
        self.edit_lead(lead_id, **binds)

    def create_account(self, name: str, accountnumber: str | None = None, email: str | None = None) -> str:
        """A new account (returns its id)."""
        row = {"name": name, "accountnumber": accountnumber, "emailaddress1": email}
        return created_id(self.call("POST", "accounts", json={k: v for k, v in row.items() if v is not None}))

    def create_contact(self, firstname: str, lastname: str, email: str, account_id: str | None = None) -> str:
        """A new contact, of the account when given (returns its id)."""
        row: dict[str, Any] = {"firstname": firstname, "lastname": lastname, "emailaddress1": email}
        if account_id is not None:
            row["parentcustomerid_account@odata.bind"] = f"/accounts({account_id})"
        return created_id(self.call("POST", "contacts", json=row))

    def create_opportunity(
        self, lead_id: str, account_id: str | None = None, contact_id: str | None = None,
        name: str = DEFAULT_OPPORTUNITY_NAME,
    ) -> str:  # fmt: skip
        """An opportunity made later for a lead (one qualified without one): it carries
        `originatingleadid`. Returns its id."""
        row: dict[str, Any] = {"name": name, "originatingleadid@odata.bind": f"/leads({lead_id})"}
        if account_id is not None:
            row["parentaccountid@odata.bind"] = f"/accounts({account_id})"
        if contact_id is not None:
            row["parentcontactid@odata.bind"] = f"/contacts({contact_id})"
        return created_id(self.call("POST", "opportunities", json=row))

    def reactivate(self, lead_id: str) -> None:
        """Reopens a disqualified lead: Open, status New."""
        self.edit_lead(lead_id, statecode=0, statuscode=1)

    def edit_lead(self, lead_id: str, **columns: Any) -> None:
        """Saves the lead form: an update of an existing lead (`If-Match: *`, never an upsert).
        Lookups as `<navigation>@odata.bind` (pass them with `**{"...@odata.bind": ...}`)."""
        self.call("PATCH", f"leads({lead_id})", json=columns, headers={"If-Match": "*"})

    def create_dual_write_lead(self, prospect: dict, company_id: str, tagged: bool = True) -> str:
        """The lead dual-write's "Prospects (leads)" map wrote for `prospect` (a Prospects row, as
        HQ reads it) before the cut-over: keyed by the bare ProspectId plus the company lookup
        (`msdyn_company` -> `cdm_companies(<company_id>)`), as company-specific maps key their rows.
        Empty fields are left out (Dataverse stores an empty string as null). Returns the lead id."""
        first, last = split_name(prospect.get("ProspectName") or "")
        lead: dict[str, Any] = {
            "msdyn_prospectid": prospect["ProspectId"],
            "msdyn_company@odata.bind": f"/cdm_companies({company_id})",
            "firstname": first,
            "lastname": last,
            **{column: prospect.get(field) for field, column in DUAL_WRITE_LEAD_COLUMNS.items()},
            "msdyn_b2bcommerceprospect": tagged,
        }
        if prospect.get("B2BProspectStatus") in B2B_PROSPECT_STATUS_VALUES:
            lead["msdyn_b2bprospectstatus"] = B2B_PROSPECT_STATUS_VALUES[prospect["B2BProspectStatus"]]
        return created_id(self.call("POST", "leads", json={k: v for k, v in lead.items() if v not in (None, "")}))

    def disqualify(self, lead_id: str, statuscode: int = 6) -> None:
        self.call("PATCH", f"leads({lead_id})", json={"statecode": 2, "statuscode": statuscode},
                  headers={"If-Match": "*"})  # fmt: skip

    def delete_lead(self, lead_id: str) -> None:
        self.call("DELETE", f"leads({lead_id})")

    def close_opportunity(self, opportunity_id: str, won: bool) -> None:
        action, status = ("WinOpportunity", 3) if won else ("LoseOpportunity", 4)
        self.call("POST", action, json={"Status": status, "OpportunityClose": {
            "subject": "Won" if won else "Lost", "opportunityid@odata.bind": f"/opportunities({opportunity_id})",
        }})  # fmt: skip


class Clerk(ApiUser):
    """A back-office user of Commerce headquarters, across legal entities: reads, corrects prospects,
    approves or rejects them by hand, creates customers."""

    def __init__(self, endpoints: Endpoints, client_id: str, client_secret: str) -> None:
        super().__init__(endpoints, endpoints.commerce, "/data", client_id, client_secret)

    def all(self, entity_set: str) -> list[dict]:
        return self.rows(entity_set, {"cross-company": "true"})

    def prospect(self, legal_entity: str, prospect_id: str) -> dict:
        key = odata_key("Prospects", dataAreaId=legal_entity, ProspectId=prospect_id)
        return self.call("GET", key, params={"cross-company": "true"}).json()

    def set_status(self, legal_entity: str, prospect_id: str, status: str) -> None:
        """Approve or reject a prospect by hand, as Convert > Approve / Reject in the HQ form does."""
        key = odata_key("Prospects", dataAreaId=legal_entity, ProspectId=prospect_id)
        self.call("PATCH", key, params={"cross-company": "true"}, json={"B2BProspectStatus": status})

    def correct(self, legal_entity: str, prospect_id: str, **fields: Any) -> None:
        """Corrects a prospect in the All prospects form (PrimaryEmailAddress=..., AddressCity=...):
        the row as just read, saved with `If-Match` of that read, as the form saves it."""
        key = odata_key("Prospects", dataAreaId=legal_entity, ProspectId=prospect_id)
        etag = self.prospect(legal_entity, prospect_id)["@odata.etag"]
        self.call("PATCH", key, params={"cross-company": "true"}, json=fields, headers={"If-Match": etag})

    def customers(self, legal_entity: str) -> list[dict]:
        """Every customer of one legal entity."""
        company = legal_entity.replace("'", "''")
        return self.rows("CustomersV3", {"cross-company": "true", "$filter": f"dataAreaId eq '{company}'"})

    def create_customer(self, row: dict) -> dict:
        """Creates a customer (in the company `dataAreaId` names, else the clerk's default company);
        returns it as HQ answers, with its CustomerAccount and PartyNumber."""
        return self.call("POST", "CustomersV3", json=row).json()
