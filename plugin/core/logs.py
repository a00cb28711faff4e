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

    They filled the log with ten lines per similar query of 10 results, saying nothing the request's
    final status line and the counters do not, and writing them was a quarter of the samples of the
    thread answering (py-spy during `drh-pacs bench query`; the query's latency itself moved within
    the noise: p50 70.7 against 74.5 ms at 20,000 studies, one run each).
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
