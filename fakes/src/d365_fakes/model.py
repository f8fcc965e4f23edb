"""One description of the tables the fakes serve: Dataverse's tables (EntityDefinitions) and
Commerce HQ's entity sets (the `$metadata` entity types). `dataverse.py` and `commerce.py` derive
their table definitions from it, `metadata.py` serves it, and every write is validated against it,
so what the metadata says and how the services behave cannot drift apart.

`DataverseModel` and `CommerceModel` are a tenant's copy of it: the admin surface may remove
columns or keys, change a key's index status, a string column's MaxLength or a choice's options (a
tenant configured otherwise); `reset()` puts the default tenant back.

Lengths and options are Dataverse's and F&O's own (see CONTRACT.md, "Table model and metadata").
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any

_METADATA_IDS = uuid.uuid5(uuid.NAMESPACE_URL, "d365-fakes/metadata")

# Dataverse AttributeType -> the JSON type of its values; lookups and system columns have none
# (they are written through binds or by the server).
VALUE_TYPES: dict[str, type] = {
    "String": str,
    "Memo": str,
    "Integer": int,
    "BigInt": int,
    "Picklist": int,
    "State": int,
    "Status": int,
    "Boolean": bool,
    "Uniqueidentifier": str,
    "DateTime": str,
    "EntityName": str,
}
# AttributeType -> the attribute metadata type the Web API names (`@odata.type`, casts).
METADATA_TYPES = {
    "String": "StringAttributeMetadata",
    "Memo": "MemoAttributeMetadata",
    "Integer": "IntegerAttributeMetadata",
    "BigInt": "BigIntAttributeMetadata",
    "Picklist": "PicklistAttributeMetadata",
    "State": "StateAttributeMetadata",
    "Status": "StatusAttributeMetadata",
    "Boolean": "BooleanAttributeMetadata",
    "Lookup": "LookupAttributeMetadata",
    "Owner": "LookupAttributeMetadata",
    "Customer": "LookupAttributeMetadata",
    "Uniqueidentifier": "UniqueIdentifierAttributeMetadata",
    "DateTime": "DateTimeAttributeMetadata",
    "EntityName": "EntityNameAttributeMetadata",
}
KEY_STATUSES = ("Pending", "InProgress", "Active", "Failed")


@dataclass(frozen=True)
class Option:
    value: int
    label: str
    state: int | None = None  # a status option: the state it belongs to


@dataclass(frozen=True)
class Attribute:
    """A Dataverse column, as AttributeMetadata describes it."""

    logical_name: str
    type: str  # AttributeType: String, Memo, Integer, Picklist, State, Status, Boolean, Lookup...
    max_length: int | None = None  # String and Memo
    required: str = "None"  # RequiredLevel: None, Recommended, ApplicationRequired, SystemRequired
    options: tuple[Option, ...] = ()  # Picklist, State, Status (and Boolean: False, True)
    targets: tuple[str, ...] = ()  # Lookup and Owner: the tables it may point at
    valid_for_create: bool = True
    valid_for_update: bool = True
    option_set_name: str | None = None  # a global choice; None for a local one
    schema_name: str | None = None  # default: the logical name in Dataverse's casing rules below

    @property
    def schema(self) -> str:
        return self.schema_name or _schema_name(self.logical_name)

    @property
    def value_type(self) -> type | None:
        return VALUE_TYPES.get(self.type)

    @property
    def metadata_type(self) -> str:
        return METADATA_TYPES[self.type]

    def metadata_id(self, entity: str) -> str:
        """Fixed, and its own on each table (columns of one name on two tables are two columns)."""
        return str(uuid.uuid5(_METADATA_IDS, f"attribute/{entity}/{self.logical_name}"))

    @property
    def is_lookup(self) -> bool:
        return self.type in ("Lookup", "Owner", "Customer")

    @property
    def is_data(self) -> bool:
        """A column a client writes by its own name (not a lookup, not the server's own)."""
        return self.value_type is not None and (self.valid_for_create or self.valid_for_update)


@dataclass(frozen=True)
class AlternateKey:
    logical_name: str
    key_attributes: tuple[str, ...]
    status: str = "Active"  # EntityKeyIndexStatus

    def metadata_id(self, entity: str) -> str:
        return str(uuid.uuid5(_METADATA_IDS, f"key/{entity}/{self.logical_name}"))


@dataclass(frozen=True)
class Entity:
    """A Dataverse table, as EntityMetadata describes it."""

    logical_name: str
    entity_set_name: str
    schema_name: str
    primary_id: str
    primary_name: str | None
    object_type_code: int | None
    attributes: tuple[Attribute, ...]
    keys: tuple[AlternateKey, ...] = ()
    is_custom: bool = False

    @property
    def metadata_id(self) -> str:
        return str(uuid.uuid5(_METADATA_IDS, f"entity/{self.logical_name}"))

    @cached_property
    def by_name(self) -> dict[str, Attribute]:
        return {attribute.logical_name: attribute for attribute in self.attributes}

    def without(self, columns: Iterable[str]) -> Entity:
        gone = set(columns)
        return replace(self, attributes=tuple(a for a in self.attributes if a.logical_name not in gone))


def _schema_name(logical_name: str) -> str:
    """Dataverse's SchemaName for the standard columns named here: the logical name with its
    words capitalised (`emailaddress1` -> `EMailAddress1` is the one exception, given explicitly)."""
    prefix, underscore, rest = logical_name.partition("_")
    if underscore and prefix in ("msdyn", "cdm"):
        return f"{prefix}_{rest}"
    return logical_name[:1].upper() + logical_name[1:]


# --- Dataverse ------------------------------------------------------------------------------------


def _string(name: str, length: int, required: str = "None", **more) -> Attribute:
    return Attribute(name, "String", max_length=length, required=required, **more)


def _lookup(name: str, *targets: str, required: str = "None") -> Attribute:
    return Attribute(name, "Lookup", targets=targets, required=required)


def _boolean(name: str, false: str = "No", true: str = "Yes") -> Attribute:
    return Attribute(name, "Boolean", options=(Option(0, false), Option(1, true)))


def _primary_key(name: str) -> Attribute:
    # Valid for create (a client may choose the id), never for update.
    return Attribute(name, "Uniqueidentifier", required="SystemRequired", valid_for_update=False)


_OWNER = Attribute("ownerid", "Owner", required="SystemRequired", targets=("systemuser", "team"))
_SYSTEM = (
    Attribute("createdon", "DateTime", valid_for_create=False, valid_for_update=False, schema_name="CreatedOn"),
    Attribute("modifiedon", "DateTime", valid_for_create=False, valid_for_update=False, schema_name="ModifiedOn"),
    Attribute("versionnumber", "BigInt", valid_for_create=False, valid_for_update=False, schema_name="VersionNumber"),
)
# Dataverse's lengths for the address columns common to leads, accounts and contacts.
_ADDRESS = (
    _string("address1_line1", 250, schema_name="Address1_Line1"),
    _string("address1_city", 80, schema_name="Address1_City"),
    _string("address1_stateorprovince", 50, schema_name="Address1_StateOrProvince"),
    _string("address1_postalcode", 20, schema_name="Address1_PostalCode"),
    _string("address1_country", 80, schema_name="Address1_Country"),
)
_EMAIL = _string("emailaddress1", 100, schema_name="EMailAddress1")
_PHONE = _string("telephone1", 50, schema_name="Telephone1")
_FULLNAME = _string("fullname", 160, valid_for_create=False, valid_for_update=False, schema_name="FullName")
_NAMES = (_string("firstname", 50, schema_name="FirstName"), _string("lastname", 50, schema_name="LastName"))

LEAD_SOURCE_OPTIONS = tuple(
    Option(value, label)
    for value, label in enumerate(
        (
            "Advertisement", "Employee Referral", "External Referral", "Partner", "Public Relations",
            "Seminar", "Trade Show", "Web", "Word of Mouth", "Other",
        ),
        start=1,
    )
)
# The values the product writes (b2b_onboarding.domain.prospects.B2B_STATUS_OPTION); the column is the
# Commerce B2B solution's choice mirroring HQ's RetailB2BProspectStatus.
B2B_PROSPECT_STATUS_OPTIONS = (
    Option(0, "Pending"), Option(1, "Approved"), Option(2, "Rejected"), Option(3, "Unknown"),
)


def _state(*names: str) -> Attribute:
    return Attribute(
        "statecode", "State", required="SystemRequired",
        options=tuple(Option(value, name) for value, name in enumerate(names)), schema_name="StateCode",
    )


def _status(*options: tuple[int, str, int]) -> Attribute:
    return Attribute(
        "statuscode", "Status", options=tuple(Option(value, label, state) for value, label, state in options),
        schema_name="StatusCode",
    )


LEAD = Entity(
    "lead", "leads", "Lead", "leadid", "fullname", 4,
    (
        _primary_key("leadid"),
        *_NAMES,
        _FULLNAME,
        _string("companyname", 100, schema_name="CompanyName"),
        _EMAIL,
        _PHONE,
        *_ADDRESS,
        _string("subject", 300, schema_name="Subject"),
        Attribute("leadsourcecode", "Picklist", options=LEAD_SOURCE_OPTIONS, schema_name="LeadSourceCode"),
        _state("Open", "Qualified", "Disqualified"),
        _status(
            (1, "New", 0), (2, "Contacted", 0), (3, "Qualified", 1), (4, "Lost", 2),
            (5, "Cannot Contact", 2), (6, "No Longer Interested", 2), (7, "Canceled", 2),
        ),
        # Choice: 100 — F&O's prospect id (smmBusRelAccount, 20) with room for the `<company>:`
        # prefix older leads carry, as a dual-write string column of the integration key.
        _string("msdyn_prospectid", 100),
        _boolean("msdyn_b2bcommerceprospect"),
        Attribute("msdyn_b2bprospectstatus", "Picklist", options=B2B_PROSPECT_STATUS_OPTIONS),
        _lookup("parentaccountid", "account"),
        _lookup("parentcontactid", "contact"),
        _lookup("qualifyingopportunityid", "opportunity"),
        # The company column dual-write adds to company-specific tables, part of their key.
        _lookup("msdyn_company", "cdm_company"),
        _OWNER,
        *_SYSTEM,
    ),
    # Dual-write's key for company-specific tables: the business key and the company.
    keys=(AlternateKey("msdyn_prospectid_company", ("msdyn_prospectid", "msdyn_company")),),
)
OPPORTUNITY = Entity(
    "opportunity", "opportunities", "Opportunity", "opportunityid", "name", 3,
    (
        _primary_key("opportunityid"),
        _string("name", 300, required="ApplicationRequired", schema_name="Name"),
        _state("Open", "Won", "Lost"),
        _status((1, "In Progress", 0), (2, "On Hold", 0), (3, "Won", 1), (4, "Canceled", 2), (5, "Out-Sold", 2)),
        _lookup("originatingleadid", "lead"),
        _lookup("parentaccountid", "account"),
        _lookup("parentcontactid", "contact"),
        _OWNER,
        *_SYSTEM,
    ),
)
ACCOUNT = Entity(
    "account", "accounts", "Account", "accountid", "name", 1,
    (
        _primary_key("accountid"),
        _string("name", 160, required="ApplicationRequired", schema_name="Name"),
        _string("accountnumber", 20, schema_name="AccountNumber"),
        _EMAIL,
        _PHONE,
        *_ADDRESS,
        _lookup("originatingleadid", "lead"),
        _OWNER,
        *_SYSTEM,
    ),
)
CONTACT = Entity(
    "contact", "contacts", "Contact", "contactid", "fullname", 2,
    (
        _primary_key("contactid"),
        *_NAMES,
        _FULLNAME,
        _EMAIL,
        _PHONE,
        Attribute("parentcustomerid", "Customer", targets=("account", "contact")),
        _lookup("originatingleadid", "lead"),
        _OWNER,
        *_SYSTEM,
    ),
)
OPPORTUNITY_CLOSE = Entity(
    "opportunityclose", "opportunitycloses", "OpportunityClose", "activityid", "subject", 4208,
    (
        _primary_key("activityid"),
        _string("subject", 200, schema_name="Subject"),
        Attribute("description", "Memo", max_length=2000, schema_name="Description"),
        _lookup("opportunityid", "opportunity"),
        _OWNER,
        *_SYSTEM,
    ),
)
SYSTEM_USER = Entity(
    "systemuser", "systemusers", "SystemUser", "systemuserid", "fullname", 8,
    (
        _primary_key("systemuserid"),
        _string("fullname", 200, valid_for_create=False, valid_for_update=False, schema_name="FullName"),
        Attribute("applicationid", "Uniqueidentifier", schema_name="ApplicationId"),
        _boolean("isdisabled", "Enabled", "Disabled"),  # "Status" of a user; application users start enabled
        *_SYSTEM,
    ),
)
SAVED_QUERY = Entity(
    "savedquery", "savedqueries", "SavedQuery", "savedqueryid", "name", 1039,
    (
        _primary_key("savedqueryid"),
        _string("name", 200, required="SystemRequired", schema_name="Name"),
        Attribute("returnedtypecode", "EntityName", required="SystemRequired", schema_name="ReturnedTypeCode"),
        *_SYSTEM,
    ),
)
# As dual-write's "Legal entities (cdm_companies)" map creates it. Choice: its object type code is
# the tenant's own (a custom table's is assigned at install, from 10000 up); 10010 here.
CDM_COMPANY = Entity(
    "cdm_company", "cdm_companies", "cdm_Company", "cdm_companyid", "cdm_name", 10010,
    (
        _primary_key("cdm_companyid"),
        # F&O's DataAreaId is 4 characters; Choice: dual-write's column holds 10.
        _string("cdm_companycode", 10, required="ApplicationRequired"),
        _string("cdm_name", 100),
        *_SYSTEM,
    ),
    keys=(AlternateKey("cdm_companycode_key", ("cdm_companycode",)),),
    is_custom=True,
)
DATAVERSE_ENTITIES: dict[str, Entity] = {
    entity.logical_name: entity
    for entity in (LEAD, OPPORTUNITY, ACCOUNT, CONTACT, OPPORTUNITY_CLOSE, SYSTEM_USER, SAVED_QUERY, CDM_COMPANY)
}


def navigation_properties(entity: Entity) -> dict[str, tuple[str, str]]:
    """The single-valued navigation properties a client binds through: navigation -> (lookup
    column, target logical name). A lookup to one table is bound by its own name; one to several
    tables (Customer) has a navigation per target, `<column>_<target>`. An owner is bound as
    `ownerid` to a system user (the fakes serve no teams)."""
    navigations: dict[str, tuple[str, str]] = {}
    for attribute in entity.attributes:
        if attribute.type == "Owner":
            navigations[attribute.logical_name] = (attribute.logical_name, "systemuser")
        elif len(attribute.targets) == 1:
            navigations[attribute.logical_name] = (attribute.logical_name, attribute.targets[0])
        else:
            for target in attribute.targets:
                navigations[f"{attribute.logical_name}_{target}"] = (attribute.logical_name, target)
    return navigations


class DataverseModel:
    """The tenant's tables: the default model, less what the admin surface took away."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.entities: dict[str, Entity] = dict(DATAVERSE_ENTITIES)

    def entity(self, logical_name: str) -> Entity | None:
        return self.entities.get(logical_name)

    def attribute(self, logical_name: str, column: str) -> Attribute | None:
        return self.entities[logical_name].by_name.get(column)

    def change(self, table: object, remove_columns: object = None, key_status: object = None,
               remove_keys: object = None, max_lengths: object = None, options: object = None) -> None:
        """One admin change; ValueError naming the field if it is wrong (then nothing changes)."""
        if not isinstance(table, str) or table not in self.entities:
            raise ValueError(f"table must be one of {', '.join(self.entities)}")
        entity = self.entities[table]
        if max_lengths is not None:
            changed = _checked_max_lengths(max_lengths, entity.by_name, _string_limits)
            entity = replace(entity, attributes=tuple(
                replace(a, max_length=changed[a.logical_name]) if a.logical_name in changed else a
                for a in entity.attributes))
        if options is not None:
            chosen = _checked_options(options, entity.by_name)
            entity = replace(entity, attributes=tuple(
                replace(a, options=chosen[a.logical_name]) if a.logical_name in chosen else a
                for a in entity.attributes))
        if remove_columns is not None:
            entity = entity.without(_columns_to_remove(remove_columns, entity.by_name, entity.primary_id))
        if key_status is not None:
            if key_status not in KEY_STATUSES:
                raise ValueError(f"key_status must be one of {', '.join(KEY_STATUSES)}")
            if not entity.keys:
                raise ValueError(f"key_status: the table {table} has no alternate key")
            entity = replace(entity, keys=tuple(replace(key, status=key_status) for key in entity.keys))
        if remove_keys is not None:
            if not isinstance(remove_keys, bool):
                raise ValueError("remove_keys must be true or false")
            if remove_keys:
                entity = replace(entity, keys=())
        self.entities[table] = entity


# The largest MaxLength Dataverse allows: StringAttributeMetadata.MaxSupportedLength 4000,
# MemoAttributeMetadata.MaxSupportedLength 1048576 (the SDK's reference, Microsoft.Xrm.Sdk.Metadata).
_DATAVERSE_MAX_LENGTHS = {"String": 4000, "Memo": 1048576}
_INT32 = (-(2**31), 2**31 - 1)


def _string_limits(attribute: Attribute) -> int | None:
    """The largest MaxLength a Dataverse column may have, None if it is not a text column."""
    return _DATAVERSE_MAX_LENGTHS.get(attribute.type) if attribute.max_length is not None else None


def _checked_max_lengths(lengths: object, existing: Mapping[str, Any],
                         largest: Callable[[Any], int | None]) -> dict[str, int]:
    """`{"lastname": 80}`: each a string column of the table, each a whole number from 1 to `largest`'s."""
    if not isinstance(lengths, dict) or not lengths:
        raise ValueError('max_lengths must be a non-empty object of column: length, e.g. {"lastname": 80}')
    for column, length in lengths.items():
        if column not in existing:
            raise ValueError(f"max_lengths: {column} is not a column of the table")
        limit = largest(existing[column])
        if limit is None:
            raise ValueError(f"max_lengths: {column} is not a string column")
        if isinstance(length, bool) or not isinstance(length, int) or not 1 <= length <= limit:
            raise ValueError(f"max_lengths: {column} must be a whole number from 1 to {limit}, not {length!r}")
    return dict(lengths)


def _checked_options(options: object, existing: Mapping[str, Attribute]) -> dict[str, tuple[Option, ...]]:
    """`{"msdyn_b2bprospectstatus": {"Pending": 100000000, ...}}`: each a Picklist column of the
    table; its options label -> value, labels non-empty, values distinct 32-bit whole numbers."""
    if not isinstance(options, dict) or not options:
        raise ValueError('options must be a non-empty object of column: {label: value}')
    chosen = {}
    for column, labelled in options.items():
        attribute = existing.get(column)
        if attribute is None:
            raise ValueError(f"options: {column} is not a column of the table")
        if attribute.type != "Picklist":
            raise ValueError(f"options: {column} is a {attribute.type} column, not a Picklist (choice)")
        if not isinstance(labelled, dict) or not labelled:
            raise ValueError(f"options: {column} must be a non-empty object of label: value")
        for label, value in labelled.items():
            if not label.strip():
                raise ValueError(f"options: {column} has an empty label")
            if isinstance(value, bool) or not isinstance(value, int) or not _INT32[0] <= value <= _INT32[1]:
                raise ValueError(
                    f"options: {column}: the value of {label!r} must be a 32-bit whole number, not {value!r}")
        if len(set(labelled.values())) != len(labelled):
            raise ValueError(f"options: {column}: two options have the same value")
        chosen[column] = tuple(Option(value, label) for label, value in labelled.items())
    return chosen


def _columns_to_remove(columns: object, existing: Mapping[str, object], protected: str) -> list[str]:
    if not isinstance(columns, list) or not columns or not all(isinstance(c, str) for c in columns):
        raise ValueError("remove_columns must be a non-empty list of column names")
    for column in columns:
        if column not in existing:
            raise ValueError(f"remove_columns: {column} is not a column of the table")
        if column == protected:
            raise ValueError(f"remove_columns: {column} is the table's key and cannot be removed")
    return list(columns)


# --- Commerce HQ (F&O) ----------------------------------------------------------------------------

NAMESPACE = "Microsoft.Dynamics.DataEntities"
# Members in value order: a field nobody sets gets member 0, as in F&O.
ENUMS: dict[str, tuple[str, ...]] = {
    "NoYes": ("No", "Yes"),
    "RetailB2BProspectStatus": ("Pending", "Approved", "Rejected", "Unknown"),
    "CustHierarchyPurpose": ("B2BOrganization",),
    "CustHierarchyNodeRole": ("Admin", "User"),
    "CustHierarchyNodeType": ("Customer",),
}


@dataclass(frozen=True)
class Property:
    """An entity type's property, as `$metadata` describes it: `kind` is "string", "int" or an
    enum name; `max_length` the field's EDT string length; `mandatory` F&O's Mandatory (must be
    filled in on create)."""

    name: str
    kind: str = "string"
    max_length: int | None = None
    mandatory: bool = False

    @property
    def edm_type(self) -> str:
        if self.kind == "string":
            return "Edm.String"
        if self.kind == "int":
            return "Edm.Int32"
        return f"{NAMESPACE}.{self.kind}"


@dataclass(frozen=True)
class EntityType:
    """An F&O data entity: its public collection, type, the table named in its messages."""

    name: str  # public collection name, as in the URL
    type_name: str
    table: str
    keys: tuple[str, ...]
    properties: tuple[Property, ...]
    server_assigned: frozenset[str] = frozenset()
    fixed: frozenset[str] = frozenset()
    read_only: bool = False

    @cached_property
    def by_name(self) -> dict[str, Property]:
        return {prop.name: prop for prop in self.properties}

    @cached_property
    def types(self) -> dict[str, str]:
        """Field -> "string", "int" or an enum name; includes the keys."""
        return {prop.name: prop.kind for prop in self.properties}

    @cached_property
    def enum_map(self) -> dict[str, str]:
        return {name: kind for name, kind in self.types.items() if kind in ENUMS}

    def default_row(self) -> dict[str, object]:
        defaults = {"string": "", "int": 0}
        return {name: defaults[kind] if kind in defaults else ENUMS[kind][0] for name, kind in self.types.items()}

    def without(self, columns: Iterable[str]) -> EntityType:
        gone = set(columns)
        return replace(self, properties=tuple(p for p in self.properties if p.name not in gone))


def _text(name: str, length: int, mandatory: bool = False) -> Property:
    return Property(name, "string", length, mandatory)


# F&O extended data types' lengths: DataAreaId 4, CustAccount 20, smmBusRelAccount 20, Name 100,
# Email 255, Phone 255, AddressStreet 250, AddressCity 60, AddressStateId 10, AddressZipCodeId 10,
# AddressCountryRegionISOCode 3 (ISO alpha-3), CurrencyCode 3, LanguageId 7, Notes 1000 (Choice:
# F&O's Notes is a memo; 1000 as the Prospects entity exposes it), CustGroupId 10, DirPartyNumber 40.
_DATA_AREA = _text("dataAreaId", 4)
PROSPECTS = EntityType(
    "Prospects", "Prospect", "Prospects (smmBusRelTable)", ("dataAreaId", "ProspectId"),
    (
        _DATA_AREA,
        _text("ProspectId", 20),
        _text("ProspectName", 100),
        _text("CompanyName", 100),
        _text("PrimaryEmailAddress", 255),
        _text("PrimaryPhoneNumber", 255),
        _text("AddressStreet", 250),
        _text("AddressCity", 60),
        _text("AddressStateId", 10),
        _text("AddressZipCode", 10),
        _text("AddressCountryRegionISOCode", 3),
        _text("CurrencyCode", 3),
        _text("LanguageId", 7),
        _text("Note", 1000),
        _text("RetailChannelOperatingUnitPartyNumber", 40),
        Property("IsB2BProspect", "NoYes"),
        Property("B2BProspectStatus", "RetailB2BProspectStatus"),
    ),
)
CUSTOMERS = EntityType(
    "CustomersV3", "CustomerV3", "Customers (CustTable)", ("dataAreaId", "CustomerAccount"),
    (
        _DATA_AREA,
        _text("CustomerAccount", 20),
        _text("PartyType", 20, mandatory=True),  # a string in the real $metadata, not an enum
        _text("PartyNumber", 40),
        _text("OrganizationName", 100),
        _text("PersonFirstName", 25),
        _text("PersonLastName", 25),
        _text("PrimaryContactEmail", 255),
        # Mandatory, a CustomerGroups row of the customer's company ("Customers V3 entity":
        # CUSTOMERGROUPID "Specifies a foreign key to the Customer groups entity. This field is required.").
        _text("CustomerGroupId", 10, mandatory=True),
        _text("SalesCurrencyCode", 3),
    ),
    server_assigned=frozenset({"PartyNumber"}),
)
HIERARCHIES = EntityType(
    "CustomerHiearchies", "CustomerHiearchy", "Customer hierarchy (CustHierarchy)", ("CustomerHierarchyId",),
    (
        _DATA_AREA,
        _text("CustomerHierarchyId", 20),
        _text("Name", 100),
        _text("OrganizationPartyNumber", 40, mandatory=True),
        _text("SellerChannel", 40),
        Property("Purpose", "CustHierarchyPurpose"),
        Property("CurrentVersion", "int"),
    ),
    server_assigned=frozenset({"CurrentVersion"}),
    fixed=frozenset({"dataAreaId"}),  # the company: the payload's, else the caller's default company
)
NODES = EntityType(
    "CustomerHierarchyNodes", "CustomerHierarchyNode", "Customer hierarchy node (CustHierarchyNode)",
    ("CustomerHierarchyId", "NodePartyNumber"),
    (
        _DATA_AREA,
        _text("CustomerHierarchyId", 20),
        _text("NodePartyNumber", 40),
        Property("Role", "CustHierarchyNodeRole"),
        Property("NodeType", "CustHierarchyNodeType"),
        Property("VersionAdded", "int"),
        Property("VersionRemoved", "int"),
    ),
    server_assigned=frozenset({"VersionAdded"}),
    fixed=frozenset({"dataAreaId"}),
)
LEGAL_ENTITIES = EntityType(
    "LegalEntities", "LegalEntity", "Legal entities (CompanyInfo)", ("LegalEntityId",),
    (_text("LegalEntityId", 4), _text("Name", 100)),
    read_only=True,
)
CUSTOMER_GROUPS = EntityType(
    "CustomerGroups", "CustomerGroup", "Customer groups (CustGroup)", ("dataAreaId", "CustomerGroupId"),
    (_DATA_AREA, _text("CustomerGroupId", 10), _text("Description", 60)),
    read_only=True,
)
COMMERCE_ENTITY_TYPES: dict[str, EntityType] = {
    entity.name: entity
    for entity in (PROSPECTS, CUSTOMERS, HIERARCHIES, NODES, LEGAL_ENTITIES, CUSTOMER_GROUPS)
}
# Contoso's demo companies, in every fake tenant; other legal entities are named by their id.
DEFAULT_LEGAL_ENTITIES = {"usmf": "Contoso Entertainment System USA", "usrt": "Contoso Retail USA"}
# F&O demo data's customer groups (Contoso, USMF), seeded in every legal entity the fake knows.
DEMO_CUSTOMER_GROUPS = (
    ("10", "Wholesale customers"),
    ("20", "Major customers"),
    ("30", "Retail customers"),
    ("40", "Internet customers"),
    ("80", "Other customers"),
    ("90", "Intercompany customers"),
)


class CommerceModel:
    """The tenant's entity sets: the default model, less what the admin surface took away."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.entity_types: dict[str, EntityType] = dict(COMMERCE_ENTITY_TYPES)

    def change(self, table: object, remove_columns: object = None, max_lengths: object = None) -> None:
        if not isinstance(table, str) or table not in self.entity_types:
            raise ValueError(f"table must be one of {', '.join(self.entity_types)}")
        entity = self.entity_types[table]
        if max_lengths is not None:
            changed = _checked_max_lengths(max_lengths, entity.by_name, _hq_string_limit)
            entity = replace(entity, properties=tuple(
                replace(p, max_length=changed[p.name]) if p.name in changed else p for p in entity.properties))
        if remove_columns is not None:
            removed = _columns_to_remove(remove_columns, entity.by_name, "")
            keys = [column for column in removed if column in entity.keys]
            if keys:
                raise ValueError(f"remove_columns: {keys[0]} is a key of {table} and cannot be removed")
            entity = entity.without(removed)
        self.entity_types[table] = entity


def _hq_string_limit(prop: Property) -> int | None:
    """Choice: F&O documents no upper bound for an extended data type's string length; 8000 here."""
    return 8000 if prop.kind == "string" else None


def change_model(body: object, dataverse: DataverseModel, commerce: CommerceModel) -> None:
    """`POST /_admin/model`: one change to one system's model; ValueError naming the field."""
    if not isinstance(body, dict):
        raise ValueError('the body must be a JSON object: {"system": ..., "table": ..., <change>}')
    system = body.get("system")
    changes = {name: value for name, value in body.items() if name not in ("system", "table")}
    allowed = {"dataverse": {"remove_columns", "key_status", "remove_keys", "max_lengths", "options"},
               "commerce": {"remove_columns", "max_lengths"}}
    if system not in allowed:
        raise ValueError('system must be "dataverse" or "commerce"')
    unknown = sorted(set(changes) - allowed[system])
    if unknown:
        raise ValueError(f"unknown field(s) for {system}: {', '.join(unknown)}")
    if not changes:
        raise ValueError(f"the body names no change: one of {', '.join(sorted(allowed[system]))}")
    model = dataverse if system == "dataverse" else commerce
    model.change(body.get("table"), **changes)
