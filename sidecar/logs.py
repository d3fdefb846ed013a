"""Structured logs: one JSON object per line by default (what awslogs and CloudWatch Logs
Insights parse), plain text with --log-format text. Fields go in `extra={"fields": {...}}`."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from sidecar.core.line_budget import LineBudget

LOGGER_NAME = "dns_sidecar"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "msg": record.getMessage(),
        }
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", {})
        text = f"{record.levelname.lower():7} {record.getMessage()}"
        if fields:
            text += " " + " ".join(f"{k}={v}" for k, v in fields.items())
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def setup(log_format: str, level: str) -> logging.Logger:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    logger = logging.getLogger(LOGGER_NAME)
    logger.handlers[:] = [handler]
    logger.setLevel(level.upper())
    logger.propagate = False
    return logger


def get() -> logging.Logger:
    return logging.getLogger(LOGGER_NAME)


def query_line(
    client: object, question: bytes, qtype: int, reply: bytes, source: str, seconds: float
) -> None:
    """One line of the optional query log (--log-queries): never on by default."""
    from sidecar.core.counters import QTYPE_NAMES, RCODE_NAMES
    from sidecar.core.routing import wire_to_name

    get().info(
        "query",
        extra={
            "fields": {
                "client": str(client),
                "name": wire_to_name(question[:-4]),
                "type": QTYPE_NAMES.get(qtype, str(qtype)),
                "rcode": RCODE_NAMES[reply[3] & 0x0F],
                "source": source,
                "duration_ms": round(seconds * 1000, 3),
            }
        },
    )


# Discovery endpoints changing health: a line each for the first ENDPOINT_LINES_PER_SECOND of
# each health value in a second, then one summary (core/line_budget.py). Owned here, the one
# place both probes and Cloud Map log through.
ENDPOINT_LINES_PER_SECOND = 20
_endpoint_lines = LineBudget(ENDPOINT_LINES_PER_SECOND, 1.0)


def endpoint_changed(zone: str, address: str, health: str, now: float, **fields: object) -> None:
    """The log line of a discovery endpoint's health transition (probes and Cloud Map)."""
    endpoint_summaries(now)
    if _endpoint_lines.admit(health, now):
        get().info(
            "endpoint health changed",
            extra={"fields": {"zone": zone, "address": address, "health": health, **fields}},
        )


def endpoint_summaries(now: float) -> None:
    """One line per health value for the changes left out in a second that is over; the probe
    loop calls it every tick, Cloud Map after each refresh."""
    for health, count in _endpoint_lines.ended(now):
        get().info(
            "more endpoint health changes",
            extra={"fields": {"health": health, "count": count, "seconds": 1.0}},
        )
