"""People at work in the two systems, through the same APIs and auth as everyone else:
a seller in Sales, and a back-office clerk reading Commerce headquarters."""

from __future__ import annotations

from typing import Any

import httpx
import msal

from d365_fakes.running import Endpoints


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


class Seller(ApiUser):
    """A seller working the Commerce B2B leads in Sales."""

    def __init__(self, endpoints: Endpoints, client_id: str, client_secret: str) -> None:
        super().__init__(endpoints, endpoints.dataverse, "/api/data/v9.2", client_id, client_secret)

    def view(self, name: str) -> list[dict]:
        query = self.rows("savedqueries", {"$filter": f"name eq '{name}'", "$select": "savedqueryid"})
        return self.rows("leads", {"savedQuery": query[0]["savedqueryid"]})

    def qualify(self, lead_id: str) -> str:
        """Qualifies the lead; returns the new opportunity's id."""
        created = self.call("POST", f"leads({lead_id})/Microsoft.Dynamics.CRM.QualifyLead", json={
            "CreateAccount": True, "CreateContact": True, "CreateOpportunity": True, "Status": 3,
        }).json()["value"]  # fmt: skip
        return next(row["opportunityid"] for row in created if row["@odata.type"].endswith("opportunity"))

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
    """A back-office user reading Commerce headquarters across legal entities."""

    def __init__(self, endpoints: Endpoints, client_id: str, client_secret: str) -> None:
        super().__init__(endpoints, endpoints.commerce, "/data", client_id, client_secret)

    def all(self, entity_set: str) -> list[dict]:
        return self.rows(entity_set, {"cross-company": "true"})

    def set_status(self, legal_entity: str, prospect_id: str, status: str) -> None:
        """Approve or reject a prospect by hand, as Convert > Approve / Reject in the HQ form does."""
        key = f"Prospects(dataAreaId='{legal_entity}',ProspectId='{prospect_id}')"
        self.call("PATCH", key, params={"cross-company": "true"}, json={"B2BProspectStatus": status})
