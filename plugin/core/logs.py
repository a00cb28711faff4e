"""Logging set-up shared by every process.

House rule: log records carry UIDs (study, series, SOP instance), AE titles and addresses, never
patient names or IDs; the formatter adds the process name so a multi-process `serve` is readable.
"""

from __future__ import annotations

import logging
import sys


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s",
    )
    # pynetdicom logs whole datasets at DEBUG (patient data included): keep it at INFO at most.
    logging.getLogger("pynetdicom").setLevel(max(logging.INFO, logging.getLogger().level))
