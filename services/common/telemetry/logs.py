"""Process logging: LOG_LEVEL, and LOG_FORMAT=text (for people) or json (for collectors),
with the request id and, while a span is active, the trace and span ids
(docs/observability.md, "Logs").
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
from typing import TextIO

from opentelemetry import trace

from services.common.foundation.settings import Settings
from services.common.telemetry import context

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s%(request_tag)s: %(message)s"

# What every LogRecord has; anything else on a record came through `extra=` and is
# written as a field of its own (but uvicorn's copy of the message with colours).
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "request_tag",
    "color_message",
}


class RequestContextFilter(logging.Filter):
    """Puts request_id, trace_id and span_id on every record (None outside a request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        request_id = context.request_id()
        # Attributes of the record's own, which the formatters read.
        record.request_id = request_id
        record.request_tag = f" [{request_id}]" if request_id else ""
        span = trace.get_current_span().get_span_context()
        if span.is_valid:
            record.trace_id = format(span.trace_id, "032x")
            record.span_id = format(span.span_id, "016x")
        else:
            record.trace_id = record.span_id = None
        return True


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self._service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "service": self._service,
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and value is not None:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def configure(settings: Settings, service: str, stream: TextIO | None = None) -> logging.Handler:
    if settings.log_format not in FORMATS:
        raise ValueError(f"LOG_FORMAT must be one of {', '.join(FORMATS)}, got {settings.log_format!r}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(RequestContextFilter())
    handler.setFormatter(JsonFormatter(service) if settings.log_format == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(settings.log_level.upper())
    return handler
