"""Structured logs for services: one line per event, as text for people or JSON for machines.

Code logs an event name and fields: ``log.info("peer connected", extra=fields(peer=str(p)))``.
JSON lines carry ``ts`` (UTC, ISO 8601), ``level``, ``logger``, ``event`` and the fields; text
lines show the same as ``key=value`` pairs. The house rule holds here too: fields are metadata
(peer IDs, counts, durations, addresses), never message content, keys or tokens.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
from typing import Any, TextIO

__all__ = ["JsonFormatter", "TextFormatter", "configure", "fields"]

_FIELDS = "teia_fields"


def fields(**values: Any) -> dict[str, Any]:
    """Structured fields for a log call: ``log.info("event", extra=fields(count=3))``."""
    return {_FIELDS: values}


def _record_fields(record: logging.LogRecord) -> dict[str, Any]:
    values = getattr(record, _FIELDS, None)
    return dict(values) if isinstance(values, dict) else {}


def _timestamp(record: logging.LogRecord) -> str:
    moment = dt.datetime.fromtimestamp(record.created, tz=dt.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        for key, value in _record_fields(record).items():
            line.setdefault(key, value)
        if record.exc_info and record.exc_info[0] is not None:
            line["error"] = f"{record.exc_info[0].__name__}: {record.exc_info[1]}"
        return json.dumps(line, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """``2026-11-26T10:00:00.000Z info  teia.dht  event key=value …``."""

    def format(self, record: logging.LogRecord) -> str:
        parts = [
            _timestamp(record),
            f"{record.levelname.lower():7}",
            record.name,
            record.getMessage(),
        ]
        parts += [f"{key}={value}" for key, value in _record_fields(record).items()]
        if record.exc_info and record.exc_info[0] is not None:
            parts.append(f"error={record.exc_info[0].__name__}: {record.exc_info[1]}")
        return " ".join(parts)


def configure(level: str = "info", fmt: str = "text", stream: TextIO | None = None) -> None:
    """Send every log record to ``stream`` (stderr) in ``fmt``; replaces earlier handlers."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # aioquic logs each connection's errors at INFO/WARNING with connection IDs; keep only
    # its errors unless debugging.
    if level.lower() != "debug":
        logging.getLogger("quic").setLevel(logging.ERROR)
