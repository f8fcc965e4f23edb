"""The tenant's tables as its metadata describes them: the lead table of Sales (Dataverse
EntityDefinitions) and Commerce HQ's entity sets (`/data/$metadata`, CSDL). The flow's limits come
from here, not from constants: how long each field may be, which option values a lead gets, whether
the columns and the key the flow relies on exist.

`DEFAULT_TENANT` is the standard tenant (Microsoft's lengths and options, the fakes' default), for
the pure functions' tests and callers that read no metadata.
"""

from __future__ import annotations

import xml.etree.ElementTree as ElementTree
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from b2b_onboarding.errors import ConfigurationError, via

SALES_SYSTEM = "Dataverse (Sales)"
COMMERCE_SYSTEM = "Commerce headquarters"
# The HQ entity sets whose fields the flow reads and writes.
COMMERCE_TABLES = ("Prospects", "CustomersV3")


@dataclass(frozen=True)
class Column:
    """A column (Dataverse) or property (HQ). `type`: Dataverse's AttributeType (String, Picklist,
    Lookup...) or HQ's CSDL type (Edm.String, Microsoft.Dynamics.DataEntities.NoYes...); `required`:
    Dataverse's RequiredLevel, or "NotNullable" for an HQ property with Nullable="false"; `options`:
    a choice's or an enum's label → value."""

    name: str
    type: str
    max_length: int | None = None
    required: str | None = None
    options: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class AlternateKey:
    """A Dataverse alternate key and its EntityKeyIndexStatus (only an Active key is enforced); for
    HQ, the entity key (always Active)."""

    name: str
    columns: tuple[str, ...]
    status: str


@dataclass(frozen=True)
class TableModel:
    system: str
    name: str
    columns: Mapping[str, Column]
    keys: tuple[AlternateKey, ...] = ()

    def to_json(self) -> dict:
        """A plain JSON form (the state store caches it per run)."""
        return {"system": self.system, "name": self.name,
                "columns": [[c.name, c.type, c.max_length, c.required, dict(c.options)] for c in self.columns.values()],
                "keys": [[key.name, list(key.columns), key.status] for key in self.keys]}  # fmt: skip

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TableModel:
        columns = (Column(name, kind, length, required, options) for name, kind, length, required, options in data["columns"])
        return cls(data["system"], data["name"], {column.name: column for column in columns},
                   tuple(AlternateKey(name, tuple(columns), status) for name, columns, status in data["keys"]))  # fmt: skip


# Every lead column the flow writes or reads (prospects.lead_of, MAPPED_LEAD_COLUMNS, the key the
# Sales client adds, sales.py's column tuples; `_x_value` there is lookup column x) and the
# AttributeType it must have.
LEAD_COLUMNS = {
    "leadid": "Uniqueidentifier",
    "firstname": "String",
    "lastname": "String",
    "companyname": "String",
    "emailaddress1": "String",
    "telephone1": "String",
    "address1_line1": "String",
    "address1_city": "String",
    "address1_postalcode": "String",
    "address1_country": "String",
    "subject": "String",
    "leadsourcecode": "Picklist",
    "statecode": "State",
    "statuscode": "Status",
    "msdyn_prospectid": "String",
    "msdyn_company": "Lookup",
    "msdyn_b2bcommerceprospect": "Boolean",
    "msdyn_b2bprospectstatus": "Picklist",
    "parentaccountid": "Lookup",
    "parentcontactid": "Lookup",
    "qualifyingopportunityid": "Lookup",
}
# Dual-write's key of company-specific tables: the lead's business key and its company.
LEAD_KEY = ("msdyn_prospectid", "msdyn_company")
# The option labels whose values the flow writes, by choice column.
LEAD_OPTION_LABELS = {"leadsourcecode": ("Web",), "msdyn_b2bprospectstatus": ("Pending", "Approved", "Rejected", "Unknown")}


@dataclass(frozen=True)
class Tenant:
    """What the flow knows of one tenant: Sales' lead table and HQ's entity sets (COMMERCE_TABLES)."""

    lead: TableModel
    commerce: Mapping[str, TableModel]

    def lead_max_length(self, column: str) -> int | None:
        found = self.lead.columns.get(column)
        return found.max_length if found else None

    def commerce_max_length(self, entity_set: str, name: str) -> int | None:
        found = self.commerce[entity_set].columns.get(name) if entity_set in self.commerce else None
        return found.max_length if found else None

    def lead_option(self, column: str, label: str) -> int:
        """The value of a lead choice's option, by its label (`lead_model_problems` names a missing one)."""
        return self.lead.columns[column].options[label]


def _required_level(value: object) -> str | None:
    """RequiredLevel comes as a managed property, `{"Value": "None", "CanBeChanged": ...}`."""
    return value.get("Value") if isinstance(value, dict) else (str(value) if value is not None else None)


def _option_labels(option: Mapping[str, Any]) -> list[str]:
    """An option's labels: the caller's language first, then every language installed."""
    label = option.get("Label") or {}
    mine = (label.get("UserLocalizedLabel") or {}).get("Label")
    return [text for text in (mine, *(localized.get("Label") for localized in label.get("LocalizedLabels") or ())) if text]


def parse_lead_model(system: str, entity: Mapping[str, Any], strings: Mapping[str, Any],
                     picklists: Mapping[str, Any]) -> TableModel:  # fmt: skip
    """A lead model from the three EntityDefinitions answers (`SalesClient.lead_model`)."""
    lengths = {row["LogicalName"]: row.get("MaxLength") for row in strings.get("value", [])}
    options: dict[str, dict[str, int]] = {}
    for row in picklists.get("value", []):
        labels = options.setdefault(row["LogicalName"], {})
        for option in (row.get("OptionSet") or {}).get("Options") or ():
            for label in _option_labels(option):
                labels.setdefault(label, int(option["Value"]))
    columns = {
        row["LogicalName"]: Column(row["LogicalName"], str(row.get("AttributeType")), lengths.get(row["LogicalName"]),
                                   _required_level(row.get("RequiredLevel")), options.get(row["LogicalName"], {}))
        for row in entity.get("Attributes", [])
    }  # fmt: skip
    keys = tuple(AlternateKey(key["LogicalName"], tuple(key.get("KeyAttributes") or ()), str(key.get("EntityKeyIndexStatus")))
                 for key in entity.get("Keys", []))  # fmt: skip
    return TableModel(system, str(entity.get("LogicalName", "lead")), columns, keys)


_EDM = "{http://docs.oasis-open.org/odata/ns/edm}"


def parse_commerce_model(system: str, csdl: bytes | str, entity_sets: tuple[str, ...] = COMMERCE_TABLES) -> dict[str, TableModel]:
    """The entity sets named (those HQ has) from HQ's `$metadata` document (CSDL XML)."""
    root = ElementTree.fromstring(csdl)
    types: dict[str, ElementTree.Element] = {}
    enums: dict[str, dict[str, int]] = {}
    for schema in root.iter(f"{_EDM}Schema"):
        prefixes = [name for name in (schema.get("Namespace"), schema.get("Alias")) if name]
        for element in schema.findall(f"{_EDM}EntityType"):
            types.update({f"{prefix}.{element.get('Name')}": element for prefix in prefixes})
        for element in schema.findall(f"{_EDM}EnumType"):
            # A member without a Value takes the next one (OData CSDL).
            members = {member.get("Name", ""): int(member.get("Value", index))
                       for index, member in enumerate(element.findall(f"{_EDM}Member"))}  # fmt: skip
            enums.update({f"{prefix}.{element.get('Name')}": members for prefix in prefixes})
    found = {}
    for entity_set in root.iter(f"{_EDM}EntitySet"):
        name, entity_type = entity_set.get("Name", ""), types.get(entity_set.get("EntityType", ""))
        if name not in entity_sets or entity_type is None:
            continue
        columns = {}
        for prop in entity_type.findall(f"{_EDM}Property"):
            length, kind = prop.get("MaxLength"), prop.get("Type", "")
            columns[prop.get("Name", "")] = Column(
                prop.get("Name", ""), kind, int(length) if length and length.isdigit() else None,
                "NotNullable" if prop.get("Nullable") == "false" else None, enums.get(kind, {}),
            )  # fmt: skip
        key = tuple(ref.get("Name", "") for ref in entity_type.iterfind(f"{_EDM}Key/{_EDM}PropertyRef"))
        found[name] = TableModel(system, name, columns, (AlternateKey("entity key", key, "Active"),) if key else ())
    return found


def lead_model_problems(model: TableModel) -> list[str]:
    """What keeps the flow from working with this lead table, one sentence each: a column it writes
    or reads that is missing or of another type, an option it writes that the choice lacks, the
    alternate key (msdyn_prospectid, msdyn_company) missing or not Active."""
    problems = []
    for name, expected in LEAD_COLUMNS.items():
        column = model.columns.get(name)
        if column is None:
            problems.append(f"the lead column '{name}' does not exist")
        elif column.type != expected:
            problems.append(f"the lead column '{name}' is of type {column.type}, not {expected}")
    for name, labels in LEAD_OPTION_LABELS.items():
        column = model.columns.get(name)
        if column is not None and column.type == LEAD_COLUMNS[name]:
            problems += [f"the lead column '{name}' has no option labelled '{label}'" for label in labels
                         if label not in column.options]  # fmt: skip
    if any(column not in model.columns for column in LEAD_KEY):
        return problems  # named above: no key is made of a column that does not exist
    keys = [key for key in model.keys if set(key.columns) == set(LEAD_KEY)]
    if not keys:
        problems.append(f"the lead table has no alternate key of ({', '.join(LEAD_KEY)})")
    elif not any(key.status == "Active" for key in keys):
        problems.append(f"the lead's alternate key '{keys[0].name}' ({', '.join(LEAD_KEY)}) is {keys[0].status}, not Active")
    return problems


def check_lead_model(model: TableModel, connection: str | None) -> None:
    """A ConfigurationError naming every `lead_model_problems` of the lead table, if it has any:
    the flow cannot work with it, whatever it retries."""
    problems = lead_model_problems(model)
    if problems:
        raise ConfigurationError(
            f"{via(model.system, connection)}: {'; '.join(problems)}. Next step: install or repair the solutions that "
            "define these lead columns and the key in this environment (dual-write's company-specific tables, Dynamics "
            "365 Commerce's B2B prospects), or point the connection at the environment that has them; a key not Active: "
            "wait until its index is built, or reactivate it if Failed (Power Apps, Tables > Lead > Keys); then clear "
            "the task."
        )


# --- The standard tenant ----------------------------------------------------------------------------


def _text(name: str, length: int, required: str | None = "None") -> Column:
    return Column(name, "String", length, required)


def _lead_model() -> TableModel:
    lead_sources = ("Advertisement", "Employee Referral", "External Referral", "Partner", "Public Relations", "Seminar",
                    "Trade Show", "Web", "Word of Mouth", "Other")  # fmt: skip
    columns = (
        Column("leadid", "Uniqueidentifier", None, "SystemRequired"),
        _text("firstname", 50), _text("lastname", 50), _text("companyname", 100), _text("emailaddress1", 100),
        _text("telephone1", 50), _text("address1_line1", 250), _text("address1_city", 80),
        _text("address1_postalcode", 20), _text("address1_country", 80), _text("subject", 300),
        Column("leadsourcecode", "Picklist", None, "None", {label: value for value, label in enumerate(lead_sources, 1)}),
        Column("statecode", "State", None, "SystemRequired"),
        Column("statuscode", "Status", None, "None"),
        _text("msdyn_prospectid", 100),
        Column("msdyn_company", "Lookup", None, "None"),
        Column("msdyn_b2bcommerceprospect", "Boolean", None, "None"),
        Column("msdyn_b2bprospectstatus", "Picklist", None, "None",
               {"Pending": 0, "Approved": 1, "Rejected": 2, "Unknown": 3}),
        Column("parentaccountid", "Lookup", None, "None"),
        Column("parentcontactid", "Lookup", None, "None"),
        Column("qualifyingopportunityid", "Lookup", None, "None"),
    )  # fmt: skip
    return TableModel(SALES_SYSTEM, "lead", {column.name: column for column in columns},
                      (AlternateKey("msdyn_prospectid_company", LEAD_KEY, "Active"),))  # fmt: skip


def _commerce_model() -> dict[str, TableModel]:
    def hq(name: str, length: int, required: bool = False) -> Column:
        return Column(name, "Edm.String", length, "NotNullable" if required else None)

    enum = "Microsoft.Dynamics.DataEntities."
    prospects = (
        hq("dataAreaId", 4, True), hq("ProspectId", 20, True), hq("ProspectName", 100), hq("CompanyName", 100),
        hq("PrimaryEmailAddress", 255), hq("PrimaryPhoneNumber", 255), hq("AddressStreet", 250), hq("AddressCity", 60),
        hq("AddressStateId", 10), hq("AddressZipCode", 10), hq("AddressCountryRegionISOCode", 3), hq("CurrencyCode", 3),
        hq("LanguageId", 7), hq("Note", 1000), hq("RetailChannelOperatingUnitPartyNumber", 40),
        Column("IsB2BProspect", enum + "NoYes", None, "NotNullable", {"No": 0, "Yes": 1}),
        Column("B2BProspectStatus", enum + "RetailB2BProspectStatus", None, "NotNullable",
               {"Pending": 0, "Approved": 1, "Rejected": 2, "Unknown": 3}),
    )  # fmt: skip
    customers = (
        hq("dataAreaId", 4, True), hq("CustomerAccount", 20, True), hq("PartyType", 20, True), hq("PartyNumber", 40),
        hq("OrganizationName", 100), hq("PersonFirstName", 25), hq("PersonLastName", 25),
        hq("PrimaryContactEmail", 255), hq("CustomerGroupId", 10, True), hq("SalesCurrencyCode", 3),
    )  # fmt: skip
    return {
        name: TableModel(COMMERCE_SYSTEM, name, {column.name: column for column in columns},
                         (AlternateKey("entity key", ("dataAreaId", key), "Active"),))
        for name, columns, key in (("Prospects", prospects, "ProspectId"), ("CustomersV3", customers, "CustomerAccount"))
    }  # fmt: skip


DEFAULT_TENANT = Tenant(_lead_model(), _commerce_model())
