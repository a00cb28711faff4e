"""The refusals of the pixel path: why a DICOM object is not turned into a model input.

Each carries a short machine-friendly ``code`` (metrics, failure lists) and a human ``reason`` that
never includes patient data (only header facts such as transfer syntax, photometric interpretation,
sizes, windows). The codes are listed in :mod:`hashing.preprocess`.
"""

from __future__ import annotations

from typing import Any


class PreprocessError(Exception):
    """Base of the refusals: ``code`` for machines (metrics, failure lists), ``reason`` for people."""

    code: str
    reason: str

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason


class DecodeError(PreprocessError):
    """The object should be an image but could not be turned into one.

    ``transient`` is True only when retrying the same bytes later can succeed (an I/O error, memory
    pressure); a corrupt file or a missing codec fails the same way every time.
    """

    def __init__(self, reason: str, transient: bool = False, code: str = "decode_failed") -> None:
        super().__init__(code, reason)
        self.transient = transient

    def __reduce__(self) -> tuple[Any, ...]:
        # Celery pickles exceptions raised by tasks; keep code and transient across the trip.
        return (type(self), (self.reason, self.transient, self.code))


class NotAnImage(PreprocessError):
    """The object is valid DICOM but not something the model indexes (SR, PR, KO, SEG, RT dose...)."""

    def __init__(self, reason: str, code: str = "not_an_image") -> None:
        super().__init__(code, reason)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.reason, self.code))


def short(exc: BaseException, limit: int = 160) -> str:
    """An exception's message on one line, cut to ``limit`` characters."""
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
