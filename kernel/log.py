"""The one structlog set-up of LLMasOS: llmosd calls it, and so does every service it starts
(the level travels as LLMASOS_LOG_LEVEL). JSON lines when stderr is not a TTY, console if it is."""

from __future__ import annotations

import logging
import os
import sys

import structlog

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "error": logging.ERROR}


def level_of(name: str | None) -> int:
    """--log-level, else $LLMASOS_LOG_LEVEL, else info; an unknown name is refused."""
    name = (name or os.environ.get("LLMASOS_LOG_LEVEL") or "info").lower()
    if name not in LEVELS:
        raise SystemExit(f"unknown log level {name!r}; use one of {', '.join(LEVELS)}")
    return LEVELS[name]


def configure(level: str | None = None, **process: object) -> None:
    """Logging for this process; the level is exported so that processes it starts inherit it.
    `process` fields (a service's name and pid) go on every line, from every thread."""
    os.environ["LLMASOS_LOG_LEVEL"] = logging.getLevelName(level_of(level)).lower()
    tty = sys.stderr.isatty()
    structlog.configure(
        processors=[
            lambda _logger, _method, event: {**process, **event},
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            structlog.processors.format_exc_info,
            structlog.dev.ConsoleRenderer() if tty else structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level_of(level)),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
