"""The log lines of endpoint health changes: a burst is summarised, not written line by line."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from sidecar import logs


class Kept(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def kept() -> Iterator[Kept]:
    logger = logs.get()
    handler, level = Kept(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logs.endpoint_summaries(1e9)  # what earlier tests left open is reported before we look
    handler.records.clear()
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


def test_a_thousand_endpoints_going_down_at_once_log_a_few_lines_and_one_summary(
    kept: Kept,
) -> None:
    start = 2e9
    for i in range(1000):
        logs.endpoint_changed("svc.local", f"10.1.{i // 250}.{i % 250}", "unhealthy", start)
    logs.endpoint_changed("svc.local", "10.9.9.9", "healthy", start + 0.5)
    assert [r.getMessage() for r in kept.records] == ["endpoint health changed"] * (
        logs.ENDPOINT_LINES_PER_SECOND + 1
    )
    logs.endpoint_summaries(start + 0.9)
    assert len(kept.records) == logs.ENDPOINT_LINES_PER_SECOND + 1  # the second is not over
    logs.endpoint_summaries(start + 1.0)
    summaries = [r for r in kept.records if r.getMessage() == "more endpoint health changes"]
    fields = [getattr(r, "fields", {}) for r in summaries]
    assert fields == [
        {"health": "unhealthy", "count": 1000 - logs.ENDPOINT_LINES_PER_SECOND, "seconds": 1.0}
    ]
