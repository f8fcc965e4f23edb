"""Split-and-isolate: one bad row never sinks its batch, and systemic failures still fail the task."""

from __future__ import annotations

import pytest

from b2b_onboarding.errors import D365Error
from b2b_onboarding.flow import bulk


def refusing(bad: set[int], status: int = 400):
    """A `send` that is all-or-nothing like UpsertMultiple: any bad item refuses the whole batch."""
    sent: list[list[int]] = []

    def send(items):
        sent.append(list(items))
        if bad & set(items):
            raise D365Error(system="Dataverse (Sales)", operation="upsert leads", status=status, code="0x80040265",
                            message="ISV code aborted the operation")  # fmt: skip
        return [item * 10 for item in items]

    return send, sent


def test_a_bad_row_is_isolated_and_every_good_row_is_written():
    send, sent = refusing({37})
    outcomes = list(bulk.write(list(range(100)), 50, send))
    written = [item for outcome in outcomes if isinstance(outcome, bulk.Written) for item in outcome.items]
    refused = [outcome for outcome in outcomes if isinstance(outcome, bulk.Refused)]
    assert sorted(written) == [item for item in range(100) if item != 37]
    assert [outcome.item for outcome in refused] == [37] and refused[0].error.status == 400
    # 2 batches, then halving 50 → 1 costs about 2·log2(50) more requests, not 50.
    assert len(sent) <= 2 + 2 * 6 + 1


def test_results_stay_paired_with_their_items():
    send, _ = refusing({3, 4})
    for outcome in bulk.write(list(range(10)), 4, send):
        if isinstance(outcome, bulk.Written):
            assert outcome.result == [item * 10 for item in outcome.items]


@pytest.mark.parametrize("status", [401, 429, 500, 503])
def test_systemic_failures_fail_the_task_instead_of_blaming_a_record(status):
    send, _ = refusing({1}, status=status)
    with pytest.raises(D365Error) as raised:
        list(bulk.write([0, 1, 2], 3, send))
    assert raised.value.status == status


def test_batches_in_flight_do_not_change_the_outcome():
    send, _ = refusing({5, 77})
    one = list(bulk.write(list(range(120)), 10, send, concurrency=1))
    many = list(bulk.write(list(range(120)), 10, send, concurrency=4))
    assert [(type(o).__name__, getattr(o, "items", getattr(o, "item", None))) for o in one] == [
        (type(o).__name__, getattr(o, "items", getattr(o, "item", None))) for o in many
    ]
