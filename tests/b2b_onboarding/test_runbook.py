"""The README's Runbook covers every failure the product can raise: every error class, every
builtin exception it raises, every anomaly kind, every drift finding, and each next step a failed
call can name, word for word."""

from __future__ import annotations

import builtins as builtins_module
import re
from pathlib import Path

import pytest

from b2b_onboarding.errors import D365Error

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = sorted((ROOT / "src" / "b2b_onboarding").rglob("*.py"))
CODE = {str(path.relative_to(ROOT)): path.read_text() for path in PRODUCT}
# Placeholders in f-string anomaly kinds, and what they stand for.
EXPANSIONS = {"{what}": ("lead", "opportunity"), "{missing}": ("account", "contact")}
ANOMALY_KINDS = {
    "decided_in_commerce", "prospect_deleted", "lead_deleted", "opportunity_deleted", "account_deleted",
    "contact_deleted", "lead_reopened", "opportunity_reopened", "lead_changed_after_decision",
    "opportunity_changed_after_decision",
}  # fmt: skip
# Kinds of the sellers' and the cut-over's cases: each named in the code as a literal.
CASE_KINDS = {
    "duplicate_leads", "lead_edited_in_sales", "qualified_without_opportunity", "account_number_not_organization",
    "account_of_other_legal_entity", "account_number_unknown", "organization_ambiguous", "person_of_other_organization",
    "customer_account_too_long",
}  # fmt: skip
# Counters named after an entity set ("leads_deleted": how many), not anomaly kinds.
COUNTER_SUBJECTS = {"leads", "opportunities"}


@pytest.fixture(scope="module")
def runbook() -> str:
    readme = (ROOT / "README.md").read_text()
    found = re.search(r"^## Runbook\n(.*?)(?=^## )", readme, re.S | re.M)
    assert found, "README.md has no '## Runbook' section"
    return found[1]


def test_every_error_class_of_the_product_is_in_the_runbook(runbook):
    classes = {name for text in CODE.values()
               for name in re.findall(r"^class (\w+)\((?:\w*Exception|\w*Error|SystemExit|FailedCheck)\):", text, re.M)
               if not name.startswith("_")}  # fmt: skip
    assert {"D365Error", "AuthenticationError", "ConfigurationError", "DecisionConflict", "SlaBreached", "RunFailed",
            "FailedCheck"} <= classes  # fmt: skip
    assert sorted(name for name in classes if not re.search(rf"\b{name}\b", runbook)) == []


def test_every_builtin_exception_the_product_raises_is_in_the_runbook(runbook):
    raised = {name for text in CODE.values() for name in re.findall(r"raise (\w+(?:Error|Exception))\(", text)}
    builtins = {name for name in raised if hasattr(builtins_module, name)}
    assert {"ValueError", "KeyError", "TypeError", "RuntimeError"} <= builtins
    assert sorted(name for name in builtins if not re.search(rf"\b{name}\b", runbook)) == []


def test_every_anomaly_kind_the_code_records_is_in_the_runbook(runbook):
    literals = {kind for text in CODE.values() for kind in re.findall(
        r"""f?["'](\{what\}|\{missing\}|[a-z]+)_(deleted|reopened|changed_after_decision|in_commerce)["']""", text)}  # fmt: skip
    kinds = set()
    for subject, event in literals:
        for expanded in EXPANSIONS.get(subject, (subject,)):
            if expanded not in COUNTER_SUBJECTS:
                kinds.add(f"{expanded}_{event}")
    assert kinds == ANOMALY_KINDS
    code = "\n".join(CODE.values())
    assert sorted(kind for kind in CASE_KINDS if f'"{kind}"' not in code) == []
    assert sorted(kind for kind in ANOMALY_KINDS | CASE_KINDS if f"`{kind}`" not in runbook) == []


def test_every_drift_finding_is_in_the_runbook(runbook):
    kinds = set(re.findall(r'"kind": "([a-z ]+)"', CODE["src/b2b_onboarding/flow/drift.py"]))
    assert kinds == {"missing lead", "lead without prospect", "state disagreement"}
    assert sorted(kind for kind in kinds if f"`{kind}`" not in runbook) == []


@pytest.mark.parametrize("status", [0, 400, 401, 403, 404, 409, 412, 429, 500, 502, 503, 418])
def test_the_next_step_of_every_failed_call_is_in_the_runbook_word_for_word(runbook, status):
    for attempts in (1, 6):
        step = D365Error(system="Dataverse (Sales)", operation="x", status=status, attempts=attempts).next_step
        assert f"`{step}`" in runbook, step


def test_the_one_line_of_a_failed_task_and_the_alert_connection_are_documented(runbook):
    assert "`TASK FAILED <dag_id>.<task_id>[<chunk>] run <run_id> try <n>, no retries left: <ErrorType>: " in runbook
    for part in ("`b2b_alerts`", "conn_type `smtp`", "conn_type `http` or `https`", "SmtpNotifier", "b2b_task_failures"):
        assert part in runbook, part


def test_a_duplicate_key_never_says_rerun_and_its_step_is_in_the_runbook(runbook):
    step = D365Error(system="Dataverse (Sales)", operation="create lead", status=412, code="0x80040237").next_step
    assert "rerun" not in step.lower() and "case-insensitively" in step
    assert step in runbook
