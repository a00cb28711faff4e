"""C-MOVE of a returned study to the viewer's AE, forwarded to the PACS that sent it; C-GET from the spool.

The plugin is not an archive: the PACS that sent a study (``source_ae`` recorded with the study, or
the ``SourceApplicationEntityTitle`` of its spooled files) holds the authoritative copy, so a retrieve
is forwarded there as a C-MOVE with the viewer's AE as destination; the PACS already knows how to
reach its viewers. When the source is not a known node (``Settings.dicom_nodes``) or refuses, and the
received files are still in the spool, they are sent to the destination directly.

While the source PACS does a forwarded move, the viewer is told what it says: each of its pending
responses (how many instances are done, failed, left) is passed on as it comes, a C-CANCEL from the
viewer is passed to the PACS, and the final response carries the PACS's counts
(:class:`MoveResponses`). A viewer waiting on a large study sees it progress rather than a silent
association it may time out, and a final "success" says how many instances the PACS sent.

C-GET (a viewer that pulls over its own association instead of naming a destination) can only be
answered from the spool: the files go back as C-STORE sub-operations on the viewer's association.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.dimse_primitives import C_MOVE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove

from plugin.core.header import is_uid
from plugin.core.settings import Settings
from plugin.dicom import status as st
from plugin.dicom.spool import Spool, source_ae_of
from plugin.search.errors import QueryError

log = logging.getLogger("drh.move")

FORWARD_TIMEOUT = 600.0
FORWARD_MESSAGE_ID = 1  # the forwarded C-MOVE's, which a relayed C-CANCEL names


@dataclass(frozen=True)
class Node:
    ae_title: str
    host: str
    port: int


@dataclass
class MovePlan:
    study_uids: list[str]
    forward_to: Node | None
    local_files: list[Path] = field(default_factory=list)


@dataclass(frozen=True)
class ForwardOutcome:
    status: int
    completed: int = 0
    failed: int = 0
    warning: int = 0
    comment: str = ""
    answered: bool = True  # False: the source PACS could not be reached, or stopped answering

    @property
    def ok(self) -> bool:
        return self.status in (st.SUCCESS, st.MOVE_SUBOPS_WARNING) and not self.failed

    @property
    def cancelled(self) -> bool:
        return self.status == st.CANCEL


SUBOPERATION_COUNTS = (
    "NumberOfRemainingSuboperations",
    "NumberOfCompletedSuboperations",
    "NumberOfFailedSuboperations",
    "NumberOfWarningSuboperations",
)


class Relay(Protocol):
    """What :func:`forward` tells the viewer, and asks it, while the source PACS works."""

    def pending(self, status: Dataset) -> None: ...

    def cancelled(self) -> bool: ...


class MoveResponses:
    """What the viewer that asked for a C-MOVE is told when drh-pacs sends nothing itself: the source
    PACS's progress and final counts for a forwarded move, or a refusal with its reason.

    pynetdicom's C-MOVE handler contract has no room for sub-operations done by another node (a
    handler with no local sub-operation gets a final "success, 0 completed"), nor for a failure with
    an ErrorComment before any sub-operation (a handler that raises is answered 0xC514, with a
    traceback in the log). So the pending responses are sent on the viewer's association here, from
    the handler's own thread (the association's), and :meth:`final_from` puts the status, counts and
    comment in pynetdicom's final response, for that one message, just before it is encoded.
    """

    def __init__(self, event: Any) -> None:
        self._dimse = event.assoc.dimse
        self._context_id = int(event.context.context_id)
        self._request = event.request
        self._is_cancelled = lambda: bool(event.is_cancelled)

    def _response(self, status: int) -> C_MOVE:
        rsp = C_MOVE()
        rsp.MessageIDBeingRespondedTo = self._request.MessageID
        rsp.AffectedSOPClassUID = self._request.AffectedSOPClassUID
        rsp.Status = status
        return rsp

    def pending(self, status: Dataset) -> None:
        """Send one of the source PACS's pending responses on to the viewer."""
        rsp = self._response(int(status.Status))
        for keyword in SUBOPERATION_COUNTS:
            value = status.get(keyword)
            if value is not None:
                setattr(rsp, keyword, int(value))
        self._dimse.send_msg(rsp, self._context_id)

    def cancelled(self) -> bool:
        return self._is_cancelled()

    def final_from(self, outcome: ForwardOutcome) -> None:
        """Make pynetdicom's next final response to this request carry ``outcome`` (then step aside)."""
        dimse, message_id = self._dimse, self._request.MessageID
        send_msg = dimse.send_msg

        def send_with_outcome(primitive: Any, context_id: int) -> None:
            if (
                isinstance(primitive, C_MOVE)
                and primitive.MessageIDBeingRespondedTo == message_id
                and primitive.Status not in (st.PENDING, st.PENDING_WARNING)
            ):
                del dimse.send_msg  # back to the class's own method: this was the one message
                primitive.Status = outcome.status
                primitive.NumberOfRemainingSuboperations = None  # not in a final response (PS3.4 C.4.2.3.1)
                primitive.NumberOfCompletedSuboperations = outcome.completed
                primitive.NumberOfFailedSuboperations = outcome.failed
                primitive.NumberOfWarningSuboperations = outcome.warning
                if outcome.comment and outcome.status != st.SUCCESS:
                    primitive.ErrorComment = outcome.comment[:64]  # LO
            send_msg(primitive, context_id)

        dimse.send_msg = send_with_outcome

    def refuse(self, reason: str) -> None:
        """Make the final response a failure that says why (the viewer's ErrorComment)."""
        self.final_from(ForwardOutcome(st.UNABLE_TO_PROCESS, comment=reason))


def lookup_node(settings: Settings, ae_title: str) -> Node | None:
    """The address (``AE=host:port``) of a declared viewer or node for ``ae_title``, or None."""
    address = settings.move_destination(ae_title)
    if not address:
        return None
    host, _, port = address.rpartition(":")
    try:
        return Node(ae_title.strip(), host or "127.0.0.1", int(port))
    except ValueError:
        log.error("dicom_nodes entry for %s is not host:port: %r", ae_title, address)
        return None


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    if value is None:
        return ""
    if not isinstance(value, str) and hasattr(value, "__iter__"):
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def requested_studies(identifier: Dataset, store: Any) -> list[str]:
    """The StudyInstanceUIDs a move identifier names (directly, or through its SOP instances)."""
    level = _text(identifier, "QueryRetrieveLevel").upper()
    if level not in {"PATIENT", "STUDY", "SERIES", "IMAGE"}:
        raise QueryError("malformed", f"QueryRetrieveLevel {level or '(none)'!r} is not valid")
    studies = [u for u in _text(identifier, "StudyInstanceUID").split("\\") if u]
    if not studies and level == "PATIENT":
        patient_id = _text(identifier, "PatientID")
        if not patient_id or "*" in patient_id or "?" in patient_id:
            raise QueryError("malformed", "a PATIENT level C-MOVE needs one PatientID")
        rows = store.records.studies_with_instances(store.records.iter_study_uids(), with_instances=False)
        studies = [uid for uid, meta, _ in rows if meta.get("patient_id") == patient_id]
    if not studies and level == "IMAGE":
        for sop_uid in (u for u in _text(identifier, "SOPInstanceUID").split("\\") if u):
            study_uid = store.records.instance(sop_uid).get("study_uid")
            if study_uid:
                studies.append(study_uid)
    if not studies:
        raise QueryError("malformed", "C-MOVE needs a StudyInstanceUID")
    if not all(is_uid(u) for u in studies):
        raise QueryError("malformed", "StudyInstanceUID is not a UID list")
    return sorted(set(studies))


def source_of(study_uid: str, store: Any, spool: Spool) -> str:
    """Which AE sent the study: the stored metadata first, else the spooled files' file meta."""
    source = store.records.study(study_uid).get("source_ae", "")
    if source:
        return source
    for path in spool.study_files(study_uid)[:1]:
        return source_ae_of(path)
    return ""


def plan(identifier: Dataset, store: Any, spool: Spool, settings: Settings) -> MovePlan:
    """Decide where a retrieve comes from: one known source PACS, else the spooled files."""
    studies = requested_studies(identifier, store)
    sources = {source_of(uid, store, spool) for uid in studies}
    nodes = [lookup_node(settings, s) for s in sources if s]
    forward_to = nodes[0] if len(sources) == 1 and nodes and nodes[0] is not None else None
    if forward_to is not None and forward_to.ae_title.strip() == settings.ae_title.strip():
        forward_to = None  # never forward to ourselves
    return MovePlan(studies, forward_to, local_files(identifier, studies, store, spool))


def local_files(identifier: Dataset, studies: list[str], store: Any, spool: Spool) -> list[Path]:
    """The spooled files a retrieve identifier names within ``studies`` (its series or instances)."""
    files: list[Path] = []
    level = _text(identifier, "QueryRetrieveLevel").upper()
    wanted_sops = {u for u in _text(identifier, "SOPInstanceUID").split("\\") if u} if level == "IMAGE" else set()
    wanted_series = {u for u in _text(identifier, "SeriesInstanceUID").split("\\") if u} if level == "SERIES" else set()
    for uid in studies:
        for path in spool.study_files(uid):
            if wanted_sops and path.stem not in wanted_sops:
                continue
            if wanted_series:
                series = store.records.instance(path.stem).get("series_uid")
                if series is None or series not in wanted_series:
                    try:
                        series = str(dcmread(path, stop_before_pixels=True).SeriesInstanceUID)
                    except Exception:  # noqa: BLE001 - unreadable file: not part of the answer
                        continue
                    if series not in wanted_series:
                        continue
            files.append(path)
    return files


def forward(
    move_plan: MovePlan, identifier: Dataset, destination: str, settings: Settings, relay: Relay | None = None
) -> ForwardOutcome:
    """Ask the source PACS to C-MOVE the same identifier to ``destination``; wait for its final answer.

    Each pending response on the way goes to ``relay``, and a cancel the viewer asks for (seen between
    two responses) is passed on to the PACS, whose final response then says "cancel".
    """
    node = move_plan.forward_to
    assert node is not None
    ae = AE(ae_title=settings.ae_title)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    ae.acse_timeout = ae.connection_timeout = 30
    ae.dimse_timeout = FORWARD_TIMEOUT
    ae.network_timeout = FORWARD_TIMEOUT
    forwarded = Dataset()
    for keyword in ("QueryRetrieveLevel", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        if keyword in identifier:
            setattr(forwarded, keyword, identifier.get(keyword))
    if _text(forwarded, "QueryRetrieveLevel").upper() == "PATIENT":
        forwarded.QueryRetrieveLevel = "STUDY"  # Study Root has no PATIENT level: name the studies
    if "StudyInstanceUID" not in forwarded or not forwarded.StudyInstanceUID:
        forwarded.StudyInstanceUID = move_plan.study_uids
    assoc = ae.associate(node.host, node.port, ae_title=node.ae_title)
    if not assoc.is_established:
        log.warning("C-MOVE forward: cannot associate with %s at %s:%d", node.ae_title, node.host, node.port)
        return ForwardOutcome(st.UNABLE_TO_PROCESS, comment="source PACS unreachable", answered=False)
    last = ForwardOutcome(st.UNABLE_TO_PROCESS, comment="no answer from source PACS", answered=False)
    cancel_sent = False
    try:
        responses = assoc.send_c_move(
            forwarded, destination, StudyRootQueryRetrieveInformationModelMove, msg_id=FORWARD_MESSAGE_ID
        )
        for status, _ in responses:
            if status is None or "Status" not in status:
                last = ForwardOutcome(st.UNABLE_TO_PROCESS, comment="source PACS stopped answering", answered=False)
                break
            if relay is not None and int(status.Status) in (st.PENDING, st.PENDING_WARNING):
                relay.pending(status)
                if not cancel_sent and relay.cancelled():
                    assoc.send_c_cancel(FORWARD_MESSAGE_ID, query_model=StudyRootQueryRetrieveInformationModelMove)
                    cancel_sent = True
            last = ForwardOutcome(
                int(status.Status),
                completed=int(status.get("NumberOfCompletedSuboperations", 0) or 0),
                failed=int(status.get("NumberOfFailedSuboperations", 0) or 0),
                warning=int(status.get("NumberOfWarningSuboperations", 0) or 0),
                comment=str(status.get("ErrorComment", "") or ""),
            )
    finally:
        if assoc.is_established:
            assoc.release()
    if cancel_sent and not last.ok:  # the viewer cancelled: whatever the PACS then said, no fallback
        last = ForwardOutcome(st.CANCEL, last.completed, last.failed, last.warning, last.comment)
    return last


def answers_echo(settings: Settings, node: Node, timeout: float = 5.0) -> bool:
    """Whether ``node`` is up (accepts an association and answers a C-ECHO, or rejects drh-pacs's
    AE title): what tells "the destination is down" from "the source PACS does not know it" when a
    forwarded move fails."""
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title=settings.ae_title)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout
    assoc = ae.associate(node.host, node.port, ae_title=node.ae_title)
    if assoc.is_rejected:
        return True  # it answers, but not drh-pacs's AE title: up, and a forward does not need that
    if not assoc.is_established:
        return False
    try:
        status = assoc.send_c_echo()
        return status is not None and int(status.get("Status", -1)) == st.SUCCESS
    finally:
        assoc.release()


def read_for_sending(path: Path) -> Dataset:
    """A spooled file as an uncompressed dataset for a C-STORE sub-operation.

    Every viewer accepts Explicit VR Little Endian (uncompressed is the one syntax all must take);
    a compressed original is decompressed rather than risk a sub-operation the viewer refuses. When
    decompression is impossible the original is sent and the viewer decides.
    """
    ds = dcmread(path)
    syntax = ds.file_meta.TransferSyntaxUID
    if syntax.is_compressed:
        try:
            ds.decompress(generate_instance_uid=False)  # same pixels, same instance
        except Exception as exc:  # noqa: BLE001 - missing or failing codec: send what we have
            log.warning("C-MOVE: cannot decompress %s (%s); sending it as received", path.stem, exc)
    return ds


def sub_operation_contexts(paths: list[Path]) -> list[Any]:
    """Presentation contexts for sending ``paths``: their SOP classes, uncompressed and as stored."""
    from pydicom.filereader import read_file_meta_info
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
    from pynetdicom.presentation import build_context

    syntaxes: dict[str, set[str]] = {}
    for path in paths:
        meta = read_file_meta_info(path)
        syntaxes.setdefault(str(meta.MediaStorageSOPClassUID), set()).add(str(meta.TransferSyntaxUID))
    contexts = []
    for sop_class, stored in sorted(syntaxes.items()):
        contexts.append(build_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian]))
        for syntax in sorted(stored - {ExplicitVRLittleEndian, ImplicitVRLittleEndian}):
            contexts.append(build_context(sop_class, [syntax]))
    return contexts[:128]
