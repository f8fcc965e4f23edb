"""Which Commerce customers a qualified lead's account and contact stand for: those that already exist
(reused, never doubled, never overwritten) or new ones. Plain rules over rows read beforehand; no I/O.

The business owner's expectations, each played by a test:
- the account already carries a customer account (`accountnumber`, dual-write's map) naming an
  Organization customer of the prospect's legal entity: that customer is the organization;
- the contact's email (the prospect's, as HQ has it now) is the primary email of a Person customer of
  the legal entity: that customer is the person (HQ keeps a person's email unique per legal entity);
- a number naming no customer, a Person, or a customer of another legal entity, a person who belongs
  to another organization's hierarchy, or two organizations that could be the one made for this
  prospect: a conflict, and nothing is written for the prospect;
- otherwise the customers are created, numbered by HQ's number sequence (or by the connection's
  `customer_account_template`), and a rerun finds the ones an interrupted run made: the person by
  its email, the organization by its account number in Sales, or by the prospect's email and its name.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from b2b_onboarding.domain.prospects import customer_account, key_fold
from b2b_onboarding.domain.tenant import DEFAULT_TENANT, Tenant
from b2b_onboarding.errors import DecisionConflict


def fold(value: object) -> str:
    """A value as HQ compares it (`key_fold`), trimmed; a missing value is empty."""
    return key_fold(str(value or "").strip())


@dataclass(frozen=True)
class Known:
    """What HQ holds that may already be a prospect's customers, read for a whole chunk at once."""

    customers_by_account: Mapping[str, list[dict]] = field(default_factory=dict)  # folded account → of any company
    customers_by_email: Mapping[str, list[dict]] = field(default_factory=dict)  # folded email → of the legal entity
    hierarchies_of_person: Mapping[str, set[str]] = field(default_factory=dict)  # person party → organization parties

    @classmethod
    def of(cls, customers: Iterable[dict], legal_entity: str, nodes: Iterable[dict] = (),
           hierarchies: Iterable[dict] = ()) -> Known:  # fmt: skip
        by_account: dict[str, list[dict]] = {}
        by_email: dict[str, list[dict]] = {}
        for customer in {(row["dataAreaId"].lower(), fold(row["CustomerAccount"])): row for row in customers}.values():
            by_account.setdefault(fold(customer["CustomerAccount"]), []).append(customer)
            if customer["dataAreaId"].lower() == legal_entity.lower() and customer.get("PrimaryContactEmail"):
                by_email.setdefault(fold(customer["PrimaryContactEmail"]), []).append(customer)
        organization_of = {fold(row["CustomerHierarchyId"]): row["OrganizationPartyNumber"] for row in hierarchies}
        of_person: dict[str, set[str]] = {}
        for node in nodes:
            if not node.get("VersionRemoved") and fold(node["CustomerHierarchyId"]) in organization_of:
                of_person.setdefault(fold(node["NodePartyNumber"]), set()).add(organization_of[fold(node["CustomerHierarchyId"])])
        return cls(by_account, by_email, of_person)


@dataclass(frozen=True)
class Choice:
    """A prospect's two customers: each an existing row (it has a PartyNumber) or one to create."""

    organization: dict
    person: dict

    @property
    def to_create(self) -> list[dict]:
        return [row for row in (self.organization, self.person) if "PartyNumber" not in row]

    @property
    def reused(self) -> int:
        return 2 - len(self.to_create)


def choose(
    *, legal_entity: str, prospect_id: str, account: dict, contact: dict, email: str, known: Known,
    template: str | None = None, common: Mapping[str, str] | None = None, tenant: Tenant = DEFAULT_TENANT,
) -> Choice:  # fmt: skip
    """The customers of one prospect, or a DecisionConflict saying why none may be written; a
    templated customer account must fit in the tenant's CustomersV3.CustomerAccount."""
    record = f"prospect {legal_entity}/{prospect_id}"
    length = tenant.commerce_max_length("CustomersV3", "CustomerAccount")
    organization = _organization(record, legal_entity, prospect_id, account, email, known, template, length,
                                 dict(common or {}))  # fmt: skip
    person = _person(record, legal_entity, prospect_id, contact, email, known, template, length, dict(common or {}))
    if "PartyNumber" in person:
        elsewhere = known.hierarchies_of_person.get(fold(person["PartyNumber"]), set()) - {organization.get("PartyNumber")}
        if elsewhere:
            raise DecisionConflict(
                "person_of_other_organization",
                f"{record}: the contact's email {email} is Person customer {person['CustomerAccount']}, who belongs to "
                f"the customer hierarchy of another organization (party {', '.join(sorted(elsewhere))}); nothing was "
                "written. Next step: check with the seller which organization the person acts for; use another email "
                "for this request, or move the person in Commerce by hand",
            )
    return Choice(organization, person)


def _organization(record: str, legal_entity: str, prospect_id: str, account: dict, email: str, known: Known,
                  template: str | None, length: int | None, common: dict) -> dict:  # fmt: skip
    number = str(account.get("accountnumber") or "").strip()
    if number:
        found = known.customers_by_account.get(fold(number), [])
        here = [row for row in found if row["dataAreaId"].lower() == legal_entity.lower()]
        if here and here[0]["PartyType"] == "Organization":
            return here[0]
        if here:
            raise DecisionConflict("account_number_not_organization",
                                   f"{record}: the account {account.get('name')!r} has account number {number}, which is "
                                   f"a {here[0]['PartyType']} customer of {legal_entity}, not an Organization; nothing "
                                   "was written. Next step: correct the account number in Sales")  # fmt: skip
        if found:
            others = ", ".join(sorted({row["dataAreaId"] for row in found}))
            raise DecisionConflict("account_of_other_legal_entity",
                                   f"{record}: the account {account.get('name')!r} has account number {number}, a "
                                   f"customer of legal entity {others}, not of {legal_entity}; nothing was written. Next "
                                   f"step: create or pick the organization's customer in {legal_entity} and link it, or "
                                   "qualify the lead against another account")  # fmt: skip
        raise DecisionConflict("account_number_unknown",
                               f"{record}: the account {account.get('name')!r} has account number {number}, which names "
                               "no customer in Commerce; nothing was written. Next step: correct or clear the account "
                               "number in Sales")  # fmt: skip
    body = {"dataAreaId": legal_entity, "PartyType": "Organization", "OrganizationName": account["name"],
            "PrimaryContactEmail": email, **common}  # fmt: skip
    if template:
        wanted = _templated(record, template, length, legal_entity, prospect_id, "ORG")
        here = [row for row in known.customers_by_account.get(fold(wanted), [])
                if row["dataAreaId"].lower() == legal_entity.lower()]  # fmt: skip
        return here[0] if here else {**body, "CustomerAccount": wanted}
    made = [row for row in known.customers_by_email.get(fold(email), []) if row["PartyType"] == "Organization"
            and fold(row.get("OrganizationName")) == fold(account["name"])]  # fmt: skip
    if len(made) > 1:
        raise DecisionConflict("organization_ambiguous",
                               f"{record}: {len(made)} Organization customers of {legal_entity} are named "
                               f"{account['name']!r} with email {email} "
                               f"({', '.join(row['CustomerAccount'] for row in made)}); nothing was written. Next step: "
                               "set the right one as the account's account number in Sales")  # fmt: skip
    return made[0] if made else body


def _person(record: str, legal_entity: str, prospect_id: str, contact: dict, email: str, known: Known,
            template: str | None, length: int | None, common: dict) -> dict:  # fmt: skip
    persons = [row for row in known.customers_by_email.get(fold(email), []) if row["PartyType"] == "Person"]
    if persons:
        return persons[0]
    names = {field: contact[column] for field, column in (("PersonFirstName", "firstname"), ("PersonLastName", "lastname"))
             if contact.get(column)}  # fmt: skip
    body = {"dataAreaId": legal_entity, "PartyType": "Person", "PrimaryContactEmail": email, **names, **common}
    if template:
        wanted = _templated(record, template, length, legal_entity, prospect_id, "ADM")
        here = [row for row in known.customers_by_account.get(fold(wanted), [])
                if row["dataAreaId"].lower() == legal_entity.lower()]  # fmt: skip
        return here[0] if here else {**body, "CustomerAccount": wanted}
    return body


def _templated(record: str, template: str, length: int | None, legal_entity: str, prospect_id: str, role: str) -> str:
    """The templated customer account, if it fits in the tenant's CustomersV3.CustomerAccount (`length`)."""
    account = customer_account(template, legal_entity, prospect_id, role)
    if length is not None and len(account) > length:
        raise DecisionConflict("customer_account_too_long",
                               f"{record}: the connection's customer_account_template gives {account!r}, "
                               f"{len(account)} characters, and this tenant's CustomersV3.CustomerAccount holds {length}; "
                               "nothing was written. Next step: shorten the template (extra customer_account_template "
                               "of the Commerce connection), or remove it to let HQ number customers")  # fmt: skip
    return account
