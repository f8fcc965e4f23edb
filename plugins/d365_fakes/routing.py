"""Routing shared by the OData fakes: an entity path may hold any character, newlines included."""

from __future__ import annotations

from starlette.convertors import Convertor, register_url_convertor

RESOURCE_CONVERTOR = "odata_resource"


class _ResourcePathConvertor(Convertor[str]):
    """Like Starlette's `path` (`.*`), but across newlines too: key values may contain them."""

    regex = r"[\s\S]+"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor(RESOURCE_CONVERTOR, _ResourcePathConvertor())
