"""OData system query options shared by the fake APIs.

`$filter` is read by a small tokenizer and a recursive-descent parser into a predicate over row
dicts; the input is never evaluated as Python. The two dialects differ where the real services do:

- Finance and Operations (Commerce headquarters): enum literals
  `Microsoft.Dynamics.DataEntities.<Enum>'<Member>'` (eq/ne only), `*` as a wildcard in string
  eq/ne ("contains" is written `Field eq '*text*'`), no functions.
- Dataverse: `contains`, `startswith`, `endswith`; no enum literals; no `$skip`.

Neither supports `in` or `has`. String comparisons are case-insensitive in both (SQL collation).
"""

from __future__ import annotations

import enum
import operator
import re
from collections.abc import Callable, Collection, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any, NamedTuple, TypeVar


class Dialect(enum.Enum):
    FINANCE_OPERATIONS = "finance_operations"
    DATAVERSE = "dataverse"


class ODataQueryError(ValueError):
    """A query the real service answers with 400: a syntax error or an unsupported construct."""


class UnknownProperty(ODataQueryError):
    """A query naming a property the entity type does not have (Dataverse answers it with its own
    code and the type's name)."""

    def __init__(self, name: str) -> None:
        super().__init__(f"Could not find a property named '{name}'.")
        self.name = name


Predicate = Callable[[Mapping[str, Any]], bool]
# Field -> casefolded string values: the rows whose value of one of the fields, casefolded, is one of
# its values.
Lookup = Mapping[str, frozenset[str]]
# The least and greatest casefolded string a field may hold (None: no bound), both included.
Bounds = tuple[str | None, str | None]


class _Filter(NamedTuple):
    """A parsed (part of a) `$filter`: its predicate, and what lets an index find its rows."""

    predicate: Predicate
    # Each lookup alone holds every row the predicate can accept (none: only a scan finds them).
    lookups: tuple[Lookup, ...]
    # The fields whose values must all be strings or null for the predicate never to raise on a
    # row; None when that depends on more (then a scan must meet the row that raises).
    strings: frozenset[str] | None
    # Field -> the range the casefolded string value of every row the predicate accepts lies in.
    bounds: Mapping[str, Bounds] = {}


def _joined(*parts: _Filter) -> frozenset[str] | None:
    if any(part.strings is None for part in parts):
        return None
    return frozenset().union(*(part.strings for part in parts))


def _narrowed(left: Mapping[str, Bounds], right: Mapping[str, Bounds]) -> dict[str, Bounds]:
    """The bounds of `left and right`: on each field, the tighter of each end."""
    bounds = dict(left)
    for name, (low, high) in right.items():
        if name in bounds:
            known_low, known_high = bounds[name]
            low = low if known_low is None else known_low if low is None else max(low, known_low)
            high = high if known_high is None else known_high if high is None else min(high, known_high)
        bounds[name] = (low, high)
    return bounds


def _widened(left: Mapping[str, Bounds], right: Mapping[str, Bounds]) -> dict[str, Bounds]:
    """The bounds of `left or right`: on the fields both bound, the looser of each end."""
    bounds = {}
    for name in left.keys() & right.keys():
        (low, high), (other_low, other_high) = left[name], right[name]
        bounds[name] = (None if low is None or other_low is None else min(low, other_low),
                        None if high is None or other_high is None else max(high, other_high))
    return bounds


def _united(left: tuple[Lookup, ...], right: tuple[Lookup, ...]) -> tuple[Lookup, ...]:
    """The lookups of `left or right`: one lookup holding the rows of one lookup of each."""
    if not left or not right:
        return ()
    united = dict(left[0])
    for name, values in right[0].items():
        united[name] = united[name] | values if name in united else values
    return (united,)


FNO_ENUM_NAMESPACE = "Microsoft.Dynamics.DataEntities"

_COMPARISONS = {
    "eq": operator.eq,
    "ne": operator.ne,
    "gt": operator.gt,
    "ge": operator.ge,
    "lt": operator.lt,
    "le": operator.le,
}
# `5 lt Field` means `Field gt 5`.
_MIRRORED = {"eq": "eq", "ne": "ne", "gt": "lt", "ge": "le", "lt": "gt", "le": "ge"}
_UNSUPPORTED_OPERATORS = {"in", "has", "add", "sub", "mul", "div", "divby", "mod"}
_DATAVERSE_FUNCTIONS = {
    "contains": lambda value, text: text in value,
    "startswith": lambda value, text: value.startswith(text),
    "endswith": lambda value, text: value.endswith(text),
}

# Order matters: at each position the first alternative that matches wins, so the literal shapes
# that look like a name or a number (GUIDs, datetimes, qualified enum literals) come first.
_LITERAL_END = r"(?![\w.'-])"
_TOKEN = re.compile(
    r"""
    (?P<space>\s+)
    | (?P<paren_open>\()
    | (?P<paren_close>\))
    | (?P<comma>,)
    | (?P<string>'(?:[^']|'')*')
    | (?P<enum>[A-Za-z_][\w.]*'(?:[^']|'')*')
    | (?P<datetime>\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:Z|[+-]\d{2}:\d{2}))"""
    + _LITERAL_END
    + r"""
    | (?P<guid>[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12})"""
    + _LITERAL_END
    + r"""
    | (?P<number>-?\d+(?:\.\d+)?)"""
    + _LITERAL_END
    + r"""
    | (?P<name>[A-Za-z_][\w.]*(?:/[A-Za-z_][\w.]*)*)
    """,
    re.VERBOSE,
)


@dataclass(frozen=True)
class _Token:
    kind: str  # a group name of _TOKEN, or "end"
    text: str
    position: int


@dataclass(frozen=True)
class _Literal:
    kind: str  # "string", "number", "boolean", "null", "datetime", "guid" or "enum"
    value: Any
    text: str
    enum_name: str | None = None


def unquote_string_literal(text: str) -> str:
    """`'O''Brien'` -> `O'Brien` (the caller has checked the quotes)."""
    return text[1:-1].replace("''", "'")


def _tokenize(text: str) -> list[_Token]:
    tokens = []
    position = 0
    while position < len(text):
        match = _TOKEN.match(text, position)
        if match is None:
            if text[position] == "'":
                raise ODataQueryError(f"There is an unterminated string literal at position {position} in '{text}'.")
            raise ODataQueryError(f"Syntax error: character '{text[position]}' is not valid at position {position} in '{text}'.")
        if match.lastgroup != "space":
            tokens.append(_Token(match.lastgroup, match.group(), position))
        position = match.end()
    tokens.append(_Token("end", "", len(text)))
    return tokens


def _parse_datetime(text: str) -> datetime:
    moment = datetime.fromisoformat(text)
    # Rows may hold naive timestamps; the services store UTC.
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


class _FilterParser:
    """filter := or; or := and ('or' and)*; and := unary ('and' unary)*;
    unary := 'not' unary | '(' or ')' | function | operand comparison operand."""

    def __init__(self, text: str, dialect: Dialect, fields: Collection[str] | None, enum_map: Mapping[str, str]):
        self.text = text
        self.dialect = dialect
        self.fields = fields
        self.enum_map = enum_map
        self.tokens = _tokenize(text)
        self.index = 0

    def parse(self) -> _Filter:
        parsed = self._or()
        if self._peek().kind != "end":
            raise self._syntax_error(self._peek())
        return parsed

    def _peek(self, ahead: int = 0) -> _Token:
        return self.tokens[min(self.index + ahead, len(self.tokens) - 1)]

    def _advance(self) -> _Token:
        token = self._peek()
        self.index += 1
        return token

    def _at_keyword(self, word: str) -> bool:
        token = self._peek()
        return token.kind == "name" and token.text == word

    def _expect(self, kind: str) -> _Token:
        token = self._advance()
        if token.kind != kind:
            raise self._syntax_error(token)
        return token

    def _syntax_error(self, token: _Token) -> ODataQueryError:
        found = f"'{token.text}'" if token.kind != "end" else "end of expression"
        return ODataQueryError(f"Syntax error at position {token.position} in '{self.text}': unexpected {found}.")

    def _or(self) -> _Filter:
        parsed = self._and()
        while self._at_keyword("or"):
            self._advance()
            right = self._and()
            parsed = _Filter(_either(parsed.predicate, right.predicate), _united(parsed.lookups, right.lookups),
                             _joined(parsed, right), _widened(parsed.bounds, right.bounds))
        return parsed

    def _and(self) -> _Filter:
        parsed = self._unary()
        while self._at_keyword("and"):
            self._advance()
            right = self._unary()
            # A row both accept is in any lookup of either.
            parsed = _Filter(_both(parsed.predicate, right.predicate), parsed.lookups + right.lookups,
                             _joined(parsed, right), _narrowed(parsed.bounds, right.bounds))
        return parsed

    def _unary(self) -> _Filter:
        token = self._peek()
        if self._at_keyword("not"):
            self._advance()
            inner = self._unary()
            return _Filter(_negation(inner.predicate), (), inner.strings)
        if token.kind == "paren_open":
            self._advance()
            parsed = self._or()
            self._expect("paren_close")
            return parsed
        if token.kind == "name" and self._peek(1).kind == "paren_open":
            return self._function()
        return self._comparison()

    def _function(self) -> _Filter:
        name = self._advance().text
        if self.dialect is not Dialect.DATAVERSE or name not in _DATAVERSE_FUNCTIONS:
            raise self._unsupported_function(name)
        self._expect("paren_open")
        path = self._property(self._expect("name"))
        self._expect("comma")
        argument = self._operand()
        self._expect("paren_close")
        if not isinstance(argument, _Literal) or argument.kind != "string":
            raise ODataQueryError(f"The second argument of '{name}' must be a string literal.")
        return _Filter(_string_function(path, _DATAVERSE_FUNCTIONS[name], argument.value.casefold()), (), frozenset())

    def _unsupported_function(self, name: str) -> ODataQueryError:
        if self.dialect is Dialect.FINANCE_OPERATIONS:
            return ODataQueryError(
                f"The function '{name}' is not supported. To search within a string, write Field eq '*text*'."
            )
        return ODataQueryError(f"The function '{name}' is not supported.")

    def _comparison(self) -> _Filter:
        left = self._operand()
        operator_token = self._advance()
        if operator_token.kind == "name" and operator_token.text in _UNSUPPORTED_OPERATORS:
            raise ODataQueryError(f"The operator '{operator_token.text}' is not supported.")
        if operator_token.kind != "name" or operator_token.text not in _COMPARISONS:
            raise self._syntax_error(operator_token)
        right = self._operand()
        name = operator_token.text
        if isinstance(left, str) and isinstance(right, _Literal):
            return self._property_comparison(left, name, right)
        if isinstance(left, _Literal) and isinstance(right, str):
            return self._property_comparison(right, _MIRRORED[name], left)
        raise ODataQueryError(
            f"The comparison at position {operator_token.position} in '{self.text}' must compare a property with a literal."
        )

    def _operand(self) -> str | _Literal:
        """A property path (str) or a literal."""
        token = self._advance()
        if token.kind == "string":
            return _Literal("string", unquote_string_literal(token.text), token.text)
        if token.kind == "number":
            value = Decimal(token.text) if "." in token.text else int(token.text)
            return _Literal("number", value, token.text)
        if token.kind == "datetime":
            return _Literal("datetime", _parse_datetime(token.text), token.text)
        if token.kind == "guid":
            return _Literal("guid", token.text.casefold(), token.text)
        if token.kind == "enum":
            return self._enum_literal(token)
        if token.kind == "name":
            if token.text in ("true", "false"):
                return _Literal("boolean", token.text == "true", token.text)
            if token.text == "null":
                return _Literal("null", None, token.text)
            if self._peek().kind == "paren_open":
                raise self._unsupported_function(token.text)
            return self._property(token)
        raise self._syntax_error(token)

    def _enum_literal(self, token: _Token) -> _Literal:
        if self.dialect is not Dialect.FINANCE_OPERATIONS:
            raise ODataQueryError(f"The literal {token.text} is not supported.")
        qualified_name, _, quoted_member = token.text.partition("'")
        namespace, _, enum_name = qualified_name.rpartition(".")
        if namespace != FNO_ENUM_NAMESPACE:
            raise ODataQueryError(
                f"The literal {token.text} is not supported; enum values are written {FNO_ENUM_NAMESPACE}.<EnumName>'<Member>'."
            )
        return _Literal("enum", unquote_string_literal("'" + quoted_member), token.text, enum_name)

    def _property(self, token: _Token) -> str:
        field = token.text.split("/")[0]
        if self.fields is not None and field not in self.fields:
            raise UnknownProperty(field)
        return token.text

    def _property_comparison(self, path: str, name: str, literal: _Literal) -> _Filter:
        enum_name = self.enum_map.get(path)
        if literal.kind == "enum":
            if name not in ("eq", "ne"):
                raise ODataQueryError(f"Enum values can only be compared with eq or ne, not '{name}': {literal.text}.")
            if enum_name is None:
                raise ODataQueryError(f"The property '{path}' is not an enum and cannot be compared with {literal.text}.")
            if literal.enum_name != enum_name:
                raise ODataQueryError(
                    f"The property '{path}' is of type {FNO_ENUM_NAMESPACE}.{enum_name}, not {FNO_ENUM_NAMESPACE}.{literal.enum_name}."
                )
            return _Filter(_comparison(path, name, literal.value, lambda value: value), (), frozenset())
        if enum_name is not None and literal.kind != "null":
            raise ODataQueryError(
                f"The property '{path}' is an enum; compare it with {FNO_ENUM_NAMESPACE}.{enum_name}'<Member>'."
            )
        if literal.kind == "null":
            if name not in ("eq", "ne"):
                raise ODataQueryError(f"null can only be compared with eq or ne, not '{name}'.")
            return _Filter(_null_comparison(path, name == "eq"), (), frozenset())
        # A string comparison raises on a value that is not a string (an index knows whether a field has one).
        strings = frozenset({path}) if literal.kind in ("string", "guid") and "/" not in path else None
        if literal.kind == "string" and self.dialect is Dialect.FINANCE_OPERATIONS and name in ("eq", "ne") and "*" in literal.value:
            return _Filter(_wildcard_comparison(path, name == "eq", literal.value), (), strings)
        target = _comparable(literal, literal.value, path)
        predicate = _comparison(path, name, target, lambda value: _comparable(literal, value, path))
        if not strings:
            return _Filter(predicate, (), strings)
        # Bounds of the casefolded value (gt and lt bound it too, if not tightly).
        low = target if name in ("eq", "ge", "gt") else None
        high = target if name in ("eq", "le", "lt") else None
        bounds = {path: (low, high)} if name != "ne" else {}
        return _Filter(predicate, ({path: frozenset({target})},) if name == "eq" else (), strings, bounds)


def _comparable(literal: _Literal, value: Any, path: str) -> Any:
    """`value` converted to the literal's type so the two can be compared; 400 if they cannot."""
    if literal.kind in ("string", "guid") and isinstance(value, str):
        return value.casefold()
    if literal.kind == "boolean" and isinstance(value, bool):
        return value
    if literal.kind == "number" and isinstance(value, (int, float, Decimal)) and not isinstance(value, bool):
        return value
    if literal.kind == "datetime":
        if isinstance(value, datetime):
            return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
        if isinstance(value, str):
            try:
                return _parse_datetime(value)
            except ValueError:
                pass
    raise ODataQueryError(f"The property '{path}' cannot be compared with the {literal.kind} literal {literal.text}.")


def _value_at(row: Mapping[str, Any], path: str) -> Any:
    if "/" not in path:
        return row.get(path)
    value: Any = row
    for segment in path.split("/"):
        if not isinstance(value, Mapping):
            return None
        value = value.get(segment)
    return value


def _comparison(path: str, name: str, target: Any, convert: Callable[[Any], Any]) -> Predicate:
    compare = _COMPARISONS[name]

    def predicate(row: Mapping[str, Any]) -> bool:
        value = _value_at(row, path)
        if value is None:
            # SQL semantics as OData defines them: null is unequal to every value and unordered.
            return name == "ne"
        return compare(convert(value), target)

    return predicate


def _null_comparison(path: str, equal: bool) -> Predicate:
    return lambda row: (_value_at(row, path) is None) == equal


def _wildcard_comparison(path: str, equal: bool, pattern: str) -> Predicate:
    regex = re.compile(".*".join(re.escape(part.casefold()) for part in pattern.split("*")), re.DOTALL)

    def predicate(row: Mapping[str, Any]) -> bool:
        value = _value_at(row, path)
        if value is None:
            return not equal
        if not isinstance(value, str):
            raise ODataQueryError(f"The property '{path}' is not a string and cannot be compared with '{pattern}'.")
        return (regex.fullmatch(value.casefold()) is not None) == equal

    return predicate


def _string_function(path: str, test: Callable[[str, str], bool], text: str) -> Predicate:
    def predicate(row: Mapping[str, Any]) -> bool:
        value = _value_at(row, path)
        return isinstance(value, str) and test(value.casefold(), text)

    return predicate


def _either(left: Predicate, right: Predicate) -> Predicate:
    return lambda row: left(row) or right(row)


def _both(left: Predicate, right: Predicate) -> Predicate:
    return lambda row: left(row) and right(row)


def _negation(inner: Predicate) -> Predicate:
    return lambda row: not inner(row)


def parse_filter(
    text: str,
    dialect: Dialect,
    *,
    fields: Collection[str] | None = None,
    enum_map: Mapping[str, str] | None = None,
) -> Predicate:
    """A predicate for an OData `$filter` expression, or `ODataQueryError`.

    `fields` are the entity's property names (None: any name is accepted); `enum_map` maps an enum
    property to its enum type name, e.g. {"B2BProspectStatus": "RetailB2BProspectStatus"}.
    """
    return _FilterParser(text, dialect, fields, enum_map or {}).parse().predicate


class ValueIndex:
    """A table's rows by one field's value, as string comparisons see it (casefolded), kept by the
    table as rows come, change and go; rows are named by any hashable key. It also counts the rows
    whose value is neither a string nor null, on which a string comparison raises."""

    def __init__(self) -> None:
        # value -> a key, or the set of keys when more rows share it (most values name one row)
        self._keys: dict[str, Hashable] = {}
        self.non_strings = 0

    @classmethod
    def of(cls, rows: Mapping[Hashable, Mapping[str, Any]], field: str) -> ValueIndex:
        """The index of `field` over `rows` (key -> row), built when a filter first needs it."""
        index = cls()
        for key, row in rows.items():
            index.add(row.get(field), key)
        return index

    def add(self, value: Any, key: Hashable) -> None:
        if value is None:
            return
        if type(value) is not str:
            self.non_strings += 1
            return
        folded = value.casefold()
        held = self._keys.setdefault(folded, key)
        if held == key:
            return
        if type(held) is set:
            held.add(key)
        else:
            self._keys[folded] = {held, key}

    def remove(self, value: Any, key: Hashable) -> None:
        if value is None:
            return
        if type(value) is not str:
            self.non_strings -= 1
            return
        folded = value.casefold()
        held = self._keys[folded]
        if type(held) is not set:
            del self._keys[folded]
            return
        held.discard(key)
        if len(held) == 1:
            self._keys[folded] = next(iter(held))

    def keys(self, folded: str) -> Iterable[Hashable]:
        held = self._keys.get(folded)
        if held is None:
            return ()
        return held if type(held) is set else (held,)

    def count(self, folded: str) -> int:
        held = self._keys.get(folded)
        return 0 if held is None else len(held) if type(held) is set else 1


class IndexPlan(NamedTuple):
    """What a `$filter` tells a table's indexes about the rows it can accept (it still has to run
    on the rows they name): run on those rows alone, in table order, it answers as a scan."""

    lookups: tuple[Lookup, ...]  # each holds every row the filter can accept
    bounds: Mapping[str, Bounds]  # each row the filter can accept has its string values in these

    def narrowest(self, index: Callable[[str], ValueIndex], limit: int) -> set[Hashable] | None:
        """The keys of the rows of the lookup that names the fewest, through the value indexes
        (`index(field)`); None without a lookup or when even the narrowest names more than
        `limit` rows (see `lookup_limit`)."""
        if not self.lookups:
            return None

        def size(lookup: Lookup) -> int:
            return sum(index(name).count(value) for name, values in lookup.items() for value in values)

        narrowest = min(self.lookups, key=size)
        if size(narrowest) > limit:
            return None
        return {key for name, values in narrowest.items() for value in values for key in index(name).keys(value)}


def lookup_limit(table_rows: int) -> int:
    """The most rows a lookup may name and still beat a scan of a table of `table_rows`: a quarter
    of it (putting what it names back in table order costs too); any lookup in a small table."""
    return max(table_rows // 4, 1000)


def index_plan(
    text: str,
    dialect: Dialect,
    index: Callable[[str], ValueIndex],
    *,
    fields: Collection[str] | None = None,
    enum_map: Mapping[str, str] | None = None,
) -> IndexPlan | None:
    """What the `$filter` `text` tells an index, or None when only a scan can answer it: the filter
    might raise on a row (a string comparison on a field that holds a value of another type, as
    the value indexes `index(field)` know, or a comparison of other types), or is not valid (the
    scan reports it)."""
    try:
        parsed = _FilterParser(text, dialect, fields, enum_map or {}).parse()
    except ODataQueryError:
        return None
    if parsed.strings is None or any(index(name).non_strings for name in parsed.strings):
        return None
    return IndexPlan(parsed.lookups, parsed.bounds)


@dataclass(frozen=True)
class QueryResult:
    rows: list[dict]  # filtered, ordered, $skip and $top applied, projected by $select
    count: int | None  # with $count=true: rows matching $filter, before $skip and $top
    selected: tuple[str, ...] | None  # the $select list (for @odata.context), None without one
    skip: int
    top: int | None


_SUPPORTED_OPTIONS = {"$filter", "$orderby", "$select", "$top", "$skip", "$count"}


def apply_query(
    rows: Sequence[dict],
    params: Mapping[str, str],
    dialect: Dialect,
    fields: Collection[str],
    enum_map: Mapping[str, str] | None = None,
    *,
    always_selected: Collection[str] = (),
) -> QueryResult:
    """Apply the `$` options in `params` to `rows`; options without `$` are the caller's business.

    Rows keep their given order unless `$orderby` says otherwise (the sort is stable), so callers
    pass rows in key order. `always_selected` fields survive `$select` (Dataverse's primary id);
    annotations (`@odata.etag`) always do.
    """
    options = {name: value for name, value in params.items() if name.startswith("$")}
    if dialect is Dialect.DATAVERSE and "$skip" in options:
        raise ODataQueryError("The query parameter $skip is not supported")
    for name in sorted(options):
        if name not in _SUPPORTED_OPTIONS:
            raise ODataQueryError(f"The query parameter {name} is not supported.")

    matching = list(rows)
    if "$filter" in options:
        predicate = parse_filter(options["$filter"], dialect, fields=fields, enum_map=enum_map)
        matching = [row for row in matching if predicate(row)]
    if "$orderby" in options:
        _order(matching, options["$orderby"], fields)
    count = len(matching) if _count_requested(options.get("$count")) else None
    skip = _non_negative_int(options, "$skip") or 0
    top = _non_negative_int(options, "$top")
    matching = matching[skip:] if top is None else matching[skip : skip + top]
    selected = _selection(options["$select"], fields) if "$select" in options else None
    if selected is not None:
        keep = set(selected) | set(always_selected)
        matching = [{name: value for name, value in row.items() if name in keep or name.startswith("@")} for row in matching]
    return QueryResult(matching, count, selected, skip, top)


T = TypeVar("T")


def page_of(rows: Sequence[T], page_size: int, position: int = 0) -> tuple[list[T], int | None]:
    """The page of `rows` starting at `position`, and where the next page starts (None: last page)."""
    end = position + page_size
    return list(rows[position:end]), (end if end < len(rows) else None)


def _order(rows: list[dict], orderby: str, fields: Collection[str]) -> None:
    clauses = []
    for clause in orderby.split(","):
        words = clause.split()
        if len(words) not in (1, 2) or (len(words) == 2 and words[1] not in ("asc", "desc")):
            raise ODataQueryError(f"The $orderby clause '{clause.strip()}' is not valid.")
        if words[0] not in fields:
            raise UnknownProperty(words[0])
        clauses.append((words[0], len(words) == 2 and words[1] == "desc"))
    # Stable sorts, least significant clause first; nulls sort first ascending, as in SQL Server.
    for field, descending in reversed(clauses):
        rows.sort(key=lambda row: _sort_key(row.get(field)), reverse=descending)


def _sort_key(value: Any) -> tuple[bool, Any]:
    return (value is not None, value.casefold() if isinstance(value, str) else value)


def _count_requested(value: str | None) -> bool:
    if value not in (None, "true", "false"):
        raise ODataQueryError(f"'{value}' is not a valid count option; use true or false.")
    return value == "true"


def _non_negative_int(options: Mapping[str, str], name: str) -> int | None:
    value = options.get(name)
    if value is None:
        return None
    if not value.isascii() or not value.isdigit():
        raise ODataQueryError(
            f"Invalid value '{value}' for {name} query option found. The {name} query option requires a non-negative integer value."
        )
    return int(value)


def _selection(select: str, fields: Collection[str]) -> tuple[str, ...] | None:
    names = tuple(name.strip() for name in select.split(","))
    if "*" in names:
        return None
    for name in names:
        if name not in fields:
            raise UnknownProperty(name)
    return names
