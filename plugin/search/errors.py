"""Why a similar query is refused, independent of the protocol that carries the answer."""

from __future__ import annotations


class QueryError(Exception):
    """A request we refuse: ``reason`` is a short tag, ``comment`` what to tell the requester.

    Reasons: ``malformed``, ``unknown-reference``, ``ambiguous-reference``, ``not-indexed``,
    ``not-indexable`` (received, but none of it could be indexed: failed, not an image, refused),
    ``no-model`` (stored, but no model serves its kind of image), ``index-not-ready``,
    ``model-mismatch``, ``too-large``, ``not-an-image``. The DICOM layer turns a reason into a
    failure status with the comment as ErrorComment (at most 64 characters), the HTTP layer into a
    status code; an empty success would tell a radiologist "nothing similar" when the truth is
    "ask again later" or "your viewer sent something I cannot read".
    """

    def __init__(self, reason: str, comment: str) -> None:
        super().__init__(comment)
        self.reason = reason
        self.comment = comment
