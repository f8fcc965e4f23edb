import pytest

from d365_fakes.odata_query import Dialect, ODataQueryError, apply_query, page_of, parse_filter

FNO = Dialect.FINANCE_OPERATIONS
DATAVERSE = Dialect.DATAVERSE
ENUMS = {"B2BProspectStatus": "RetailB2BProspectStatus", "IsB2BProspect": "NoYes"}
PROSPECT_FIELDS = {"ProspectId", "ProspectName", "B2BProspectStatus", "IsB2BProspect", "Score", "CreatedOn", "Note"}
PROSPECTS = [
    {"ProspectId": "P-1", "ProspectName": "Ann O'Brien", "B2BProspectStatus": "Pending", "IsB2BProspect": "Yes",
     "Score": 3, "CreatedOn": "2026-01-05T10:00:00Z", "Note": None},
    {"ProspectId": "P-2", "ProspectName": "Bob Smith", "B2BProspectStatus": "Approved", "IsB2BProspect": "Yes",
     "Score": 7, "CreatedOn": "2025-12-31T23:59:59Z", "Note": "call back"},
    {"ProspectId": "P-3", "ProspectName": "carol smithers", "B2BProspectStatus": "Pending", "IsB2BProspect": "No",
     "Score": 5, "CreatedOn": "2026-02-01T00:00:00Z", "Note": "50% off*"},
]
LEAD_FIELDS = {"leadid", "fullname", "msdyn_b2bcommerceprospect", "_parentaccountid_value"}
LEADS = [
    {"leadid": "1", "fullname": "Ann O'Brien", "msdyn_b2bcommerceprospect": True,
     "_parentaccountid_value": "0f8fad5b-d9cb-469f-a165-70867728950e"},
    {"leadid": "2", "fullname": "Bob Smith", "msdyn_b2bcommerceprospect": False, "_parentaccountid_value": None},
]


def fno_ids(expression):
    predicate = parse_filter(expression, FNO, fields=PROSPECT_FIELDS, enum_map=ENUMS)
    return [row["ProspectId"] for row in PROSPECTS if predicate(row)]


def dataverse_ids(expression):
    predicate = parse_filter(expression, DATAVERSE, fields=LEAD_FIELDS)
    return [row["leadid"] for row in LEADS if predicate(row)]


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("ProspectId eq 'P-2'", ["P-2"]),
        ("ProspectId eq 'p-2'", ["P-2"]),  # SQL collation: case-insensitive
        ("ProspectId ne 'P-2'", ["P-1", "P-3"]),
        ("ProspectName eq 'Ann O''Brien'", ["P-1"]),
        ("Score gt 3 and Score le 7", ["P-2", "P-3"]),
        ("5 lt Score", ["P-2"]),
        ("Score ge 4.5", ["P-2", "P-3"]),
        ("Score eq 3 or ProspectId eq 'P-3'", ["P-1", "P-3"]),
        ("not (Score eq 3 or ProspectId eq 'P-3')", ["P-2"]),
        ("Score eq 3 or Score eq 5 and ProspectId eq 'P-2'", ["P-1"]),  # and binds tighter than or
        ("CreatedOn ge 2026-01-01T00:00:00Z", ["P-1", "P-3"]),
        ("CreatedOn lt 2026-01-01T01:00:00+01:00", ["P-2"]),
        ("Note eq null", ["P-1"]),
        ("Note ne null", ["P-2", "P-3"]),
        ("Note ne 'call back'", ["P-1", "P-3"]),  # null is unequal to every value
        ("Note gt 'a'", ["P-2"]),  # ...and unordered
        ("B2BProspectStatus eq Microsoft.Dynamics.DataEntities.RetailB2BProspectStatus'Pending'", ["P-1", "P-3"]),
        ("IsB2BProspect ne Microsoft.Dynamics.DataEntities.NoYes'Yes'", ["P-3"]),
        ("ProspectName eq '*smith*'", ["P-2", "P-3"]),
        ("ProspectName eq 'bob*'", ["P-2"]),
        ("ProspectName ne '*smith*'", ["P-1"]),
        ("Note eq '*0% off[*]'", []),  # only * is special; [ ] are literal characters
        ("Note eq '50% off*'", ["P-3"]),
        ("ProspectName eq ''' or 1 eq 1'", []),  # a hostile value stays one string literal
        ("ProspectName eq 'x'' or ProspectId ne ''none'", []),
    ],
)
def test_finance_operations_filter(expression, expected):
    assert fno_ids(expression) == expected


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("ProspectId in ('P-1','P-2')", "operator 'in' is not supported"),
        ("IsB2BProspect has Microsoft.Dynamics.DataEntities.NoYes'Yes'", "operator 'has' is not supported"),
        ("contains(ProspectName,'smith')", "function 'contains' is not supported"),
        ("startswith(ProspectName,'b')", "function 'startswith' is not supported"),
        ("B2BProspectStatus gt Microsoft.Dynamics.DataEntities.RetailB2BProspectStatus'Pending'", "only be compared with eq or ne"),
        ("B2BProspectStatus eq Microsoft.Dynamics.DataEntities.NoYes'Yes'", "RetailB2BProspectStatus, not"),
        ("B2BProspectStatus eq 'Pending'", "is an enum"),
        ("ProspectName eq Microsoft.Dynamics.DataEntities.NoYes'Yes'", "not an enum"),
        ("IsB2BProspect eq Other.Namespace.NoYes'Yes'", "is not supported"),
        ("Nope eq 1", "property named 'Nope'"),
        ("ProspectName eq 'unterminated", "unterminated string literal"),
        ("ProspectName eq '' or 1 eq 1'", "not valid at position"),  # an unescaped quote cannot widen the query
        ("1 eq 1", "must compare a property with a literal"),
        ("ProspectId eq ProspectName", "must compare a property with a literal"),
        ("Score gt null", "null can only be compared"),
        ("Score add 1 eq 2", "operator 'add' is not supported"),
        ("ProspectId eq 'P-1' and", "end of expression"),
        ("(ProspectId eq 'P-1'", "end of expression"),
        ("ProspectId eq 'P-1')", "unexpected ')'"),
        ("ProspectId == 'P-1'", "not valid"),
        ("ProspectId eq __import__('os')", "function '__import__' is not supported"),
        ("", "end of expression"),
    ],
)
def test_finance_operations_filter_errors(expression, message):
    with pytest.raises(ODataQueryError) as raised:
        fno_ids(expression)
    assert message in str(raised.value)


def test_incompatible_literal_type_is_rejected():
    with pytest.raises(ODataQueryError, match="cannot be compared"):
        fno_ids("Score eq 'three'")


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("contains(fullname,'SMITH')", ["2"]),
        ("startswith(fullname,'ann')", ["1"]),
        ("endswith(fullname,'brien')", ["1"]),
        ("not contains(fullname,'o''b')", ["2"]),
        ("msdyn_b2bcommerceprospect eq true", ["1"]),
        ("_parentaccountid_value eq 0F8FAD5B-D9CB-469F-A165-70867728950E", ["1"]),
        ("_parentaccountid_value eq null", ["2"]),
        ("fullname eq '*smith*'", []),  # no wildcard in Dataverse: * is a literal character
    ],
)
def test_dataverse_filter(expression, expected):
    assert dataverse_ids(expression) == expected


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("fullname in ('a','b')", "operator 'in' is not supported"),
        ("msdyn_b2bcommerceprospect eq Microsoft.Dynamics.DataEntities.NoYes'Yes'", "is not supported"),
        ("substringof('a',fullname)", "function 'substringof' is not supported"),
        ("contains(fullname,1)", "must be a string literal"),
        ("parentaccountid eq null", "property named 'parentaccountid'"),
    ],
)
def test_dataverse_filter_errors(expression, message):
    with pytest.raises(ODataQueryError) as raised:
        dataverse_ids(expression)
    assert message in str(raised.value)


def query(params, dialect=FNO, **options):
    return apply_query(PROSPECTS, params, dialect, PROSPECT_FIELDS, ENUMS, **options)


def test_apply_query_filter_orderby_select():
    result = query({"$filter": "Score gt 3", "$orderby": "Score desc", "$select": "ProspectId,Score"})
    assert result.rows == [{"ProspectId": "P-2", "Score": 7}, {"ProspectId": "P-3", "Score": 5}]
    assert result.selected == ("ProspectId", "Score")
    assert result.count is None


def test_orderby_is_stable_and_multi_key():
    result = query({"$orderby": "IsB2BProspect desc, ProspectName", "$select": "ProspectId"})
    assert [row["ProspectId"] for row in result.rows] == ["P-1", "P-2", "P-3"]
    result = query({"$orderby": "B2BProspectStatus desc", "$select": "ProspectId"})
    assert [row["ProspectId"] for row in result.rows] == ["P-1", "P-3", "P-2"]


def test_orderby_puts_nulls_first_ascending():
    result = query({"$orderby": "Note asc"})
    assert [row["ProspectId"] for row in result.rows] == ["P-1", "P-3", "P-2"]


def test_count_skip_top():
    result = query({"$count": "true", "$skip": "1", "$top": "1"})
    assert result.count == 3
    assert [row["ProspectId"] for row in result.rows] == ["P-2"]
    assert (result.skip, result.top) == (1, 1)


def test_select_keeps_annotations_and_always_selected_fields():
    rows = [{"@odata.etag": 'W/"1"', "leadid": "1", "fullname": "Ann"}]
    result = apply_query(rows, {"$select": "fullname"}, DATAVERSE, LEAD_FIELDS, always_selected={"leadid"})
    assert result.rows == [{"@odata.etag": 'W/"1"', "leadid": "1", "fullname": "Ann"}]


def test_options_without_dollar_are_left_to_the_caller():
    assert len(query({"cross-company": "true"}).rows) == 3


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"$expand": "Lines"}, "The query parameter $expand is not supported"),
        ({"$select": "ProspectId,Nope"}, "property named 'Nope'"),
        ({"$orderby": "Nope desc"}, "property named 'Nope'"),
        ({"$orderby": "Score sideways"}, "not valid"),
        ({"$top": "-1"}, "requires a non-negative integer"),
        ({"$skip": "x"}, "requires a non-negative integer"),
        ({"$count": "yes"}, "not a valid count option"),
        ({"$filter": "Score in (1)"}, "operator 'in' is not supported"),
    ],
)
def test_apply_query_errors(params, message):
    with pytest.raises(ODataQueryError) as raised:
        query(params)
    assert message in str(raised.value)


def test_dataverse_rejects_skip():
    with pytest.raises(ODataQueryError, match=r"The query parameter \$skip is not supported"):
        apply_query(LEADS, {"$skip": "1"}, DATAVERSE, LEAD_FIELDS)


def test_page_of():
    rows = list(range(7))
    assert page_of(rows, 3) == ([0, 1, 2], 3)
    assert page_of(rows, 3, 3) == ([3, 4, 5], 6)
    assert page_of(rows, 3, 6) == ([6], None)
    assert page_of(rows[:6], 3, 3) == ([3, 4, 5], None)
    assert page_of([], 3) == ([], None)
