"""Structured logs: one JSON object per line by default (what awslogs and CloudWatch Logs
Insights parse), plain text with --log-format text. Fields go in `extra={"fields": {...}}`."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

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


def endpoint_changed(zone: str, address: str, health: str, **fields: object) -> None:
    """The log line of a discovery endpoint's health transition (probes and Cloud Map)."""
    get().info(
        "endpoint health changed",
        extra={"fields": {"zone": zone, "address": address, "health": health, **fields}},
    )
