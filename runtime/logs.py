"""Logging and progress for services and the CLI: one place that decides the log level and format
(plain text for people, one JSON object per line for log collectors) and that progress bars appear
only on a terminal."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any

from .errors import unknown

__all__ = ["LOG_FORMATS", "LOG_LEVELS", "JsonFormatter", "configure_logging", "progress"]

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
# LogRecord attributes that are not "extra" fields a caller attached
_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (UTC, ISO 8601 with ms), level, logger, message, the exception
    if any, and every ``extra=`` field a caller attached."""

    def format(self, record: logging.LogRecord) -> str:
        t = time.gmtime(record.created)
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for k, v in record.__dict__.items():
            if k not in _STANDARD and not k.startswith("_"):
                out[k] = v
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def configure_logging(level: str = "info", fmt: str = "text", stream: Any = None) -> None:
    """Route every logger (ours, uvicorn's, Ray's driver side) through one stderr handler at ``level``."""
    if level not in LOG_LEVELS:
        raise unknown("log level", level, LOG_LEVELS)
    if fmt not in LOG_FORMATS:
        raise unknown("log format", fmt, LOG_FORMATS)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        lg = logging.getLogger(name)
        lg.handlers.clear()
        lg.propagate = True


def progress(**kwargs: Any) -> Any:
    """A tqdm bar that draws only on a terminal (never into log files or pipes); ``TQDM_DISABLE=1`` turns
    it off everywhere."""
    from tqdm.auto import tqdm

    asked = kwargs.pop("disable", None)  # True: off; None: the terminal decides
    off = asked is True or os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true", "yes")
    kwargs.setdefault("file", sys.stderr)
    return tqdm(disable=True if off else None, **kwargs)
