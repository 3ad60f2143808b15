"""Logging: one line per event, text or JSON, with the context fields (msg id, user, job id).

Secrets never reach a log record: the code logs ids and error codes, never configuration values.
"""

from __future__ import annotations

import atexit
import json
import logging
import queue
import sys
import time
from logging.handlers import QueueHandler, QueueListener

# Attributes every LogRecord has; anything else came in through `extra=` and is context.
_STANDARD = set(vars(logging.LogRecord("x", 0, "x", 0, "x", None, None))) | {"message", "asctime"}


def _context(record: logging.LogRecord) -> dict[str, object]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and v not in (None, "")}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            **_context(record),
        }
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        context = " ".join(f"{k}={v}" for k, v in _context(record).items())
        return f"{line} {context}" if context else line


class _HandOff(QueueHandler):
    """Queues the record itself, exception included: the writer thread is in this process, so
    the formatters see what they would have seen (QueueHandler would flatten it into msg)."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        record.msg, record.args = record.getMessage(), None
        return record


class _Background:
    """The listener thread of the current background setup (one per process)."""

    listener: QueueListener | None = None


@atexit.register
def _stop_background() -> None:
    """Writes what is still queued, then ends the writer thread."""
    if _Background.listener is not None:
        _Background.listener.stop()
        _Background.listener = None


def setup_logging(fmt: str = "text", level: str = "INFO", *, background: bool = False) -> None:
    """`background`: request threads only queue their records and one thread writes them, so
    a slow stderr (a container log pipe under load) never holds up a callback's 200. Call it
    again in a forked child: the parent's writer thread does not exist there."""
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    _stop_background()
    root = logging.getLogger()
    if background:
        records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
        _Background.listener = QueueListener(records, stream)
        _Background.listener.start()
        root.handlers[:] = [_HandOff(records)]
    else:
        root.handlers[:] = [stream]
    root.setLevel(level)
    # Library request logs would print URLs with access tokens in the query string.
    logging.getLogger("urllib3").setLevel(logging.WARNING)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
