"""The tables' metadata, served from the table model (model.py) as Microsoft serves it:

- Dataverse: `EntityDefinitions` (the collection, with `$filter` on LogicalName, `$select` and
  `$expand=Attributes(...),Keys(...)`; one table by `(LogicalName='lead')` or by its MetadataId;
  its `/Attributes` (also cast to a metadata type, e.g. `/Microsoft.Dynamics.CRM.PicklistAttributeMetadata`
  with `$expand=OptionSet(...)`), `/Attributes(LogicalName='x')`, `/Keys`) and `$metadata` (CSDL).
- Commerce HQ: `/data/$metadata` (CSDL: entity types with MaxLength and Nullable, enum types).

Both read the tenant's copy of the model, so a column the admin surface removed is gone here too.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any
from urllib.parse import unquote_to_bytes
from xml.sax.saxutils import quoteattr

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from d365_fakes import model
from d365_fakes.odata_query import Dialect, ODataQueryError, apply_query

CRM = "Microsoft.Dynamics.CRM"
LANGUAGE_CODE = 1033  # English (United States), the organization's base language
NOT_FOUND_ENTITY = "0x80041102"  # QueryBuilderNoEntity
NOT_FOUND_ATTRIBUTE = "0x80041103"  # QueryBuilderNoAttribute
UNKNOWN_NAME = "0x80060888"
BAD_QUERY = "0x8006088a"
XML = "application/xml"

_GUID = r"[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}"
# `(LogicalName='lead')` or `(<MetadataId>)`, then optional navigations.
_ENTITY_PATH = re.compile(
    rf"(?:\((?:LogicalName='(?P<name>[^']*)'|(?P<id>{_GUID}))\))?"
    rf"(?:/(?P<nav>Attributes|Keys)"
    rf"(?:\((?:LogicalName='(?P<child>[^']*)'|(?P<child_id>{_GUID}))\))?"
    rf"(?:/{re.escape(CRM)}\.(?P<cast>\w+))?)?"
)
_ATTRIBUTE_TYPE_NAMES = {  # AttributeTypeName.Value
    "String": "StringType", "Memo": "MemoType", "Integer": "IntegerType", "BigInt": "BigIntType",
    "Picklist": "PicklistType", "State": "StateType", "Status": "StatusType", "Boolean": "BooleanType",
    "Lookup": "LookupType", "Owner": "OwnerType", "Customer": "CustomerType",
    "Uniqueidentifier": "UniqueidentifierType", "DateTime": "DateTimeType", "EntityName": "EntityNameType",
}
_OPTION_TYPES = {"Picklist": "Picklist", "State": "State", "Status": "Status", "Boolean": "Boolean"}
_BASE_ATTRIBUTE_PROPERTIES = (
    "LogicalName", "SchemaName", "EntityLogicalName", "AttributeType", "AttributeTypeName", "MetadataId",
    "RequiredLevel", "IsValidForCreate", "IsValidForUpdate", "IsValidForRead", "IsPrimaryId",
    "IsPrimaryName", "IsCustomAttribute", "DisplayName", "AttributeOf",
)
# Properties of the derived attribute metadata types, beyond the base ones.
_DERIVED_PROPERTIES = {
    "StringAttributeMetadata": ("MaxLength", "DatabaseLength", "Format"),
    "MemoAttributeMetadata": ("MaxLength", "DatabaseLength", "Format"),
    "LookupAttributeMetadata": ("Targets",),
    "PicklistAttributeMetadata": ("DefaultFormValue",),
    "BooleanAttributeMetadata": ("DefaultValue",),
}
_OPTION_SET_NAVIGATIONS = ("OptionSet", "GlobalOptionSet")
_KEY_PROPERTIES = (
    "LogicalName", "SchemaName", "KeyAttributes", "EntityKeyIndexStatus", "EntityLogicalName", "MetadataId",
    "DisplayName", "IsManaged",
)
_ENTITY_PROPERTIES = (
    "LogicalName", "SchemaName", "EntitySetName", "LogicalCollectionName", "CollectionSchemaName",
    "PrimaryIdAttribute", "PrimaryNameAttribute", "ObjectTypeCode", "MetadataId", "IsCustomEntity",
    "IsActivity", "OwnershipType", "TableType", "DisplayName", "DisplayCollectionName", "IsManaged",
)


class MetadataError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


# --- Dataverse: JSON ----------------------------------------------------------------------------


def label(text: str) -> dict[str, Any]:
    """A Label complex type: the text in the organization's language, as the user sees it."""
    localized = {"Label": text, "LanguageCode": LANGUAGE_CODE, "IsManaged": True, "MetadataId": None, "HasChanged": None}
    return {"LocalizedLabels": [localized], "UserLocalizedLabel": localized}


def _display(name: str) -> str:
    """A display name from a schema name: its words, split where the case changes."""
    words = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", name.removeprefix("msdyn_").removeprefix("cdm_"))
    return words.replace("_", " ").strip().capitalize()


def entity_json(entity: model.Entity) -> dict[str, Any]:
    return {
        "MetadataId": entity.metadata_id,
        "LogicalName": entity.logical_name,
        "SchemaName": entity.schema_name,
        "EntitySetName": entity.entity_set_name,
        "LogicalCollectionName": entity.entity_set_name,
        "CollectionSchemaName": entity.schema_name + "s",
        "PrimaryIdAttribute": entity.primary_id,
        "PrimaryNameAttribute": entity.primary_name,
        "ObjectTypeCode": entity.object_type_code,
        "IsCustomEntity": entity.is_custom,
        "IsActivity": entity.logical_name == "opportunityclose",
        "OwnershipType": "UserOwned" if "ownerid" in entity.by_name else "OrganizationOwned",
        "TableType": "Standard",
        "IsManaged": True,
        "DisplayName": label(_display(entity.schema_name)),
        "DisplayCollectionName": label(_display(entity.schema_name) + "s"),
    }


def attribute_json(entity: model.Entity, attribute: model.Attribute) -> dict[str, Any]:
    body: dict[str, Any] = {
        "@odata.type": f"#{CRM}.{attribute.metadata_type}",
        "MetadataId": attribute.metadata_id(entity.logical_name),
        "LogicalName": attribute.logical_name,
        "SchemaName": attribute.schema,
        "EntityLogicalName": entity.logical_name,
        "AttributeType": attribute.type,
        "AttributeTypeName": {"Value": _ATTRIBUTE_TYPE_NAMES[attribute.type]},
        "AttributeOf": None,
        "RequiredLevel": {
            "Value": attribute.required,
            "CanBeChanged": attribute.required != "SystemRequired",
            "ManagedPropertyLogicalName": "canmodifyrequirementlevelsettings",
        },
        "IsValidForCreate": attribute.valid_for_create,
        "IsValidForUpdate": attribute.valid_for_update,
        "IsValidForRead": True,
        "IsPrimaryId": attribute.logical_name == entity.primary_id,
        "IsPrimaryName": attribute.logical_name == entity.primary_name,
        "IsCustomAttribute": attribute.logical_name.startswith(("msdyn_", "cdm_")),
        "DisplayName": label(_display(attribute.schema)),
    }
    if attribute.max_length is not None:
        # Dataverse stores strings as nvarchar: DatabaseLength is twice MaxLength.
        body |= {"MaxLength": attribute.max_length, "DatabaseLength": attribute.max_length * 2}
        body["Format"] = "Email" if attribute.logical_name.startswith("emailaddress") else (
            "Phone" if attribute.logical_name.startswith("telephone") else "Text")
        if attribute.type == "Memo":
            body["Format"] = "TextArea"
    if attribute.is_lookup:
        body["Targets"] = list(attribute.targets)
    if attribute.type == "Picklist":
        body["DefaultFormValue"] = -1  # no option preselected on forms
    if attribute.type == "Boolean":
        body["DefaultValue"] = False
    return body


def option_set_json(entity: model.Entity, attribute: model.Attribute) -> dict[str, Any]:
    """The OptionSet navigation of a choice column (a local option set, named as Dataverse names
    them, `<table>_<column>`); a Boolean's has TrueOption/FalseOption instead of Options."""
    name = attribute.option_set_name or f"{entity.logical_name}_{attribute.logical_name}"
    body: dict[str, Any] = {
        "MetadataId": str(uuid.uuid5(uuid.NAMESPACE_URL, f"d365-fakes/metadata/optionset/{name}")),
        "Name": name,
        "OptionSetType": _OPTION_TYPES[attribute.type],
        "IsGlobal": attribute.option_set_name is not None,
        "IsCustomOptionSet": attribute.logical_name.startswith(("msdyn_", "cdm_")),
        "DisplayName": label(_display(attribute.schema)),
    }
    if attribute.type == "Boolean":
        false, true = attribute.options
        body["FalseOption"], body["TrueOption"] = _option_json(false), _option_json(true)
        return body
    options = [_option_json(option) for option in attribute.options]
    if attribute.type == "Status":
        for row, option in zip(options, attribute.options):
            row["State"] = option.state
    if attribute.type == "State":
        statuses = entity.by_name["statuscode"].options
        for row, option in zip(options, attribute.options):
            # A state's default status is its first one, as the Status column lists them.
            row["DefaultStatus"] = next(status.value for status in statuses if status.state == option.value)
            row["InvariantName"] = option.label
    body["Options"] = options
    return body


def _option_json(option: model.Option) -> dict[str, Any]:
    return {"Value": option.value, "Label": label(option.label), "Color": None, "IsManaged": True, "ExternalValue": None}


def key_json(entity: model.Entity, key: model.AlternateKey) -> dict[str, Any]:
    return {
        "MetadataId": key.metadata_id(entity.logical_name),
        "LogicalName": key.logical_name,
        "SchemaName": key.logical_name,
        "EntityLogicalName": entity.logical_name,
        "KeyAttributes": list(key.key_attributes),
        "EntityKeyIndexStatus": key.status,
        "DisplayName": label(_display(key.logical_name)),
        "IsManaged": True,
    }


# --- Dataverse: query options -------------------------------------------------------------------


def _split_top_level(text: str, separator: str) -> list[str]:
    """`text` split at `separator` outside parentheses and quotes."""
    parts, depth, quoted, current = [], 0, False, []
    for character in text:
        if character == "'":
            quoted = not quoted
        elif not quoted and character == "(":
            depth += 1
        elif not quoted and character == ")":
            depth -= 1
        if character == separator and depth == 0 and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(character)
    if depth != 0 or quoted:
        raise MetadataError(400, BAD_QUERY, f"Bad Request - Error in query syntax: '{text}'.")
    parts.append("".join(current))
    return [part.strip() for part in parts if part.strip()]


def _options(text: str) -> dict[str, str]:
    """`$select=a,b;$filter=...` (the options inside an $expand item)."""
    options = {}
    for part in _split_top_level(text, ";"):
        name, equals, value = part.partition("=")
        if not equals:
            raise MetadataError(400, BAD_QUERY, f"Bad Request - Error in query syntax: '{part}'.")
        options[name.strip()] = value.strip()
    return options


def _expand(text: str | None) -> dict[str, dict[str, str]]:
    """`$expand=Attributes($select=...),Keys` -> {"Attributes": {"$select": ...}, "Keys": {}}."""
    expanded: dict[str, dict[str, str]] = {}
    for item in _split_top_level(text or "", ","):
        match = re.fullmatch(r"(\w+)(?:\((.*)\))?", item, re.DOTALL)
        if match is None:
            raise MetadataError(400, BAD_QUERY, f"Bad Request - Error in query syntax: '{item}'.")
        expanded[match[1]] = _options(match[2] or "")
    return expanded


def _selected(row: dict[str, Any], select: str | None, allowed: Iterable[str], type_name: str,
              always: tuple[str, ...] = ("MetadataId",)) -> dict[str, Any]:
    """`$select` of metadata properties: unknown names are refused as the Web API refuses them;
    the key (MetadataId) and `@odata.type` always stay."""
    if select is None:
        return row
    names = [name.strip() for name in select.split(",") if name.strip()]
    allowed = set(allowed)
    for name in names:
        if name not in allowed:
            raise MetadataError(
                400, UNKNOWN_NAME, f"Could not find a property named '{name}' on type '{CRM}.{type_name}'."
            )
    keep = set(names) | set(always)
    return {name: value for name, value in row.items() if name in keep or name.startswith("@")}


def _filtered(rows: list[dict[str, Any]], text: str | None, fields: Iterable[str]) -> list[dict[str, Any]]:
    """`$filter` on metadata rows (LogicalName eq '...', or, and: the shared parser)."""
    if not text:
        return rows
    try:
        return apply_query(rows, {"$filter": text}, Dialect.DATAVERSE, tuple(fields)).rows
    except ODataQueryError as error:
        raise MetadataError(400, BAD_QUERY, str(error)) from None


class DataverseMetadata:
    """Answers the EntityDefinitions requests from the tenant's model."""

    def __init__(self, tables: model.DataverseModel) -> None:
        self.tables = tables

    def entity_definitions(self, root: str, path: str, params: Mapping[str, str]) -> dict[str, Any]:
        """`path`: what follows `EntityDefinitions`, percent-decoded."""
        match = _ENTITY_PATH.fullmatch(path)
        if match is None:
            raise MetadataError(400, BAD_QUERY, f"Bad Request - Error in query syntax: 'EntityDefinitions{path}'.")
        context = f"{root}/$metadata#EntityDefinitions"
        if match["name"] is None and match["id"] is None:
            if match["nav"]:
                raise MetadataError(400, BAD_QUERY, f"Bad Request - Error in query syntax: 'EntityDefinitions{path}'.")
            return self._collection(context, params)
        entity = self._entity(match["name"], match["id"])
        keyed = f"{context}({entity.metadata_id})"
        if match["nav"] is None:
            return self._single(f"{context}", entity, params)
        if match["nav"] == "Keys":
            return self._keys(f"{keyed}/Keys", entity, match["child"], params)
        return self._attributes(f"{keyed}/Attributes", entity, match, params)

    # Entities

    def _entity(self, name: str | None, metadata_id: str | None) -> model.Entity:
        for entity in self.tables.entities.values():
            if entity.logical_name == name or (metadata_id and entity.metadata_id == metadata_id.lower()):
                return entity
        shown = name if name is not None else metadata_id
        raise MetadataError(
            404,
            NOT_FOUND_ENTITY,
            f"Could not find entity with {'LogicalName' if name is not None else 'MetadataId'} = '{shown}'. "
            f"The entity with a name = '{shown}' with namemapping = 'Logical' was not found in the MetadataCache.",
        )

    def _collection(self, context: str, params: Mapping[str, str]) -> dict[str, Any]:
        _refuse_options(params, ("$select", "$filter", "$expand"))
        rows = [entity_json(entity) for entity in self.tables.entities.values()]
        matching = {row["MetadataId"] for row in _filtered(rows, params.get("$filter"), _ENTITY_PROPERTIES)}
        entities = [entity for entity in self.tables.entities.values() if entity.metadata_id in matching]
        select = params.get("$select")
        value = [self._entity_row(entity, params) for entity in entities]
        return {"@odata.context": context + (f"({select})" if select else ""), "value": value}

    def _single(self, context: str, entity: model.Entity, params: Mapping[str, str]) -> dict[str, Any]:
        _refuse_options(params, ("$select", "$expand"))
        select = params.get("$select")
        context += (f"({select})" if select else "") + "/$entity"
        return {"@odata.context": context, **self._entity_row(entity, params)}

    def _entity_row(self, entity: model.Entity, params: Mapping[str, str]) -> dict[str, Any]:
        row = _selected(entity_json(entity), params.get("$select"), _ENTITY_PROPERTIES, "EntityMetadata")
        for navigation, options in _expand(params.get("$expand")).items():
            if navigation == "Attributes":
                rows = [self._attribute_row(entity, a, options, None) for a in entity.attributes]
                row["Attributes"] = _filtered(rows, options.get("$filter"), _BASE_ATTRIBUTE_PROPERTIES)
            elif navigation == "Keys":
                rows = [key_json(entity, key) for key in entity.keys]
                row["Keys"] = [_selected(key, options.get("$select"), _KEY_PROPERTIES, "EntityKeyMetadata") for key in rows]
            else:
                raise MetadataError(
                    400, UNKNOWN_NAME, f"Could not find a property named '{navigation}' on type '{CRM}.EntityMetadata'."
                )
        return row

    # Attributes

    def _attributes(self, context: str, entity: model.Entity, match: re.Match[str], params: Mapping[str, str]) -> dict[str, Any]:
        cast = match["cast"]
        if cast is not None and cast not in model.METADATA_TYPES.values():
            raise MetadataError(400, BAD_QUERY, f"The type '{CRM}.{cast}' is not a type of attribute metadata.")
        if match["child"] is not None or match["child_id"] is not None:
            attribute = self._attribute(entity, match["child"], match["child_id"])
            if cast is not None and attribute.metadata_type != cast:
                raise MetadataError(
                    400, BAD_QUERY,
                    f"The attribute '{attribute.logical_name}' is a {attribute.metadata_type}, not a {cast}.",
                )
            _refuse_options(params, ("$select", "$expand"))
            select = params.get("$select")
            row = self._attribute_row(entity, attribute, params, cast)
            suffix = f"/{CRM}.{cast}" if cast else ""
            context = f"{context}({attribute.metadata_id(entity.logical_name)}){suffix}" + (f"({select})" if select else "") + "/$entity"
            return {"@odata.context": context, **row}
        _refuse_options(params, ("$select", "$filter", "$expand"))
        attributes = [a for a in entity.attributes if cast is None or a.metadata_type == cast]
        rows = [self._attribute_row(entity, a, params, cast) for a in attributes]
        select = params.get("$select")
        suffix = f"/{CRM}.{cast}" if cast else ""
        filterable = (*_BASE_ATTRIBUTE_PROPERTIES, *_DERIVED_PROPERTIES.get(cast or "", ()))
        return {
            "@odata.context": context + suffix + (f"({select})" if select else ""),
            "value": _filtered(rows, params.get("$filter"), filterable),
        }

    def _attribute(self, entity: model.Entity, name: str | None, metadata_id: str | None) -> model.Attribute:
        for attribute in entity.attributes:
            if attribute.logical_name == name or (metadata_id and attribute.metadata_id(entity.logical_name) == metadata_id.lower()):
                return attribute
        shown = name if name is not None else metadata_id
        raise MetadataError(
            404, NOT_FOUND_ATTRIBUTE,
            f"'{entity.logical_name}' entity doesn't contain attribute with Name = '{shown}' and NameMapping = 'Logical'.",
        )

    def _attribute_row(self, entity: model.Entity, attribute: model.Attribute, options: Mapping[str, str],
                       cast: str | None) -> dict[str, Any]:
        """One attribute: without a cast only the base AttributeMetadata properties may be
        selected (a derived one is refused, as the Web API refuses it); with one, its own too."""
        allowed = (*_BASE_ATTRIBUTE_PROPERTIES, *_DERIVED_PROPERTIES.get(cast or "", ()))
        type_name = cast or "AttributeMetadata"
        row = _selected(attribute_json(entity, attribute), options.get("$select"), allowed, type_name)
        for navigation, inner in _expand(options.get("$expand")).items():
            if navigation not in _OPTION_SET_NAVIGATIONS or cast not in (
                "PicklistAttributeMetadata", "StateAttributeMetadata", "StatusAttributeMetadata", "BooleanAttributeMetadata"
            ):
                raise MetadataError(
                    400, UNKNOWN_NAME, f"Could not find a property named '{navigation}' on type '{CRM}.{type_name}'."
                )
            option_set = option_set_json(entity, attribute)
            global_only = navigation == "GlobalOptionSet"
            if global_only and attribute.option_set_name is None:
                row[navigation] = None  # a local option set has no global one
                continue
            allowed_inner = (*option_set, "MetadataId")
            row[navigation] = _selected(option_set, inner.get("$select"), allowed_inner, "OptionSetMetadata")
        return row

    # Keys

    def _keys(self, context: str, entity: model.Entity, name: str | None, params: Mapping[str, str]) -> dict[str, Any]:
        _refuse_options(params, ("$select",))
        rows = [key_json(entity, key) for key in entity.keys]
        select = params.get("$select")
        if name is None:
            value = [_selected(row, select, _KEY_PROPERTIES, "EntityKeyMetadata") for row in rows]
            return {"@odata.context": context + (f"({select})" if select else ""), "value": value}
        for row in rows:
            if row["LogicalName"] == name:
                chosen = _selected(row, select, _KEY_PROPERTIES, "EntityKeyMetadata")
                return {"@odata.context": f"{context}({row['MetadataId']})/$entity", **chosen}
        raise MetadataError(404, NOT_FOUND_ENTITY, f"The key with a name = '{name}' was not found on entity '{entity.logical_name}'.")


def _refuse_options(params: Mapping[str, str], allowed: tuple[str, ...]) -> None:
    refused = sorted(name for name in params if name not in allowed)
    if refused:
        raise MetadataError(400, BAD_QUERY, f"The query parameter {refused[0]} is not supported.")


# --- CSDL ---------------------------------------------------------------------------------------

_EDMX_HEAD = ('<?xml version="1.0" encoding="utf-8"?>'
              '<edmx:Edmx Version="4.0" xmlns:edmx="http://docs.oasis-open.org/odata/ns/edmx"><edmx:DataServices>')
_EDMX_TAIL = "</edmx:DataServices></edmx:Edmx>"
_EDM_TYPES = {
    "String": "Edm.String", "Memo": "Edm.String", "Integer": "Edm.Int32", "BigInt": "Edm.Int64",
    "Picklist": "Edm.Int32", "State": "Edm.Int32", "Status": "Edm.Int32", "Boolean": "Edm.Boolean",
    "Uniqueidentifier": "Edm.Guid", "DateTime": "Edm.DateTimeOffset", "EntityName": "Edm.String",
}


def dataverse_csdl(tables: model.DataverseModel) -> str:
    """The Web API's `$metadata`: an EntityType per table (its columns, lookups as `_<x>_value`
    properties and single-valued navigation properties) and the EntitySets. As Dataverse's own,
    string properties carry no MaxLength: Dataverse's limits are in EntityDefinitions."""
    parts = [_EDMX_HEAD, f'<Schema Namespace="{CRM}" Alias="mscrm" xmlns="http://docs.oasis-open.org/odata/ns/edm">',
             '<EntityType Name="crmbaseentity" Abstract="true"/>']
    for entity in tables.entities.values():
        parts.append(f'<EntityType Name="{entity.logical_name}" BaseType="mscrm.crmbaseentity">')
        parts.append(f'<Key><PropertyRef Name="{entity.primary_id}"/></Key>')
        for attribute in entity.attributes:
            if attribute.is_lookup:
                parts.append(f'<Property Name="_{attribute.logical_name}_value" Type="Edm.Guid"/>')
            else:
                unicode = ' Unicode="false"' if _EDM_TYPES[attribute.type] == "Edm.String" else ""
                parts.append(f'<Property Name="{attribute.logical_name}" Type="{_EDM_TYPES[attribute.type]}"{unicode}/>')
        for navigation, (column, target) in model.navigation_properties(entity).items():
            parts.append(f'<NavigationProperty Name="{navigation}" Type="mscrm.{target}">'
                         f'<ReferentialConstraint Property="_{column}_value" '
                         f'ReferencedProperty="{model.DATAVERSE_ENTITIES[target].primary_id}"/></NavigationProperty>')
        parts.append("</EntityType>")
    parts.append('<EntityContainer Name="System">')
    for entity in tables.entities.values():
        parts.append(f'<EntitySet Name="{entity.entity_set_name}" EntityType="{CRM}.{entity.logical_name}"/>')
    parts.append("</EntityContainer></Schema>" + _EDMX_TAIL)
    return "".join(parts)


def commerce_csdl(entity_types: Mapping[str, model.EntityType]) -> str:
    """HQ's `/data/$metadata`: entity types with each property's Type, MaxLength (the field's
    string length) and Nullable (false for keys, mandatory fields, numbers and enums), the enum
    types and the entity sets."""
    parts = [_EDMX_HEAD, f'<Schema Namespace="{model.NAMESPACE}" xmlns="http://docs.oasis-open.org/odata/ns/edm">']
    for entity in entity_types.values():
        parts.append(f'<EntityType Name="{entity.type_name}"><Key>')
        parts += [f'<PropertyRef Name="{name}"/>' for name in entity.keys]
        parts.append("</Key>")
        for prop in entity.properties:
            not_null = prop.name in entity.keys or prop.mandatory or prop.kind != "string"
            attributes = f' Nullable="false"' if not_null else ""
            attributes += f' MaxLength="{prop.max_length}"' if prop.max_length is not None else ""
            parts.append(f'<Property Name="{prop.name}" Type="{prop.edm_type}"{attributes}/>')
        parts.append("</EntityType>")
    for name, members in model.ENUMS.items():
        parts.append(f'<EnumType Name="{name}">')
        parts += [f'<Member Name="{member}" Value="{value}"/>' for value, member in enumerate(members)]
        parts.append("</EnumType>")
    parts.append('<EntityContainer Name="Resources">')
    for entity in entity_types.values():
        parts.append(f'<EntitySet Name="{entity.name}" EntityType={quoteattr(model.NAMESPACE + "." + entity.type_name)}/>')
    parts.append("</EntityContainer></Schema>" + _EDMX_TAIL)
    return "".join(parts)


# --- routers ------------------------------------------------------------------------------------


def _raw_path(request: Request) -> str:
    raw = request.scope.get("raw_path")
    return unquote_to_bytes(raw).decode("utf-8", "replace") if raw else request.scope["path"]


def create_dataverse_router(api_root: str, tables: model.DataverseModel, caller: Callable[..., Any]) -> APIRouter:
    """The metadata routes of the Web API at `api_root`, behind the same token check (`caller`) as
    every other request. Include it before the catch-all resource routes."""
    router = APIRouter()
    metadata = DataverseMetadata(tables)

    @router.get(api_root + "/$metadata")
    async def csdl(_: Any = Depends(caller)) -> Response:
        return Response(dataverse_csdl(tables), media_type=XML)

    @router.get(api_root + "/EntityDefinitions{rest:path}")
    async def entity_definitions(request: Request, _: Any = Depends(caller)) -> JSONResponse:
        root = str(request.base_url).rstrip("/") + api_root
        path = _raw_path(request).partition(api_root + "/EntityDefinitions")[2]
        try:
            body = metadata.entity_definitions(root, path, dict(request.query_params))
        except MetadataError as error:
            return JSONResponse({"error": {"code": error.code, "message": error.message}}, status_code=error.status)
        return JSONResponse(body)

    return router


def commerce_csdl_response(entity_types: Mapping[str, model.EntityType]) -> Response:
    return Response(commerce_csdl(entity_types), media_type=XML, headers={"OData-Version": "4.0"})


def create_admin_router(commerce_tables: model.CommerceModel, dataverse_state: Any) -> APIRouter:
    """`/_admin` routes that make the tenant differ from the default one (undone by
    `/_admin/reset`): `POST /model` (a column or key less, a key's index status, a string column's
    MaxLength, a choice's options) and
    `DELETE /dataverse/savedqueries/<name>` (a system view gone)."""
    router = APIRouter()

    @router.post("/model", status_code=204)
    async def change_model(request: Request) -> Response:
        try:
            body = json.loads(await request.body())
        except ValueError as error:
            return JSONResponse({"error": f"the body is not JSON: {error}"}, status_code=400)
        try:
            model.change_model(body, dataverse_state.model, commerce_tables)
        except ValueError as error:
            return JSONResponse({"error": str(error)}, status_code=400)
        return Response(status_code=204)

    @router.delete("/dataverse/savedqueries/{name:path}", status_code=204)
    async def remove_saved_view(name: str) -> Response:
        try:
            dataverse_state.remove_saved_view(name)
        except KeyError:
            return JSONResponse({"error": f"there is no saved view named {name!r}"}, status_code=404)
        return Response(status_code=204)

    return router
