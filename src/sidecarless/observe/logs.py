"""Structured logs: JSON lines when stderr is not a terminal, `key=value` text when it is."""

from __future__ import annotations

import json
import logging
import sys
import time


class LogKey:
    """The structured fields log lines carry (`extra=`): one spelling each, so logs can be queried."""

    BACKOFF_S = "backoff_s"
    CODE = "code"
    ERROR = "error"
    EVENT = "event"
    FILE = "file"
    KIND = "kind"
    NONCE = "nonce"
    PID = "pid"
    PROBLEM = "problem"
    REMOVED = "removed"
    RESOURCES = "resources"
    TYPE_URL = "type_url"
    VERSION = "version"


# Attributes every LogRecord has; anything else on a record came from `extra=` and is a structured field.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update({key: value for key, value in vars(record).items() if key not in _STANDARD})
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = " ".join(f"{key}={value}" for key, value in vars(record).items() if key not in _STANDARD)
        text = f"{record.levelname.lower():<7} {record.getMessage()} {fields}".rstrip()
        return text + ("\n" + self.formatException(record.exc_info) if record.exc_info else "")


def configure(level: int = logging.INFO) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_TextFormatter() if sys.stderr.isatty() else _JsonFormatter())
    logging.basicConfig(level=level, handlers=[handler], force=True)
