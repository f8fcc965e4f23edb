"""The onboarding story the demo and the end-to-end tests tell: who asks to become a partner, what
each seller decides, and what Commerce must show at the end."""

from __future__ import annotations

import json
import secrets
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from d365_fakes.actors import Clerk, Seller
from d365_fakes.running import Endpoints, FakeAdmin
from d365_fakes.security import B2B_ONBOARDING_ROLE

# What sellers do with a lead, and what that must become in Commerce: (prospect status, email).
OUTCOMES = {
    "won": ("Approved", "B2B prospect approved"),
    "lost": ("Rejected", "B2B prospect rejected"),
    "disqualified": ("Rejected", "B2B prospect rejected"),
    "qualified": ("Pending", None),  # qualified, opportunity still open
    "untouched": ("Pending", None),
    "invalid": ("Pending", None),  # refused by validation: never becomes a lead
}
# The customer group of the customers the product creates (the Commerce connection's extra
# `customer_group`): F&O demo data's "Wholesale customers", in every legal entity of the fakes.
CUSTOMER_GROUP = "10"
_PLAN = ("won", "lost", "disqualified", "untouched", "won", "qualified", "lost", "won")
_NAMES = ("Ada Lovelace", "Seán O'Brien", "Zoë Żółć", "李 小龙", "Jean-Luc Picard", "Amara 😀 Okafor", "Cher")


@dataclass(frozen=True)
class Cast:
    """The app registrations of a scenario, with fresh random secrets (none lives in code)."""

    integration: dict
    seller: dict
    clerk: dict

    @classmethod
    def new(cls) -> Cast:
        def app(client_id: str, name: str) -> dict:
            return {"client_id": client_id, "client_secret": secrets.token_urlsafe(24), "display_name": name,
                    "default_company": "usmf"}  # fmt: skip

        # The product runs with the least-privilege role the README documents, which proves it suffices;
        # the seller and the clerk act as people with broad roles do.
        least_privilege = {"dataverse_roles": [B2B_ONBOARDING_ROLE], "commerce_roles": [B2B_ONBOARDING_ROLE]}
        return cls(app("b2b-onboarding-airflow", "B2B onboarding (Airflow)") | least_privilege,
                   app("seller-app", "Sales seller"), app("hq-clerk", "Commerce back office"))  # fmt: skip

    @property
    def clients(self) -> list[dict]:
        return [self.integration, self.seller, self.clerk]


def airflow_connections(
    endpoints: Endpoints, cast: Cast, legal_entities: list[str], state_db: Path, sales_page_size: int = 5000,
    naive: bool = False,
) -> dict:
    """The product's three Airflow connections as `AIRFLOW_CONN_*` variables (JSON form), of the
    product's connection types, each option in the extra as the Connections form saves it (the legal
    entities comma-separated). `naive` switches the product to one request per record and no change
    tracking (the benchmark's baseline)."""
    mode = {"bulk": False, "change_tracking": False} if naive else {}

    def service(conn_type: str, resource: str, extra: dict) -> str:
        return json.dumps({
            "conn_type": conn_type, "host": resource, "login": cast.integration["client_id"],
            "password": cast.integration["client_secret"],
            "extra": {"authority": endpoints.authority, "ca_bundle": endpoints.ca_bundle, **extra},
        })  # fmt: skip

    return {
        "AIRFLOW_CONN_D365_COMMERCE": service("d365_commerce", endpoints.commerce, {
            "legal_entities": ", ".join(legal_entities), "customer_group": CUSTOMER_GROUP,
            **({"bulk": False} if naive else {})}),
        "AIRFLOW_CONN_D365_SALES": service("d365_sales", endpoints.dataverse, {"page_size": sales_page_size, **mode}),
        "AIRFLOW_CONN_D365_STATE": json.dumps({"conn_type": "d365_state", "schema": str(state_db),
                                               "extra": {"driver": "sqlite"}}),  # fmt: skip
    }


# The fakes' table that each operation of a dry run's plan (b2b_onboarding.flow.dry_run) writes when
# the real run makes it: (system, entity set), as /_admin/counts names them.
PLANNED_WRITE_TABLES = {
    "create lead": ("dataverse", "leads"), "set account number": ("dataverse", "accounts"),
    "create Organization customer": ("commerce", "CustomersV3"), "create Person customer": ("commerce", "CustomersV3"),
    "create customer hierarchy": ("commerce", "CustomerHiearchies"),
    "add Admin node to customer hierarchy": ("commerce", "CustomerHierarchyNodes"),
    "add User node to customer hierarchy": ("commerce", "CustomerHierarchyNodes"), "update leads": ("dataverse", "leads"),
    "approve prospect": ("commerce", "Prospects"), "reject prospect": ("commerce", "Prospects"),
}  # fmt: skip


def total_writes(counts: dict) -> int:
    """Writes to Commerce and Sales, from the fakes' `/_admin/counts`."""
    return sum(counts["commerce"]["writes"].values()) + sum(counts["dataverse"]["writes"].values())


def prospects(count: int = 50, legal_entities: tuple[str, ...] = ("usrt", "usmf")) -> tuple[list[dict], dict]:
    """`count` prospects spread over the legal entities (their ids repeat across them, as per-company
    number sequences do), and the plan: each prospect's email → what its seller will decide.
    Two are invalid and must be kept as such."""
    rows, plan = [], {}
    for index in range(count):
        legal_entity = legal_entities[index % len(legal_entities)]
        number = index // len(legal_entities) + 1
        email = f"partner{index:04d}@example.com"
        name = _NAMES[index % len(_NAMES)]
        row = {
            "dataAreaId": legal_entity, "ProspectId": f"P-{number:06d}", "ProspectName": name,
            "CompanyName": f"{name.split()[-1]} Trading {index}", "PrimaryEmailAddress": email,
            "PrimaryPhoneNumber": f"+1 555 01{index:02d}", "AddressStreet": f"{index} Harbour Road",
            "AddressCity": "Seattle", "AddressZipCode": "98052", "AddressCountryRegionISOCode": "USA",
            "CurrencyCode": "USD", "LanguageId": "en-us", "Note": "Requested on the B2B site",
            "RetailChannelOperatingUnitPartyNumber": "000000123",
        }  # fmt: skip
        plan[email] = _PLAN[index % len(_PLAN)]
        rows.append(row)
    del plan[rows[3]["PrimaryEmailAddress"]]
    rows[3]["PrimaryEmailAddress"] = "not-an-email"
    rows[8]["CompanyName"] = ""
    plan["not-an-email"] = plan[rows[8]["PrimaryEmailAddress"]] = "invalid"
    return rows, plan


def play_sellers(seller: Seller, plan: dict, leave: frozenset[str] = frozenset()) -> Counter:
    """Each seller works the leads in "All Commerce B2B leads" as the plan says; leads whose email is
    in `leave` are worked by their own story (`stories`)."""
    done: Counter = Counter()
    for lead in seller.view("All Commerce B2B leads"):
        if lead["statecode"] != 0 or lead["emailaddress1"] in leave:
            continue
        decision = plan[lead["emailaddress1"]]
        if decision in ("won", "lost", "qualified"):
            opportunity = seller.qualify(lead["leadid"])
            if decision != "qualified":
                seller.close_opportunity(opportunity, won=decision == "won")
        elif decision == "disqualified":
            seller.disqualify(lead["leadid"])
        done[decision] += 1
    return done


@dataclass(frozen=True)
class Outcome:
    rows: list[dict]  # one per prospect: legal_entity, prospect_id, plan, expected, status, emails, ok
    leads: int
    hierarchies: int
    admin_nodes: int
    emails: int

    @property
    def ok(self) -> bool:
        approved = sum(row["status"] == "Approved" for row in self.rows)
        return all(row["ok"] for row in self.rows) and self.hierarchies == self.admin_nodes == approved


def observe(endpoints: Endpoints, cast: Cast, plan: dict) -> Outcome:
    """Reads Commerce, Sales and the outbox as they are, and judges every prospect against its plan."""
    clerk = Clerk(endpoints, cast.clerk["client_id"], cast.clerk["client_secret"])
    seller = Seller(endpoints, cast.seller["client_id"], cast.seller["client_secret"])
    with FakeAdmin(endpoints) as admin:
        outbox = admin.outbox()
    try:
        emails = Counter((mail["dataAreaId"], mail["ProspectId"], mail["template"]) for mail in outbox)
        rows = []
        for prospect in clerk.all("Prospects"):
            decision = plan[prospect["PrimaryEmailAddress"]]
            status, template = OUTCOMES[decision]
            key = (prospect["dataAreaId"], prospect["ProspectId"])
            sent = {template_: n for (le, pid, template_), n in emails.items() if (le, pid) == key}
            expected_mail = {template: 1} if template else {}
            rows.append({
                "legal_entity": key[0], "prospect_id": key[1], "plan": decision, "expected": status,
                "status": prospect["B2BProspectStatus"], "emails": sum(sent.values()),
                "ok": prospect["B2BProspectStatus"] == status and sent == expected_mail,
            })  # fmt: skip
        nodes = clerk.all("CustomerHierarchyNodes")
        return Outcome(
            rows=rows,
            leads=len(seller.view("All Commerce B2B leads")),
            hierarchies=len(clerk.all("CustomerHiearchies")),
            admin_nodes=sum(node["Role"] == "Admin" for node in nodes),
            emails=len(outbox),
        )
    finally:
        clerk.close()
        seller.close()
