"""Log output: Faust's human format by default, one JSON object per line for log shippers."""

from __future__ import annotations

import datetime
import logging
from typing import Any, Final

import orjson
import psycopg2.errors
from aiohttp.http_exceptions import BadHttpMessage

# Attributes every LogRecord has; anything else on a record came from ``extra=`` and is a field.
_STANDARD: Final = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "color_message",
}


class JsonFormatter(logging.Formatter):
    """``{"timestamp", "level", "logger", "message", ...extra fields}`` on one line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "timestamp": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def logging_config(log_format: str) -> dict[str, Any] | None:
    """The dictConfig Faust's worker merges into its own, or ``None`` to keep Faust's."""
    if log_format != "json":
        return None
    return {
        "merge": True,
        "formatters": {"json": {"()": JsonFormatter}},
        "handlers": {
            "default": {
                "class": "logging.StreamHandler",
                "formatter": "json",
                "stream": "ext://sys.stderr",
            }
        },
    }


class _HttpParserRefusals(logging.Filter):
    """aiohttp logs every request its parser refuses (a TLS hello on the plain port, a bad
    chunk size) as an ERROR with a traceback, though it answers 400 and nothing is wrong with
    the service: such records become one INFO line, so a scanner cannot flood the log."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, BadHttpMessage):
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.msg, record.args, record.exc_info = (
                "refused a malformed HTTP request: %s",
                (error.message,),
                None,
            )
        return True


def quiet_http_parser_refusals() -> None:
    """Install the filter on aiohttp's server logger (once)."""
    logger = logging.getLogger("aiohttp.server")
    if not any(isinstance(existing, _HttpParserRefusals) for existing in logger.filters):
        logger.addFilter(_HttpParserRefusals())


class _StatementTimeoutReports(logging.Filter):
    """aiopg reports each statement PostgreSQL cancelled to the event loop's exception handler
    (an ERROR with a traceback on the asyncio logger) before raising it; the agent already
    tells such an episode once, so these records are dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not isinstance(error, psycopg2.errors.QueryCanceled)


def quiet_statement_timeout_reports() -> None:
    """Install the filter on asyncio's logger (once)."""
    logger = logging.getLogger("asyncio")
    if not any(isinstance(existing, _StatementTimeoutReports) for existing in logger.filters):
        logger.addFilter(_StatementTimeoutReports())
