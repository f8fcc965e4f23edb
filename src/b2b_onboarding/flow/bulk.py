"""Bulk writes that survive one bad row: an all-or-nothing batch the service refuses for a record
error is split in halves until the bad rows stand alone; every good row is still written."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

from b2b_onboarding.errors import D365Error

Item = TypeVar("Item")
Result = TypeVar("Result")


@dataclass(frozen=True)
class Written(Generic[Item, Result]):
    items: Sequence[Item]
    result: Result


@dataclass(frozen=True)
class Refused(Generic[Item]):
    item: Item
    error: D365Error


def batches(items: Sequence[Item], size: int) -> Iterator[Sequence[Item]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def isolate(items: Sequence[Item], send: Callable[[Sequence[Item]], Result]) -> list[Written | Refused]:
    """Sends `items` as one batch; on a record-level refusal, sends each half on its own.

    A batch with one bad row among n costs about 2·log2(n) extra requests. Systemic failures
    (auth, throttling beyond the retry budget, 5xx) propagate: they fail the task, not a record.
    """
    try:
        return [Written(items, send(items))]
    except D365Error as error:
        if not error.is_record_error:
            raise
        if len(items) == 1:
            return [Refused(items[0], error)]
    middle = len(items) // 2
    return isolate(items[:middle], send) + isolate(items[middle:], send)


def write(
    items: Sequence[Item], size: int, send: Callable[[Sequence[Item]], Result], concurrency: int = 1
) -> Iterator[Written | Refused]:
    """Every batch of `size` items through `isolate`, up to `concurrency` batches in flight; outcomes
    come back in batch order, so the caller records them from one thread."""
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        for outcomes in pool.map(lambda batch: isolate(batch, send), batches(items, size)):
            yield from outcomes
