"""One logging set-up for every shardvu process: the CLI, the control
process, the workers and the examples.

:func:`setup` configures the root logger once per process: a level (one of
:data:`LEVELS`) and a format, ``"text"`` (one human line per record) or
``"json"`` (one JSON object per line: ``time``, ``level``, ``logger``,
``process`` — the role such as ``control`` or ``worker3`` —, ``pid``,
``message`` and, for an exception, ``exc``).  It records level and format in
the environment (``SHARDVU_LOG_LEVEL``, ``SHARDVU_LOG_FORMAT``), so that
child processes, forked or spawned with another interpreter, inherit the
same set-up when they call :func:`setup` without arguments.

Runs on CPython >= 3.9 and PyPy 3.9 (the workers import it): standard
library only.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Optional

__all__ = ["LEVELS", "FORMATS", "parse_level", "parse_format", "setup", "JsonFormatter"]

#: The accepted ``--log-level`` values, most verbose first.
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
#: The accepted ``--log-format`` values.
FORMATS = ("text", "json")

_ENV_LEVEL = "SHARDVU_LOG_LEVEL"
_ENV_FORMAT = "SHARDVU_LOG_FORMAT"
_TEXT = "%(asctime)s %(role)s %(name)s %(levelname)s %(message)s"


def parse_level(text: str) -> str:
    """``text`` as a level name of :data:`LEVELS` (case-insensitive).
    Raises ValueError naming the accepted values otherwise."""
    level = str(text).strip().upper()
    if level not in LEVELS:
        raise ValueError(f"invalid log level {text!r} (choose from {', '.join(LEVELS)})")
    return level


def parse_format(text: str) -> str:
    """``text`` as one of :data:`FORMATS`; ValueError otherwise."""
    fmt = str(text).strip().lower()
    if fmt not in FORMATS:
        raise ValueError(f"invalid log format {text!r} (choose from {', '.join(FORMATS)})")
    return fmt


class _RoleFilter(logging.Filter):
    """Stamps every record with the process's role (``control``, ``worker3``)."""

    def __init__(self, role: str) -> None:
        super().__init__()
        self.role = role

    def filter(self, record: logging.LogRecord) -> bool:
        record.role = self.role
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        obj = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                    + ".%03dZ" % int(record.msecs),
            "level": record.levelname,
            "logger": record.name,
            "process": getattr(record, "role", ""),
            "pid": record.process,
            "message": record.getMessage(),
        }
        if record.exc_info:
            obj["exc"] = self.formatException(record.exc_info)
        return json.dumps(obj)


def setup(level: Optional[str] = None, fmt: Optional[str] = None, role: str = "shardvu",
          stream=None) -> None:
    """Configure the root logger of this process: ``level`` and ``fmt``
    (default: the inherited ``SHARDVU_LOG_*`` environment, else ``WARNING``
    and ``text``), records stamped with ``role``, written to ``stream``
    (default stderr).  Replaces any handler installed before, so calling it
    again (e.g. in a forked child with a new role) is safe.  Raises
    ValueError for a level or format outside :data:`LEVELS` / :data:`FORMATS`.
    """
    level = parse_level(level if level is not None else os.environ.get(_ENV_LEVEL, "WARNING"))
    fmt = parse_format(fmt if fmt is not None else os.environ.get(_ENV_FORMAT, "text"))
    os.environ[_ENV_LEVEL] = level
    os.environ[_ENV_FORMAT] = fmt
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.addFilter(_RoleFilter(role))
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(_TEXT))
    root = logging.getLogger()
    for old in list(root.handlers):
        # Removed, not closed: in a forked worker an inherited handler's
        # stream may be an fd the worker has already closed.
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
