"""Logging set-up shared by every process.

House rule: log records carry UIDs (study, series, SOP instance), AE titles and addresses, never
patient names or IDs; the formatter adds the process name so a multi-process `serve` is readable.
"""

from __future__ import annotations

import logging
import re
import sys

# pynetdicom's line per pending C-FIND, C-GET or C-MOVE response ("Find SCP Response 3: 0xFF00
# (Pending)"): one per similar study answered, saying only that it was sent.
_PENDING_RESPONSE = re.compile(r"(Find|Get|Move) SCP Response( \d+)?: +0x[0-9A-F]{4} \(Pending\)")


class PendingResponses(logging.Filter):
    """Drops pynetdicom's line per pending response; the final status line of each request stays.

    Writing those lines took a fifth of the front process's samples while it answered C-FIND similar
    queries of 10 results (py-spy, `drh-pacs bench query`), and filled the log with ten lines per
    query that say nothing the request's own log and counters do not.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno == logging.INFO and _PENDING_RESPONSE.fullmatch(str(record.msg)))


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s",
    )
    # pynetdicom logs whole datasets at DEBUG (patient data included): keep it at INFO at most.
    logging.getLogger("pynetdicom").setLevel(max(logging.INFO, logging.getLogger().level))
    services = logging.getLogger("pynetdicom.service_class")  # a logger's filters see its own records only
    if not any(isinstance(f, PendingResponses) for f in services.filters):
        services.addFilter(PendingResponses())
