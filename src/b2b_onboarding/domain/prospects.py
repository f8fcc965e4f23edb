"""Prospects as they arrive from Commerce: validation, identity, and the lead each one becomes."""

from __future__ import annotations

import hashlib
import unicodedata
from collections.abc import Iterable, Mapping
from typing import Any

import pandas as pd
import pydantic
from pydantic import BaseModel, ConfigDict, EmailStr, Field, StringConstraints, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError
from typing_extensions import Annotated

from b2b_onboarding.domain.tenant import DEFAULT_TENANT, Tenant

Text = Annotated[str, StringConstraints(strip_whitespace=True)]
_UNPRINTABLE = {"Cc", "Zl", "Zp", "Cs"}  # controls, line and paragraph separators, lone surrogates

# A prospect field → the lead column it becomes (dual-write's map); ProspectName becomes firstname
# and lastname, CompanyName also the subject (`lead_of`).
LEAD_COLUMN_OF = {
    "ProspectId": "msdyn_prospectid", "CompanyName": "companyname", "PrimaryEmailAddress": "emailaddress1",
    "PrimaryPhoneNumber": "telephone1", "AddressStreet": "address1_line1", "AddressCity": "address1_city",
    "AddressZipCode": "address1_postalcode", "AddressCountryRegionISOCode": "address1_country",
}  # fmt: skip
SUBJECT_PREFIX = "B2B onboarding request: "


class Prospect(BaseModel):
    """The fields of a `Prospects` row that the flow uses. Their lengths are the tenant's: validated
    with `context={"tenant": ...}` (`validate`), the standard tenant's without."""

    model_config = ConfigDict(extra="ignore", str_strip_whitespace=True)

    dataAreaId: Text = Field(min_length=1)
    ProspectId: Text = Field(min_length=1)
    ProspectName: Text = Field(min_length=1)
    CompanyName: Text = Field(min_length=1)
    PrimaryEmailAddress: EmailStr
    PrimaryPhoneNumber: Text | None = None
    AddressStreet: Text | None = None
    AddressCity: Text | None = None
    AddressStateId: Text | None = None
    AddressZipCode: Text | None = None
    AddressCountryRegionISOCode: Text | None = None
    CurrencyCode: Text | None = None
    LanguageId: Text | None = None
    Note: str | None = None
    RetailChannelOperatingUnitPartyNumber: Text | None = None

    @field_validator("dataAreaId", mode="before")
    @classmethod
    def _of_the_legal_entity_pulled(cls, value: Any, info: ValidationInfo) -> Any:
        """A row of another company is refused when the caller says which one it reads (the row's
        key, its dataAreaId as given, must name that legal entity, or it would be tracked apart)."""
        pulled = (info.context or {}).get("legal_entity")
        if pulled is not None and isinstance(value, str) and value.lower() != pulled.lower():
            # Formatted here, with no context for pydantic to substitute into a value holding `{...}`.
            raise PydanticCustomError("legal_entity", f"'{value}' is not the legal entity being pulled ({pulled.lower()})")
        return value

    @field_validator("dataAreaId")
    @classmethod
    def _lower(cls, value: str) -> str:
        return value.lower()

    @field_validator("ProspectId", "ProspectName", "CompanyName")
    @classmethod
    def _printable(cls, value: str) -> str:
        # Control characters and line breaks break records and logs; format characters (ZWJ in
        # emoji sequences, right-to-left marks in Arabic or Hebrew names) are part of real names.
        if any(unicodedata.category(character) in _UNPRINTABLE for character in value):
            raise ValueError("contains control characters or line breaks")
        return value

    @field_validator("*")
    @classmethod
    def _fits(cls, value: Any, info: ValidationInfo) -> Any:
        """Refused when it is longer than the tenant stores: in HQ's field or the lead's column."""
        if isinstance(value, str) and info.field_name is not None:
            too_long = length_problem(info.field_name, value, (info.context or {}).get("tenant") or DEFAULT_TENANT)
            if too_long:
                raise PydanticCustomError("too_long", too_long)
        return value


def length_problem(field: str, value: str, tenant: Tenant) -> str | None:
    """Why `value` of prospect field `field` does not fit in this tenant, naming the limit and
    where it is (HQ's field; the lead column the field becomes); None when it fits."""
    checks: list[tuple[str, int | None, str]] = [
        (value, tenant.commerce_max_length("Prospects", field), f"Commerce's field Prospects.{field} holds")]
    if field == "ProspectName":
        first, last = split_name(value)
        checks += [(first, tenant.lead_max_length("firstname"), "the lead column 'firstname' holds"),
                   (last, tenant.lead_max_length("lastname"), "the lead column 'lastname' holds")]  # fmt: skip
    if field == "CompanyName":
        subject = tenant.lead_max_length("subject")
        checks.append((value, None if subject is None else subject - len(SUBJECT_PREFIX),
                       f"the lead column 'subject' holds {SUBJECT_PREFIX!r} and"))  # fmt: skip
    if field in LEAD_COLUMN_OF:
        checks.append((value, tenant.lead_max_length(LEAD_COLUMN_OF[field]), f"the lead column '{LEAD_COLUMN_OF[field]}' holds"))
    for text, limit, holder in checks:
        if limit is not None and len(text) > limit:
            part = "" if text == value else ("its last word has " if text == split_name(value)[1] else "all but its last word have ")
            return f"{part}{len(text)} characters; {holder} at most {limit} in this tenant"
    return None


def prospect_key(legal_entity: str, prospect_id: str) -> str:
    """A prospect's name across legal entities, `usrt:P-000123`: the seed of its derived lead id, and
    the `msdyn_prospectid` that versions of this product before the composite key wrote (still adopted)."""
    return f"{legal_entity}:{prospect_id}"


def key_fold(value: str) -> str:
    """A key as Dataverse compares it: alternate keys follow the database's case-insensitive collation."""
    return value.casefold()


class PendingFingerprint:
    """The fingerprint of a set of prospects as HQ shows them: each one's key and `@odata.etag`, which
    F&O renews on every write to the row. Any prospect added, corrected or gone (decided, deleted)
    changes it; the order rows arrive in does not (a sum of each row's sha256, modulo 2**256), so it
    is taken page by page, and the watermark a pull stores is comparable to one a watcher takes.

    `add` the rows of one legal entity (each with `ProspectId` and `@odata.etag`), then read `value`.
    """

    VERSION = "v1"  # a later way of fingerprinting must not compare equal to this one

    def __init__(self) -> None:
        self.count = 0
        self._sum = 0

    def add(self, rows: Iterable[Mapping]) -> None:
        for row in rows:
            version = f"{key_fold(str(row['ProspectId']))}\0{row.get('@odata.etag') or ''}"
            self._sum = (self._sum + int.from_bytes(hashlib.sha256(version.encode()).digest(), "big")) % 2**256
            self.count += 1

    @property
    def value(self) -> str:
        return f"{self.VERSION}:{self.count}:{self._sum:064x}"


def watermark_name(legal_entity: str) -> str:
    """Where the state store keeps a legal entity's watermark, beside Dataverse's delta links."""
    return f"Prospects@{legal_entity.lower()}"


def customer_account(template: str, legal_entity: str, prospect_id: str, role: str) -> str:
    """The customer account a template gives (`{legal_entity}`, `{prospect_id}`, `{role}`: ORG or ADM)."""
    return template.format(legal_entity=legal_entity.upper(), prospect_id=prospect_id, role=role)


def prospect_hierarchy_id(legal_entity: str, prospect_id: str) -> str:
    """The B2B customer hierarchy's id, derived so that a rerun finds the one it made. Hierarchy
    ids are global in HQ while prospect ids repeat per legal entity, so both are in it."""
    return f"{legal_entity.upper()}-{prospect_id}"


def split_name(full_name: str) -> tuple[str, str]:
    """Dataverse computes `fullname` from first and last name, so the prospect's name is split."""
    first, _, last = full_name.strip().rpartition(" ")
    return (first, last) if first else ("", last)


def email_key(email: str) -> str:
    """The form in which two emails compare equal (case-insensitive, trimmed)."""
    return email.strip().lower()


def validate(row: dict, legal_entity: str | None = None,
             tenant: Tenant = DEFAULT_TENANT) -> tuple[Prospect | None, str | None]:  # fmt: skip
    """(prospect, None) or (None, an error naming the prospect and each bad field); with
    `legal_entity`, a row of any other legal entity is refused; lengths as `tenant` stores them."""
    try:
        return Prospect.model_validate(row, context={"legal_entity": legal_entity, "tenant": tenant}), None
    except pydantic.ValidationError as error:
        name = f"prospect {row.get('dataAreaId') or '?'}/{row.get('ProspectId') or '?'}"
        problems = "; ".join(
            f"{'.'.join(str(part) for part in e['loc']) or 'row'}: {e['msg']}" for e in error.errors()
        )
        return None, f"{name}: {problems}"


PAGE_COLUMNS = ["legal_entity", "prospect_id", "prospect", "email", "error"]


def validate_page(rows: list[dict], legal_entity: str, tenant: Tenant = DEFAULT_TENANT) -> pd.DataFrame:
    """One row per input of a page of `legal_entity`: legal_entity, prospect_id, and either prospect
    (the validated fields) and email (its `email_key`), or error and prospect as received (its
    fields as HQ sent them, so that the bad value can be shown beside the error)."""
    records = []
    for row in rows:
        prospect, error = validate(row, legal_entity, tenant)
        records.append(
            {
                "legal_entity": str(row.get("dataAreaId") or "").lower(),
                "prospect_id": str(row.get("ProspectId") or ""),
                "prospect": prospect.model_dump(mode="json") if prospect else {
                    name: row[name] for name in Prospect.model_fields if name in row},
                "email": email_key(prospect.PrimaryEmailAddress) if prospect else None,
                "error": error,
            }
        )
    return pd.DataFrame(records, columns=PAGE_COLUMNS, dtype=object)


def refuse_duplicate_emails(page: pd.DataFrame, legal_entity: str, emails_in_use: Mapping[str, str]) -> pd.DataFrame:
    """The page (from `validate_page`) with every valid prospect of `legal_entity` whose email another
    prospect holds turned into an error: a person's primary email is unique per legal entity.

    `emails_in_use` maps emails (`email_key`) to the tracked, undecided, valid prospect holding each;
    an email nobody holds goes to the page's prospect with the lowest ProspectId. Other legal
    entities' rows are left as they are.
    """
    holders = dict(emails_in_use)
    result = page.copy()
    mine = result[result["error"].isna() & (result["legal_entity"] == legal_entity.lower())]
    for index, row in mine.sort_values("prospect_id").iterrows():
        holder = holders.setdefault(row["email"], row["prospect_id"])
        if holder != row["prospect_id"]:
            result.at[index, "email"] = None
            result.at[index, "error"] = (
                f"prospect {row['legal_entity']}/{row['prospect_id']}: PrimaryEmailAddress: the same email as "
                f"prospect {row['legal_entity']}/{holder} (emails must be unique per legal entity)"
            )
    return result


# The lead columns dual-write maps from prospect fields: corrections in HQ reach these.
MAPPED_LEAD_COLUMNS = (
    "firstname", "lastname", "companyname", "emailaddress1", "telephone1", "address1_line1", "address1_city",
    "address1_postalcode", "address1_country",
)  # fmt: skip


def mapped_lead_fields(prospect: dict) -> dict:
    """The mapped columns a prospect gives its lead, every one present (None where HQ has nothing)."""
    first, last = split_name(prospect["ProspectName"])
    mapped = {"firstname": first, "lastname": last}
    mapped |= {column: prospect.get(field) for field, column in LEAD_COLUMN_OF.items() if column in MAPPED_LEAD_COLUMNS}
    return {column: mapped[column] for column in MAPPED_LEAD_COLUMNS}


def lead_of(prospect: dict, tenant: Tenant = DEFAULT_TENANT) -> dict:
    """The lead a prospect becomes, by dual-write's column map, with the tenant's option values;
    tagged so it lands in the view "All Commerce B2B leads". Its owner is the calling application
    user, so no seller's "My open leads" shows it. Its key (prospect id and company) is added by the
    Sales client."""
    lead = {
        **mapped_lead_fields(prospect),
        "subject": SUBJECT_PREFIX + prospect["CompanyName"],
        "leadsourcecode": tenant.lead_option("leadsourcecode", "Web"),
        "msdyn_b2bcommerceprospect": True,
        "msdyn_b2bprospectstatus": tenant.lead_option("msdyn_b2bprospectstatus", "Pending"),
    }
    return {column: value for column, value in lead.items() if value is not None}
